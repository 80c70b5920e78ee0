"""The /think service over real HTTP on loopback: auth, limits, leaks, SSE, audit rows, load.

One uvicorn subprocess serves the scripted tiny demo model (tests/serve_helpers.py), whose greedy
generation is `<think-task>SECRETMARK plan</think-task><final>The answer is 42 <think-policy>
SECRETMARK</think-policy> ok</final>` with the second thinking tag spelled out in ordinary tokens;
`max_new_tokens=k` cuts it anywhere (unterminated thinking, no final, a half-spelled tag).
SECRETMARK must never reach a response, a stream, an error, the server log or the audit DB.
"""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import (
    PHI35_TOKENIZER,
    SECRET,
    audit_rows,
    metric,
    shared_demo_model,
    sse_events,
    start_server,
    think_stream_final,
)

from so8t_hf.serve.auth import hash_secret
from so8t_hf.thinking import extract_final, thinking_hash

pytestmark = pytest.mark.skipif(not PHI35_TOKENIZER.is_dir(),
                                reason=f"Phi-3.5 tokenizer fixture not found at {PHI35_TOKENIZER}")

ALICE = {"Authorization": "Bearer alice-secret"}
CAP, BODY, MESSAGES, INPUT_TOKENS, QUEUE = 64, 4096, 4, 64, 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return shared_demo_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve-http")
    keys = work / "keys.txt"
    keys.write_text(f"# test keys\nalice:alice-secret\nbob:sha256={hash_secret('bob-secret')}\n"
                    "mallory:mallory-secret:revoked\n")
    srv = start_server(demo.path, work, [
        "--api-keys-file", str(keys), "--api-key", "cli-secret", "--torch-threads", "1", "--max-queue", str(QUEUE),
        "--max-new-tokens-cap", str(CAP), "--default-max-new-tokens", "48", "--max-body-bytes", str(BODY),
        "--max-messages", str(MESSAGES), "--max-input-tokens", str(INPUT_TOKENS)], name="http")
    srv.keys_file = keys
    yield srv
    assert srv.terminate() == 0


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def rows_by_id(server):
    return {r["request_id"]: r for r in audit_rows(server.audit_db)}


def test_healthz_and_metrics(client):
    import statistics
    import time

    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        client.get("/healthz")
        times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 0.03  # no Nagle / delayed-ACK stall (>= 40 ms) on the server socket
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    assert metric(m.text, "so8t_queue_capacity") == QUEUE and "so8t_queue_depth" in m.text


