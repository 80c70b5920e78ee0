"""Serve building blocks without HTTP: the streaming hold-back rule, API keys, the audit DB, metrics."""

import random
import sqlite3
import time
from types import SimpleNamespace

import pytest
import torch

from so8t_hf.serve.audit import AuditLog, AuditRow, Metrics
from so8t_hf.serve.auth import AuthError, KeyStore, hash_secret, parse_key_line
from so8t_hf.serve.engine import final_is_closed, visible_final_prefix
from so8t_hf.thinking import TAG_PRESETS, extract_final

SECRET = "SECRETMARK"

ADVERSARIAL = [
    f"<think-task>{SECRET} plan</think-task><final>The answer is 42 <think-policy>{SECRET}</think-policy> ok</final>",
    f"<final>answer <think-policy>{SECRET}</think-policy>",
    f"<think-task>{SECRET} never closed",
    f"<final>a < b and c <think-x>{SECRET}",
    f"<final>ans</final><think-task>{SECRET}</think-task>",
    f"<final>ans <|end|> after the turn {SECRET}",
    f"< final >x< think-task >{SECRET}< /think-task > y",
    f"<FINAL>x <THINK-Task>{SECRET}</think-task> y",
    f'<final>x <think-task attr="1">{SECRET}</think-task> y',
    f"<final>x <think-task/>{SECRET}",
    f"<final>x <think-task{SECRET}",
    f"<final>x <thinking>{SECRET}</thinking> z</final>",
    f"no final at all, just {SECRET}",
    f"<final>x </final {SECRET}",
    f"<final>caf\u00e9 <think-safety>{SECRET}",
]


def _check_prefixes(text: str, tags=TAG_PRESETS["default"]) -> None:
    """Every prefix's visible text is a prefix of the whole text's final, and of every later prefix's."""
    full = extract_final(text, tags)
    shown = ""
    for i in range(len(text) + 1):
        visible = visible_final_prefix(text[:i], tags)
        assert full.startswith(visible), (text, i, visible, full)
        assert visible.startswith(shown), (text, i, visible, shown)
        shown = visible


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_stream_hold_back_never_shows_thinking(text):
    _check_prefixes(text)
    for i in range(len(text) + 1):
        assert SECRET not in visible_final_prefix(text[:i])


def test_stream_hold_back_releases_text_as_soon_as_it_is_decided():
    assert visible_final_prefix("<final>The answer is 4") == "The answer is 4"
    assert visible_final_prefix("<final>The answer is 42 <thi") == "The answer is 42"  # '<thi' may be a tag
    assert visible_final_prefix("<final>a < b") == "a"  # held until '>' or the end...
    assert extract_final("<final>a < b") == "a < b"  # ...where the server flushes extract_final itself
    assert visible_final_prefix("<final>a < b > c") == "a < b > c"
    assert visible_final_prefix("<final>x\ufffd") == "x"  # incomplete UTF-8 waits


def test_stream_hold_back_fuzz():
    rng = random.Random(0)
    frags = ["<", ">", "</", "/>", "think", "-task", "-policy", "final", "<final>", "</final>", "<think-task>",
             "</think-task>", "<|end|>", "<|", "|>", "|", " ", "a", "b c", SECRET, "\n", "s>", "<s", "THINK", "x=1",
             "fin", "al", "\ufffd", "é"]
    for _ in range(400):
        _check_prefixes("".join(rng.choice(frags) for _ in range(rng.randint(1, 14))))
    reasoning = TAG_PRESETS["reasoning4"]
    _check_prefixes(f"<think-logic>{SECRET}</think-logic><final>ok <think-ethics>{SECRET}", reasoning)


@pytest.mark.parametrize("text, closed", [
    ("<final>a</final>", True), ("<final></final>", True), ("<think-task>x</think-task><final>a</final>", True),
    ("<think-task>x</final>", False), ("</final>", False), ("<final>a<think-task>b</final>", False),
])
def test_generation_stops_only_when_the_first_final_closes(text, closed):
    assert final_is_closed(text) == closed


