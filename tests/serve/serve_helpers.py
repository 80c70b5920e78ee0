"""Helpers for the serve tests and benchmark: a scripted tiny demo model and a uvicorn subprocess.

The scripted model is a real tiny SO8T-Phi3 (vocab 32,064, hidden 64, 2 layers) with the Phi-3.5
tokenizer fixture, the thinking tags and chat template, whose greedy output is a chosen token
script whatever the prompt: every layer's `o_proj` and `down_proj` are zero, so the last hidden
state is the normalised embedding of the current token; the script's tokens get orthogonal
(one-hot) embeddings, and `lm_head` maps token i's one-hot to a large logit for token i+1. So the
next token depends only on the current one, and the prompt's last token (`<|assistant|>`) starts
the script. Every script token id is distinct (text is spelled with unused vocabulary pieces when a
piece repeats).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from paths import PHI35_TOKENIZER, REPO

SECRET = "SECRETMARK"
ASSISTANT_ID = 32001  # <|assistant|>: the last prompt token, so the script's start

# The generation: thinking with the secret (between the tag tokens; the grammar reads tags as their ids, so a
# closing tag spelled in ordinary pieces would leave the section open and withhold the answer), then a clean
# final answer with a literal "<", the final's closing tag and the end.
SCRIPT_PIECES = [
    ("tok", "<think-task>"), ("text", f"{SECRET} plan"), ("tok", "</think-task>"),
    ("tok", "<final>"), ("text", "The answer is 42 (a < b)"), ("tok", "</final>"), ("tok", "<|end|>"),
]
FINAL = "The answer is 42 (a < b)"


@dataclass
class DemoModel:
    path: Path
    script: list[int]  # generated ids, in order, ending with <|end|>
    text: str  # decode(script)

    def text_of(self, n: int) -> str:
        """The decoded first n generated tokens (what max_new_tokens=n generates)."""
        from transformers import AutoTokenizer

        tok = _tokenizer_cache.get(self.path) or AutoTokenizer.from_pretrained(self.path)
        _tokenizer_cache[self.path] = tok
        return tok.decode(self.script[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False)


_tokenizer_cache: dict[Path, object] = {}


def _spell(text: str, vocab: dict[str, int], used: set[int]) -> list[int]:
    """Ids of ordinary vocabulary pieces, none in `used`, that spell `text` (spaces as '▁'); longest first."""
    target = text.replace(" ", "\u2581")
    by_first: dict[str, list[tuple[str, int]]] = {}
    for piece, i in vocab.items():
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        if byte and int(byte.group(1), 16) < 0x80:  # byte fallback: the same character, another id
            piece = chr(int(byte.group(1), 16))
        elif i >= 32000 or not piece or (piece.startswith("<") and piece.endswith(">") and len(piece) > 1):
            continue
        by_first.setdefault(piece[0], []).append((piece, i))
    for pieces in by_first.values():
        pieces.sort(key=lambda p: -len(p[0]))  # stable: real pieces before byte pieces of the same length

    def dfs(pos: int, taken: set[int]) -> list[int] | None:
        if pos == len(target):
            return []
        for piece, i in by_first.get(target[pos], []):
            if i not in taken and target.startswith(piece, pos):
                rest = dfs(pos + len(piece), taken | {i})
                if rest is not None:
                    return [i, *rest]
        return None

    ids = dfs(0, set(used))
    if ids is None:
        raise ValueError(f"cannot spell {text!r} with unused pieces")
    return ids


def build_demo_model(out_dir: str | Path, pieces=SCRIPT_PIECES, seed: int = 0) -> DemoModel:
    """Save the scripted tiny SO8T-Phi3 (weights, tokenizer with thinking tokens, chat template) to out_dir."""
    from tiny_models import tiny_so8t
    from transformers import AutoTokenizer

    from so8t_hf.thinking.chat_template import (
        add_thinking_tokens,
        apply_thinking_chat_template,
    )

    out_dir = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(PHI35_TOKENIZER)
    model = tiny_so8t(seed, vocab_size=32064, pad_token_id=32000, eos_token_id=32000, bos_token_id=1,
                      max_position_embeddings=1024)
    add_thinking_tokens(tok, model)
    apply_thinking_chat_template(tok)
    vocab = tok.get_vocab()
    script: list[int] = []
    for kind, value in pieces:
        script += [vocab[value]] if kind == "tok" else _spell(value, vocab, {ASSISTANT_ID, *script})
    chain = [ASSISTANT_ID, *script[:-1]]  # current token -> next token
    hidden = model.config.hidden_size
    assert len(set(chain)) == len(chain) <= hidden, "script tokens must be distinct and at most hidden_size"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight  # (V, H) both
        head.zero_()
        for j, (cur, nxt) in enumerate(zip(chain, script)):
            emb[cur].zero_()
            emb[cur, j] = 1.0
            head[nxt, j] = 8.0  # logit 8 * 8 = 64 for the next token, 0 for every other
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    text = tok.decode(script, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return DemoModel(out_dir, script, text)


# ------------------------------------------------------------------------------------ server process
@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    audit_db: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def start_server(model_dir: Path, work: Path, args: list[str], name: str = "server", timeout: float = 120.0,
                 env: dict[str, str] | None = None) -> Server:
    """Run `python -m so8t_hf.serve` on 127.0.0.1 with a free port; wait until /healthz answers."""
    import httpx

    work.mkdir(parents=True, exist_ok=True)
    log, db = work / f"{name}.log", work / f"{name}-audit.db"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           **(env or {})}
    cmd = [sys.executable, "-m", "so8t_hf.serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0",
           "--audit-db", str(db), "--device", "cpu", *args]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        if url is None:
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
            url = m.group(1) if m else None
        if url is not None:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return Server(proc, url, log, db)
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start in {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def run_serve_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m so8t_hf.serve ARGS` to completion (start-up errors), output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "so8t_hf.serve", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def audit_rows(db: Path) -> list[dict]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM audit ORDER BY ts")]
    finally:
        con.close()


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name or None, data) per server-sent event."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        events.append((name, "\n".join(data)))
    return events


def think_stream_final(text: str) -> tuple[str, dict]:
    """The concatenated deltas and the done event's body of a /think SSE stream."""
    deltas, done = [], {}
    for name, data in sse_events(text):
        if name == "delta":
            deltas.append(json.loads(data)["text"])
        elif name == "done":
            done = json.loads(data)
        elif name == "error":
            done = {"error": json.loads(data)}
    return "".join(deltas), done


def metric(text: str, name: str, **labels: str) -> float:
    """A Prometheus sample's value (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.eE+-]+)$"
    m = re.search(pat, text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


_SHARED: dict[str, DemoModel] = {}


def shared_demo_model(tmp_path_factory) -> DemoModel:
    """One scripted demo model per test session (the serve test modules share it)."""
    if "demo" not in _SHARED:
        _SHARED["demo"] = build_demo_model(tmp_path_factory.mktemp("serve-demo") / "model")
    return _SHARED["demo"]