def test_auth_401_403_200_and_audit_key_ids(server, client):
    q = {"query": "hi", "max_new_tokens": 2}
    cases = [({}, 401, "missing_api_key"), ({"Authorization": "Basic YTpi"}, 401, "invalid_authorization"),
             ({"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
             ({"Authorization": "Bearer mallory-secret"}, 403, "revoked_api_key")]
    ids = {}
    for headers, status, code in cases:
        r = client.post("/think", json=q, headers=headers)
        assert r.status_code == status and r.json()["error"]["type"] == code
        assert ("WWW-Authenticate" in r.headers) == (status == 401)
        ids[r.json()["error"]["request_id"]] = (None if status == 401 else "mallory", status)
    cli_id = "key-" + hash_secret("cli-secret")[:8]
    for secret, key_id in [("alice-secret", "alice"), ("bob-secret", "bob"), ("cli-secret", cli_id)]:
        r = client.post("/think", json=q, headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 200, r.text
        ids[r.json()["request_id"]] = (key_id, 200)
    rows = rows_by_id(server)
    assert {rid: (rows[rid]["key_id"], rows[rid]["status"]) for rid in ids} == ids


def test_keys_file_is_reloaded_for_live_revocation(server, client):
    import time

    original = server.keys_file.read_text()
    try:
        server.keys_file.write_text(original + "carol:carol-secret\n")
        time.sleep(1.2)
        assert client.post("/think", json={"query": "hi", "max_new_tokens": 1},
                           headers={"Authorization": "Bearer carol-secret"}).status_code == 200
        server.keys_file.write_text(original + "carol:carol-secret:revoked\n")
        time.sleep(1.2)
        assert client.post("/think", json={"query": "hi", "max_new_tokens": 1},
                           headers={"Authorization": "Bearer carol-secret"}).status_code == 403
    finally:
        server.keys_file.write_text(original)


def _msgs(n):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(n)]


LIMIT_CASES = [
    ("/think", b"x" * (BODY + 1), 413, "body_too_large"),
    ("/think", (b'{"query": "' + b"a" * BODY + b'"}'), 413, "body_too_large"),
    ("/think", b'{"query": ', 400, "invalid_json"),
    ("/think", b"\xff\xfe{}", 400, "invalid_json"),
    ("/think", b"", 400, "invalid_json"),
    ("/think", b"[1, 2]", 422, "invalid_request"),
    ("/think", {}, 422, "invalid_request"),
    ("/think", {"query": "a", "messages": _msgs(1)}, 422, "invalid_request"),
    ("/think", {"messages": []}, 422, "invalid_request"),
    ("/think", {"messages": [{"role": "tool", "content": "x"}]}, 422, "invalid_request"),
    ("/think", {"messages": [{"role": "user"}]}, 422, "invalid_request"),
    ("/think", {"query": 5}, 422, "invalid_request"),
    ("/think", {"query": "hi", "bogus": 1}, 422, "invalid_request"),
    ("/think", {"query": "hi", "max_new_tokens": 0}, 422, "invalid_request"),
    ("/think", {"query": "hi", "temperature": -1}, 422, "invalid_request"),
    ("/think", {"query": "hi", "top_p": 0}, 422, "invalid_request"),
    ("/think", {"query": "hi", "max_new_tokens": CAP + 1}, 422, "max_new_tokens_over_cap"),
    ("/think", {"messages": _msgs(MESSAGES + 1)}, 422, "too_many_messages"),
    ("/think", {"query": "word " * (INPUT_TOKENS + 10)}, 422, "too_many_input_tokens"),
    ("/v1/chat/completions", {"messages": _msgs(1), "n": 2}, 422, "invalid_request"),
    ("/v1/chat/completions", {"messages": _msgs(1), "stop": ["x"]}, 422, "invalid_request"),
    ("/v1/chat/completions", {"messages": "hi"}, 422, "invalid_request"),
    ("/v1/chat/completions", {"messages": _msgs(1), "max_tokens": CAP + 1}, 422, "max_new_tokens_over_cap"),
    ("/v1/chat/completions", {"messages": _msgs(MESSAGES + 1)}, 422, "too_many_messages"),
]


@pytest.mark.parametrize("path, body, status, code", LIMIT_CASES)
def test_limits_give_4xx_json(server, client, path, body, status, code):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=raw, headers={**ALICE, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == code and err["message"] and err["request_id"] == r.headers["X-Request-ID"]
    assert "Traceback" not in r.text and "input" not in err
    row = rows_by_id(server)[err["request_id"]]
    assert (row["status"], row["outcome"], row["key_id"]) == (status, code, "alice")


def test_chunked_body_over_limit_and_unknown_routes(client):
    r = client.post("/think", content=iter([b'{"query": "', b"a" * BODY, b'"}']), headers=ALICE)  # no Content-Length
    assert r.status_code == 413 and r.json()["error"]["type"] == "body_too_large"
    assert client.get("/nope").status_code == 404 and client.get("/nope").json()["error"]["type"] == "not_found"
    assert client.get("/think", headers=ALICE).status_code == 405


def test_final_only_hash_and_usage(server, client, demo):
    end = demo.script.index(demo.script[-2]) + 1  # generation stops once </final> closes the answer
    r = client.post("/think", json={"query": "What is 6*7?"}, headers=ALICE).json()
    assert r["final"] == extract_final(demo.text) == "The answer is 42  ok"
    assert r["thinking_sha256"] == thinking_hash(demo.text)  # the model really generated the secret thinking
    assert r["usage"]["completion_tokens"] == end and r["finish_reason"] == "stop"
    sampled = client.post("/think", json={"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "6*7?"}], "temperature": 0.8, "top_p": 0.9}, headers=ALICE)
    assert sampled.json()["final"] == r["final"]
    o = client.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "6*7?"}]}], "max_tokens": 40, "user": "ignored"}, headers=ALICE)
    body = o.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": r["final"]}
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == end
    for text in (json.dumps(r), sampled.text, o.text):
        assert SECRET not in text
    row = rows_by_id(server)[r["request_id"]]
    assert row["thinking_sha256"] == r["thinking_sha256"] and row["final_chars"] == len(r["final"])
    assert row["generation_text"] is None and row["completion_tokens"] == end and row["latency_ms"] > 0