# --------------------------------------------------------------------------------------------- keys
def test_key_lines_and_file(tmp_path):
    assert parse_key_line("alice:s3cret") == parse_key_line(f"alice:sha256={hash_secret('s3cret')}")
    assert parse_key_line("bob:x:revoked").revoked
    bare = parse_key_line("just-a-secret", allow_bare=True)
    assert bare.key_id == "key-" + hash_secret("just-a-secret")[:8]
    for bad in ["nocolon", "a:b:c", "bad id:x", "a:sha256=123", "a:", "a:b c"]:
        with pytest.raises(ValueError):
            parse_key_line(bad)
    f = tmp_path / "keys.txt"
    f.write_text("# comment\n\nalice:alice-secret\nmallory:mallory-secret:revoked\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        KeyStore(keys_file=_write(tmp_path / "bad.txt", "oops\n"))
    with pytest.raises(ValueError, match="no API keys"):
        KeyStore(keys_file=_write(tmp_path / "empty.txt", "# nothing\n"))
    store = KeyStore(["cli:cli-secret"], f)
    assert "alice-secret" not in repr(store.__dict__)  # only digests are kept
    assert store.authenticate("Bearer alice-secret").key_id == "alice"
    assert store.authenticate("bearer  cli-secret ").key_id == "cli"
    for header, status, code in [(None, 401, "missing_api_key"), ("Basic abc", 401, "invalid_authorization"),
                                 ("Bearer", 401, "invalid_authorization"), ("Bearer nope", 401, "invalid_api_key"),
                                 ("Bearer mallory-secret", 403, "revoked_api_key")]:
        with pytest.raises(AuthError) as err:
            store.authenticate(header)
        assert (err.value.status, err.value.code) == (status, code)
    f.write_text("alice:alice-secret:revoked\n")  # live revocation: the file is re-read when it changes
    time.sleep(1.1)
    with pytest.raises(AuthError) as err:
        store.authenticate("Bearer alice-secret")
    assert err.value.status == 403 and err.value.key_id == "alice"
    f.write_text("garbage line\n")  # a broken file keeps the last good keys
    time.sleep(1.1)
    with pytest.raises(AuthError):
        store.authenticate("Bearer alice-secret")
    assert store.authenticate("Bearer cli-secret").key_id == "cli"


def _write(path, text):
    path.write_text(text)
    return path


# -------------------------------------------------------------------------------------- audit, metrics
@pytest.mark.parametrize("store", [False, True])
def test_audit_log_is_wal_and_stores_thinking_only_when_asked(tmp_path, store):
    db = tmp_path / "audit.db"
    log = AuditLog(db, store_thinking=store)
    log.write(AuditRow("r1", time.time(), "/think", 200, "ok", 12.5, "alice", False, "ab" * 32, 2, 5, 7, "stop",
                       f"<think-task>{SECRET}</think-task><final>42</final>"))
    log.write(AuditRow("r2", time.time(), "/think", 401, "missing_api_key", 0.3))
    con = sqlite3.connect(db)  # readable while the writer is open (WAL)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = con.execute("SELECT request_id, key_id, status, generation_text FROM audit ORDER BY ts").fetchall()
    con.close()
    assert [r[:3] for r in rows] == [("r1", "alice", 200), ("r2", None, 401)]
    assert (SECRET in (rows[0][3] or "")) == store
    log.close()
    assert (SECRET.encode() in db.read_bytes()) == store
    with pytest.raises(RuntimeError):
        log.write(AuditRow("r3", time.time(), "/think", 200, "ok", 1.0))


def test_metrics_prometheus_text():
    m = Metrics()
    for i in range(10):
        m.record("/think", "ok" if i % 3 else "queue_full", 200 if i % 3 else 503, i / 10, 3, 4)
    text = m.prometheus(queue_depth=2, active=1, max_queue=8, audit_rows=10)
    assert 'so8t_requests_total{endpoint="/think",outcome="queue_full"} 4' in text
    assert 'so8t_responses_total{status="503"} 4' in text
    assert 'so8t_request_latency_seconds{quantile="0.5"} 0.500000' in text
    assert "so8t_request_latency_seconds_count 10" in text and "so8t_queue_depth 2" in text
    assert "so8t_completion_tokens_total 40" in text


# ---------------------------------------------------------------------------- a failing generation
class _FakeTokenizer:
    eos_token_id, pad_token_id, chat_template = 2, 0, "fake"

    def get_vocab(self):
        return {"</final>": 5, "<|end|>": 2}

    def apply_chat_template(self, messages, **kwargs):
        return "prompt"

    def encode(self, text, add_special_tokens=False):
        return [1, 3, 4]

    def decode(self, ids, **kwargs):
        return f"<think-task>{SECRET}"


class _FailingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=1000)

    def generate(self, **kwargs):
        raise RuntimeError(f"generation blew up while holding {SECRET}")


@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_generation_is_a_fixed_500_and_logs_no_text(tmp_path, caplog, stream):
    from fastapi.testclient import TestClient

    from so8t_hf.serve.app import ServeSettings, create_app
    from so8t_hf.serve.engine import GenerationEngine

    audit = AuditLog(tmp_path / "audit.db")
    app = create_app(GenerationEngine(_FailingModel(), _FakeTokenizer()), KeyStore(["k:s"]), audit, ServeSettings())
    with caplog.at_level("DEBUG"), TestClient(app) as client:
        r = client.post("/think", json={"query": "q", "stream": stream}, headers={"Authorization": "Bearer s"})
        rid = r.headers["X-Request-ID"]
    if stream:
        assert r.status_code == 200 and "event: error" in r.text and "generation_failed" in r.text
    else:
        assert r.status_code == 500 and r.json()["error"]["type"] == "generation_failed"
    assert SECRET not in r.text and SECRET not in caplog.text and "RuntimeError" in caplog.text
    con = sqlite3.connect(tmp_path / "audit.db")
    row = con.execute("SELECT status, outcome FROM audit WHERE request_id=?", (rid,)).fetchone()
    assert row == (500, "generation_failed")
    con.close()
