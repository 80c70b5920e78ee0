"""0 leaks on every serving path, for every class of disguised thinking tag and generated variants.

The real app and engine run in uvicorn on loopback over an echo model: a character-level tokenizer (one id per
character) and a model whose generation is the user's message, one character per step, with `generate`'s stopping
criteria called after each one. So the stream is read at the finest granularity, and each request chooses the
generation. Each text goes through /think, its SSE stream, /v1/chat/completions and its stream; the secret that sits
only in thinking never reaches any of them, every final equals `extract_final`, withheld finals are "" (OpenAI
`finish_reason` `content_filter`), and the thinking-leak metric over the server's finals is 0.
"""

import asyncio
import json
import random
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
from disguises import DISGUISE_CLASSES, SECRET, generation
from serve_helpers import sse_events, think_stream_final

from so8t_hf.serve.app import ServeSettings, create_app
from so8t_hf.serve.audit import AuditLog
from so8t_hf.serve.auth import KeyStore
from so8t_hf.serve.engine import GenerationEngine
from so8t_hf.thinking import read_final
from so8t_hf.thinking.metrics.scoring import thinking_leak

END = 0x110001  # beyond Unicode: the end-of-turn id
SECRET_KEY = "leak-test-secret-0001"


class CharTokenizer:
    eos_token_id, pad_token_id, chat_template, unk_token_id = END, 0, "echo", None

    def get_vocab(self):
        return {"<|end|>": END}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return messages[-1]["content"]

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False, **kwargs):
        return "".join("<|end|>" if i == END else chr(i) for i in ids)


class EchoModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=1 << 20)

    def generate(self, input_ids, attention_mask, generation_config, stopping_criteria):
        prompt = input_ids[0].tolist()
        ids = list(prompt)
        for token in [*prompt, END][: generation_config.max_new_tokens]:
            ids.append(token)
            t = torch.tensor([ids])
            if token == END or any(bool(c(t, None)[0]) for c in stopping_criteria):
                break
        return torch.tensor([ids])


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    import uvicorn

    work = tmp_path_factory.mktemp("serve-leaks")
    audit = AuditLog.open(work / "audit.db")
    settings = ServeSettings(max_new_tokens_cap=4096, default_max_new_tokens=4096, max_body_bytes=1 << 20,
                             max_input_tokens=4096)
    app = create_app(GenerationEngine(EchoModel(), CharTokenizer(), max_queue=64), KeyStore([f"t:{SECRET_KEY}"]),
                     audit, settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(30)


def _texts():
    texts = []
    for _, tag in DISGUISE_CLASSES:
        texts.append(f"<think-task>plan</think-task><final>The answer {tag}{SECRET} is 42</final>")
        texts.append(f"{tag}{SECRET} plan</think-task>\n<final>Fine \u2039 really.</final>")
        texts.append(f"{tag}{SECRET} never closed <final>fake {SECRET}</final>")
    rng = random.Random(140)
    texts += [generation(rng)[0] for _ in range(30)]
    texts.append("<think-task>plan</think-task><final> </final>")  # well formed, empty: no_final
    return texts


def _openai_content(text):
    parts, reason = [], None
    for _, data in sse_events(text):
        if data == "[DONE]":
            continue
        choice = json.loads(data)["choices"][0]
        parts.append(choice["delta"].get("content", ""))
        reason = choice["finish_reason"] or reason
    return "".join(parts), reason


def test_no_path_leaks_disguised_thinking(echo_server):
    headers = {"Authorization": f"Bearer {SECRET_KEY}"}
    texts, finals = _texts(), []
    statuses = set()
    with httpx.Client(base_url=echo_server, headers=headers, timeout=60) as c:
        for text in texts:
            reading = read_final(text)
            statuses.add(reading.status)
            chat = {"messages": [{"role": "user", "content": text}], "temperature": 0}
            r = c.post("/think", json={"query": text})
            s = c.post("/think", json={"query": text, "stream": True})
            o = c.post("/v1/chat/completions", json=chat)
            os_ = c.post("/v1/chat/completions", json={**chat, "stream": True})
            for resp in (r, s, o, os_):
                assert resp.status_code == 200 and SECRET not in resp.text, (text, resp.text)
            body = r.json()
            assert body["final"] == reading.final and body["outcome"] in {"withheld", "no_final", "malformed", "ok"}
            assert (body["outcome"] == "withheld") == (reading.status == "withheld"), (text, body)
            streamed, done = think_stream_final(s.text)
            assert done["final"] == reading.final and (reading.draft.strip() or "").startswith(streamed), (text, done)
            if reading.status != "withheld":
                assert streamed == reading.final
            message = o.json()["choices"][0]
            assert message["message"]["content"] == reading.final
            assert (message["finish_reason"] == "content_filter") == (reading.status == "withheld")
            content, reason = _openai_content(os_.text)
            assert reason == message["finish_reason"] and reading.draft.strip().startswith(content)
            finals.append(body["final"])
    assert statuses == {"final", "withheld", "no_final"}
    assert thinking_leak(texts, finals=finals) == {"thinking_leak_rate": 0.0}


HTTP_PATHS = ["/think", "/think SSE", "/v1/chat/completions", "/v1/chat/completions SSE"]


def http_paths(client):
    """{path: function(case) -> what the user of that route sees} over an httpx client of the echo server."""

    def post(body, route):
        r = client.post(route, json=body)
        assert r.status_code == 200, r.text
        return r

    def chat(case):
        return {"messages": [{"role": "user", "content": case.text}], "temperature": 0}

    return {
        "/think": lambda c: post({"query": c.text}, "/think").json()["final"],
        "/think SSE": lambda c: "".join(think_stream_final(post({"query": c.text, "stream": True}, "/think").text)[0]),
        "/v1/chat/completions": lambda c: post(chat(c), "/v1/chat/completions").json()["choices"][0]["message"][
            "content"],
        "/v1/chat/completions SSE": lambda c: _openai_content(post({**chat(c), "stream": True},
                                                                   "/v1/chat/completions").text)[0],
    }


def test_the_issue_20_classes_leak_on_no_http_route(echo_server):
    from leak_classes import CLASSES, STRUCTURAL, cases, leaked
    from leak_paths import run, table

    rng = random.Random(2021)
    case_list = [c for c in cases(rng, per_class=1) if c.position in ("inside_final", "before_final", "in_section")
                 or c.cls in STRUCTURAL]
    with httpx.Client(base_url=echo_server, headers={"Authorization": f"Bearer {SECRET_KEY}"}, timeout=60) as client:
        counts = run(case_list, http_paths(client), leaked)
    print("\n" + table(counts, HTTP_PATHS))
    classes = [*CLASSES, *STRUCTURAL]
    assert {c.cls for c in case_list} == set(classes)
    for path in HTTP_PATHS:
        assert sum(counts[c, path, "leaks"] for c in classes) == 0, table(counts, [path])
        live = sum(counts[c, path, "shown"] for c in classes)
        assert live >= 0.9 * sum(c.shown for c in case_list), (path, live)  # clean finals are still delivered