def test_every_truncation_of_a_malformed_generation_leaks_nothing(client, demo):
    outcomes = set()
    for k in range(1, len(demo.script) + 1):
        expected = extract_final(demo.text_of(k))
        r = client.post("/think", json={"query": "q", "max_new_tokens": k}, headers=ALICE)
        s = client.post("/think", json={"query": "q", "max_new_tokens": k, "stream": True}, headers=ALICE)
        o = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}], "max_tokens": k,
                        "stream": True, "temperature": 0}, headers=ALICE)
        for resp in (r, s, o):
            assert resp.status_code == 200 and SECRET not in resp.text, (k, resp.text)
        assert r.json()["final"] == expected, k
        streamed, done = think_stream_final(s.text)
        assert streamed == expected == done["final"], (k, streamed)
        content = "".join(json.loads(d)["choices"][0]["delta"].get("content", "")
                          for _, d in sse_events(o.text) if d != "[DONE]")
        assert content == expected, (k, content)
        outcomes.add(r.json()["outcome"])
    assert {"no_final", "truncated", "malformed"} <= outcomes


def test_sse_formats(client):
    with client.stream("POST", "/think", json={"query": "q", "stream": True}, headers=ALICE) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = sse_events(text)
    assert [n for n, _ in events][-1] == "done" and all(n == "delta" for n, _ in events[:-1]) and len(events) > 2
    done = json.loads(events[-1][1])
    assert set(done) >= {"final", "thinking_sha256", "usage", "request_id"}
    assert done["request_id"] == r.headers["X-Request-ID"]
    o = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}], "stream": True},
                    headers=ALICE)
    chunks = [d for _, d in sse_events(o.text)]
    assert chunks[-1] == "[DONE]"
    first, last = json.loads(chunks[0]), json.loads(chunks[-2])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant"}
    assert last["choices"][0]["finish_reason"] == "stop"


def test_client_disconnect_mid_stream_is_audited(server, client):
    import time

    with client.stream("POST", "/think", json={"query": "q", "stream": True}, headers=ALICE) as r:
        rid = r.headers["X-Request-ID"]
        next(r.iter_lines())
    for _ in range(100):
        row = rows_by_id(server).get(rid)
        if row:
            break
        time.sleep(0.05)
    assert row is not None and row["outcome"] in ("client_disconnected", "malformed")  # tiny model may finish first


def _post(url, i):
    path = "/think" if i % 3 else "/v1/chat/completions"
    body = {"query": f"q{i}", "max_new_tokens": 8 + i % 24, "stream": i % 2 == 0}
    if path != "/think":
        body = {"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 8 + i % 24, "stream": i % 2 == 0}
    r = httpx.post(url + path, json=body, headers=ALICE, timeout=120)
    return r.status_code, r.headers.get("X-Request-ID"), r.text, r.headers.get("Retry-After")


def test_burst_audit_rows_equal_requests(server):
    before = len(audit_rows(server.audit_db))
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: _post(server.url, i), range(24)))
    rows = rows_by_id(server)
    assert len(rows) == before + 24
    for status, rid, text, _ in results:
        assert status in (200, 503) and rows[rid]["status"] == status and SECRET not in text


def test_50_concurrent_clients(server, client):
    before_rows = len(audit_rows(server.audit_db))
    before = client.get("/metrics").text

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=60)) as ac:
            body = {"query": "q", "max_new_tokens": CAP}
            return await asyncio.gather(*[ac.post("/think", json=body, headers=ALICE) for _ in range(50)])

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 1, codes
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["type"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
        else:
            assert r.json()["final"] == "The answer is 42  ok"
    assert len(audit_rows(server.audit_db)) == before_rows + 50
    after = client.get("/metrics").text
    delta = metric(after, "so8t_requests_total", endpoint="/think", outcome="queue_full") - \
        metric(before, "so8t_requests_total", endpoint="/think", outcome="queue_full")
    assert delta == codes.count(503)
    count = "so8t_request_latency_seconds_count"
    assert metric(after, count) - metric(before, count) == 50
    assert metric(after, "so8t_in_flight_requests") == 0 and client.get("/healthz").status_code == 200


def test_zz_secret_is_nowhere_on_disk_or_in_logs(server):
    """Last in this module: the log and every byte of the audit DB (and its WAL) after all of the above."""
    rows = audit_rows(server.audit_db)
    assert len(rows) > 100 and all(r["generation_text"] is None for r in rows)
    assert SECRET not in json.dumps(rows)
    for path in server.audit_db.parent.glob(server.audit_db.name + "*"):
        assert SECRET.encode() not in path.read_bytes(), path
    log = server.log_text()
    assert "request_id=" in log and "thinking_sha256=" in log and SECRET not in log
