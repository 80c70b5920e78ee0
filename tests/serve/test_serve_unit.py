"""Serve building blocks without HTTP: the streaming hold-back rule, API keys, the audit DB, metrics."""

import hashlib
import random
import sqlite3
import time
from types import SimpleNamespace

import pytest
import torch
from paths import PHI35_TOKENIZER

from so8t_hf.serve.audit import AuditLog, AuditRow, Metrics
from so8t_hf.serve.auth import AuthError, KeyStore, hash_secret, key_entry, parse_key_line
from so8t_hf.serve.engine import final_is_closed, visible_final_prefix
from so8t_hf.thinking import TAG_PRESETS, extract_final, read_final

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
    """A prefix shows something only once its output is over (a turn end after the final), and then exactly
    the final of the whole text, which is shown: a stream never shows text of a withheld output."""
    full = read_final(text, tags)
    for i in range(len(text) + 1):
        visible = visible_final_prefix(text[:i], tags)
        if visible:
            assert full.status == "final" and visible == full.final, (text, i, visible, full)


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_stream_hold_back_never_shows_thinking(text):
    _check_prefixes(text)
    for i in range(len(text) + 1):
        assert SECRET not in visible_final_prefix(text[:i])


def test_stream_hold_back_releases_text_as_soon_as_it_is_decided():
    """Any later token could still withhold a final, so it is released only once the output is over."""
    assert visible_final_prefix("<final>The answer is 4") == ""
    assert visible_final_prefix("<final>The answer is 42</final>") == ""  # text could still follow
    assert visible_final_prefix("<final>The answer is 42</final>", complete=True) == "The answer is 42"
    assert visible_final_prefix("<final>a < b</final>\n<|end|>") == "a < b" == extract_final("<final>a < b</final>")
    assert visible_final_prefix("<final>a <think> b</final><|end|>") == ""  # withheld: nothing, ever
    assert visible_final_prefix("<final>a</final> more<|end|>") == ""


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
A, B, C, M = "alice-secret-key-01", "bob-secret-key-0001", "cli-secret-key-0001", "mallory-secret-key1"


def test_key_lines_and_file(tmp_path, caplog):
    assert parse_key_line(f"alice:{A}") == parse_key_line(f"alice:sha256={hash_secret(A)}:chars={len(A)}")
    assert parse_key_line(key_entry("alice", A)) == parse_key_line(f"alice:{A}")
    assert parse_key_line(f"bob:sha256={hash_secret(B)}:chars=19:revoked").revoked
    assert parse_key_line(f"bob:{B}:revoked").revoked
    bare = parse_key_line("just-a-secret-of-20c", allow_bare=True)
    assert bare.key_id == "key-" + hash_secret("just-a-secret-of-20c")[:8]
    assert parse_key_line("u:\u043a\u043b\u044e\u0447-\u0441\u0435\u043a\u0440\u0435\u0442-1234567").digest == \
        hashlib.sha256("\u043a\u043b\u044e\u0447-\u0441\u0435\u043a\u0440\u0435\u0442-1234567".encode()).hexdigest()
    for bad, why in [("nocolon-but-long-enough", "expected"), ("a:b:c", "expected"), ("bad id:" + A, "key id"),
                     ("a:sha256=123", "64 hex"), ("a:", "empty secret"), ("a:b c d e f g h i j", "whitespace"),
                     ("a:x", "has 1 characters; use at least 16"), ("a:tab\tseparated-secret", "whitespace"),
                     ("a:ctrl\x01-secret-secret", "control"),
                     # a digest alone cannot show its secret's length: it must be stated, and long enough
                     (f"a:sha256={hash_secret('short')}", "cannot show how long"),
                     (f"a:sha256={hash_secret('short')}:revoked", "cannot show how long"),
                     (f"a:sha256={hash_secret('short')}:chars=5", r"has 5 characters \(chars=5\); use at least 16"),
                     (f"a:sha256={hash_secret(A)}:chars=x", "expected"), (f"a:{A}:chars=19", "expected")]:
        with pytest.raises(ValueError, match=why):
            parse_key_line(bad)
    with pytest.raises(ValueError, match="has 1 characters"):
        KeyStore(["x"])
    with pytest.raises(ValueError, match="has 5 characters"):
        key_entry("a", "short")
    f = tmp_path / "keys.txt"
    f.write_text(f"# comment\n\nalice:{A}\nmallory:{M}:revoked\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        KeyStore(keys_file=_write(tmp_path / "bad.txt", "oops\n"))
    with pytest.raises(ValueError, match="no API keys"):
        KeyStore(keys_file=_write(tmp_path / "empty.txt", "# nothing\n"))
    with pytest.raises(ValueError, match=r"\$SO8T_API_KEYS entry:2: the secret of key 'e' has 5"):
        KeyStore(env_keys=f"d:{A}\ne:short")
    store = KeyStore([f"cli:{C}"], f, env_keys=f" env:{B}  ")
    assert A not in repr(store.__dict__) and C not in repr(store.__dict__)  # only digests are kept
    assert store.authenticate(f"Bearer {A}").key_id == "alice"
    assert store.authenticate(f"bearer  {C} ").key_id == "cli"
    assert store.authenticate([f"Bearer {B}"]).key_id == "env"
    for header, status, code in [(None, 401, "missing_api_key"), ("Basic abc", 401, "invalid_authorization"),
                                 ("Bearer", 401, "invalid_authorization"), ("Bearer nope", 401, "invalid_api_key"),
                                 (f"Bearer {M}", 403, "revoked_api_key"), ([f"Bearer {A}"] * 2, 400,
                                                                          "duplicate_authorization")]:
        with pytest.raises(AuthError) as err:
            store.authenticate(header)
        assert (err.value.status, err.value.code) == (status, code)
    utf8 = "\u5bc6\u94a5-\u043a\u043b\u044e\u0447-0123456789"
    f.write_text(f"alice:{A}\nutf8:{utf8}\n", encoding="utf-8")
    time.sleep(1.1)
    latin1_view = ("Bearer " + utf8).encode("utf-8").decode("latin-1")  # what starlette hands over
    assert store.authenticate(latin1_view).key_id == "utf8"
    f.write_text(f"alice:{A}:revoked\n")  # live revocation: the file is re-read when it changes
    time.sleep(1.1)
    with pytest.raises(AuthError) as err:
        store.authenticate(f"Bearer {A}")
    assert err.value.status == 403 and err.value.key_id == "alice"
    f.write_text(f"alice:{A}\ngarbage line\n")  # a broken line no longer keeps the old keys: the good lines count
    time.sleep(1.1)
    with caplog.at_level("ERROR", logger="so8t_hf.serve"):
        assert store.authenticate(f"Bearer {A}").key_id == "alice"
    assert f"{f}:2: expected key_id:secret" in caplog.text
    f.write_text(f"mallory:{M}:revokd\n")  # a typo in a revocation grants nothing either
    time.sleep(1.1)
    for secret in (A, M):
        with pytest.raises(AuthError):
            store.authenticate(f"Bearer {secret}")
    f.write_text(f"alice:{A}\n")
    time.sleep(1.1)
    assert store.authenticate(f"Bearer {A}").key_id == "alice"
    f.unlink()  # a deleted file means no keys from it
    time.sleep(1.1)
    with caplog.at_level("WARNING", logger="so8t_hf.serve"), pytest.raises(AuthError):
        store.authenticate(f"Bearer {A}")
    assert "is gone" in caplog.text and store.authenticate(f"Bearer {C}").key_id == "cli"


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
    app = create_app(GenerationEngine(_FailingModel(), _FakeTokenizer()), KeyStore([f"k:{A}"]), audit, ServeSettings())
    with caplog.at_level("DEBUG"), TestClient(app) as client:
        r = client.post("/think", json={"query": "q", "stream": stream}, headers={"Authorization": f"Bearer {A}"})
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


def test_an_audit_write_still_lands_when_its_request_is_cancelled_while_it_waits(tmp_path):
    """A client that disconnects cancels its handler; a write queued behind others on the audit thread must still
    run (before, the cancelled future took the queued write with it and the stream's row stayed `streaming`)."""
    import asyncio
    import threading

    from so8t_hf.serve.audit import AuditRow

    log = AuditLog(tmp_path / "audit.db")
    busy = threading.Event()

    async def scenario():
        blocker = asyncio.ensure_future(log.run(busy.wait, 10))  # the audit thread is busy with another write
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(log.run(log.write, AuditRow("r1", 1.0, "/think", 200, "ok", 1.0)))
        await asyncio.sleep(0.05)
        waiting.cancel()  # the request's task is cancelled (client gone) while its write is still queued
        busy.set()
        await blocker
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await log.run(lambda: None)  # everything queued before this has run

    asyncio.run(scenario())
    con = sqlite3.connect(tmp_path / "audit.db")
    assert con.execute("SELECT outcome FROM audit WHERE request_id='r1'").fetchall() == [("ok",)]
    con.close()
    log.close()


# ------------------------------------------------------------------------ audit start-up checks, aggregation
def test_audit_open_names_the_path_and_the_cause(tmp_path):
    from so8t_hf.serve.audit import AuditError

    (tmp_path / "a-file").write_text("x")
    (tmp_path / "not-a-db").write_bytes(b"this is not sqlite" * 100)
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE audit (id INTEGER, what TEXT)")
    con.close()
    cases = [(tmp_path, "it is a directory"), (tmp_path / "a-file" / "audit.db", "a-file is a file, not a folder"),
             (tmp_path / "not-a-db", "file is not a database"), (foreign, "not an so8t_hf audit table"),
             ("/proc/so8t-audit.db", "audit DB /proc/so8t-audit.db: ")]
    for path, cause in cases:
        with pytest.raises(AuditError) as err:
            AuditLog.open(path)
        message = str(err.value)
        assert message.startswith(f"audit DB {path}: ") and cause in message and "\n" not in message, message


def test_a_02_audit_table_gains_the_new_columns(tmp_path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript("""CREATE TABLE audit (request_id TEXT PRIMARY KEY, ts REAL NOT NULL, ts_iso TEXT NOT NULL,
        endpoint TEXT NOT NULL, key_id TEXT, status INTEGER NOT NULL, outcome TEXT NOT NULL, stream INTEGER NOT NULL,
        thinking_sha256 TEXT, final_chars INTEGER, prompt_tokens INTEGER, completion_tokens INTEGER,
        finish_reason TEXT, latency_ms REAL NOT NULL, generation_text TEXT);
        INSERT INTO audit VALUES ('old', 1, 'x', '/think', 'a', 200, 'ok', 0, 'ab', 1, 1, 1, 'stop', 1.0, NULL);""")
    con.commit()
    con.close()
    log = AuditLog.open(db)
    log.write(AuditRow("new", time.time(), "/think", 200, "ok", 2.0, thinking_hmac="cd"))
    log.close()
    con = sqlite3.connect(db)
    assert con.execute("SELECT request_id, thinking_hmac, count FROM audit ORDER BY ts").fetchall() == [
        ("old", None, 1), ("new", "cd", 1)]
    con.close()


def test_unauthenticated_counts_are_committed_into_aggregate_rows_at_once(tmp_path):
    db = tmp_path / "audit.db"
    log = AuditLog.open(db, busy_timeout=0.1, aggregate_seconds=3600)
    t = 7200.0 * 1000  # one bucket
    for i in range(250):
        log.count_unauthenticated("/think", 401, "invalid_api_key" if i % 2 else "missing_api_key", t + i, 1.0 + i % 2)
    assert log.rows_written == 2  # one row per outcome and bucket...

    def rows():
        con = sqlite3.connect(db)  # another connection, as after a kill -9: every count is committed already
        try:
            sql = "SELECT endpoint, status, outcome, count, latency_ms FROM audit ORDER BY outcome"
            return con.execute(sql).fetchall()
        finally:
            con.close()

    assert rows() == [("/think", 401, "invalid_api_key", 125, 2.0), ("/think", 401, "missing_api_key", 125, 1.0)]
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError):
        log.count_unauthenticated("/think", 401, "missing_api_key", t, 1.0)
    assert not log.healthy and not log.probe()
    lock.execute("ROLLBACK")
    assert log.probe() and log.healthy
    log.count_unauthenticated("/v1/chat/completions", 400, "duplicate_authorization", t, 1.0)
    log.count_unauthenticated("/think", 401, "missing_api_key", t + 3600, 1.0)  # the next bucket: a new row
    log.close()
    assert [r[:4] for r in rows()] == [("/v1/chat/completions", 400, "duplicate_authorization", 1),
                                       ("/think", 401, "invalid_api_key", 125), ("/think", 401, "missing_api_key", 125),
                                       ("/think", 401, "missing_api_key", 1)]


def test_a_deleted_or_replaced_audit_db_is_created_anew(tmp_path, caplog):
    db = tmp_path / "audit.db"
    log = AuditLog.open(db)
    log.write(AuditRow("r1", time.time(), "/think", 200, "ok", 1.0))
    for path in tmp_path.glob("audit.db*"):
        path.unlink()
    with caplog.at_level("ERROR", logger="so8t_hf.serve"):
        log.write(AuditRow("r2", time.time(), "/think", 200, "ok", 1.0))
    assert log.recreated == 1 and "was deleted or replaced" in caplog.text
    db.rename(tmp_path / "moved.db")  # rotated away: the next check notices it without a write
    assert log.check() and log.recreated == 2 and db.exists()
    log.write(AuditRow("r3", time.time(), "/think", 200, "ok", 1.0, stream=True))
    log.write(AuditRow("r3", time.time(), "/think", 200, "ok", 2.0, stream=True), update=True)  # a stream's end
    log.close()
    con = sqlite3.connect(db)
    assert con.execute("SELECT request_id, latency_ms FROM audit").fetchall() == [("r3", 2.0)]
    con.close()
    assert log.rows_written == 3


# ------------------------------------------------------------------------------- engine: content, Retry-After
def _phi35_engine(special: bool):
    from transformers import AddedToken, AutoTokenizer

    from so8t_hf.serve.engine import GenerationEngine
    from so8t_hf.thinking import DEFAULT_TAGS
    from so8t_hf.thinking.chat_template import add_thinking_tokens, apply_thinking_chat_template

    tok = AutoTokenizer.from_pretrained(PHI35_TOKENIZER)
    if special:  # as 0.1 tokenizers hold them
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in DEFAULT_TAGS.tokens], special_tokens=True)
    else:  # as add_thinking_tokens adds them now: NON-special (skip_special_tokens keeps them)
        add_thinking_tokens(tok)
    apply_thinking_chat_template(tok)
    return GenerationEngine(_FailingModel(), tok), tok


@pytest.mark.parametrize("special", [True, False])
def test_content_with_control_tokens_is_refused_whatever_the_tags_special_flag(special):
    from so8t_hf.serve.engine import ForbiddenContent

    if not PHI35_TOKENIZER.is_dir():
        pytest.skip("Phi-3.5 tokenizer fixture not found")
    engine, tok = _phi35_engine(special)
    final_id = tok.encode("<final>", add_special_tokens=False)
    assert len(final_id) == 1 and ("<final>" in tok.decode(final_id, skip_special_tokens=True)) != special
    for content in ["<|assistant|>", "x<|system|>y", "<|end|>", "<|endoftext|>", "</s>", "<final>", "</think-task>",
                    "<think-policy>", "<|placeholder3|>"]:
        with pytest.raises(ForbiddenContent) as err:
            engine.encode_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                                    {"role": "user", "content": content}])
        assert err.value.index == 2 and err.value.token in content
    ids = engine.encode_messages([{"role": "user", "content": "what is \uff1cfinal\uff1e, <Final> or <|end ?"}])
    roles = [tok.convert_tokens_to_ids(t) for t in ("<|user|>", "<|end|>", "<|assistant|>")]
    assert [i for i in ids if i >= 32000] == roles  # only the template's own role tokens


def test_retry_after_comes_from_measured_service_time():
    from so8t_hf.serve.engine import GenerationEngine

    engine = GenerationEngine(_FailingModel(), _FakeTokenizer(), max_queue=8, workers=2)
    assert engine.retry_after() == 1  # nothing measured yet
    for _ in range(8):
        engine._queue.put_nowait(object())
    engine._service_s.extend([0.05] * 32)
    assert engine.retry_after() == 1  # 8 jobs x 0.05 s / 2 workers = 0.2 s
    engine._service_s.extend([2.0] * 32)
    assert engine.retry_after() == 8  # 8 x 2 s / 2
    engine._service_s.extend([30.0] * 32)
    assert engine.retry_after() == 60  # capped


def test_key_entry_cli_refuses_short_secrets_and_writes_lines_that_load(monkeypatch, capsys):
    import io

    from so8t_hf.serve import auth

    assert auth.main(["ops", "--new"]) == 0
    out, err = capsys.readouterr()
    secret = err.rsplit(": ", 1)[1].strip()
    assert parse_key_line(out.strip()) == parse_key_line(f"ops:{secret}") and secret not in out
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert auth.main(["ops"]) == 2 and "has 5 characters" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(A + "\n"))
    assert auth.main(["alice", "--revoked"]) == 0
    assert parse_key_line(capsys.readouterr().out.strip()) == parse_key_line(f"alice:{A}:revoked")


def test_serve_help_documents_the_routes_and_their_defaults():
    from so8t_hf.serve.cli import build_parser

    text = build_parser().format_help()
    for needle in ("GET  /v1/models", "temperature 0 (greedy)", "defaults as OpenAI's: temperature 1", "top_p 1",
                   "--default-max-new-tokens", "--max-header-bytes", "431", "sha256=<64 hex digits>:chars=N",
                   "Types are strict"):
        assert needle in text, needle


def test_an_audit_db_replaced_by_a_foreign_file_fails_until_it_is_fixed(tmp_path):
    db = tmp_path / "audit.db"
    log = AuditLog.open(db)
    for path in tmp_path.glob("audit.db*"):
        path.unlink()
    db.write_bytes(b"not a database " * 100)
    with pytest.raises(Exception):
        log.write(AuditRow("r1", time.time(), "/think", 200, "ok", 1.0))
    assert not log.healthy and not log.check()
    db.unlink()  # the operator removes it: the next check creates the DB again
    assert log.check() and log.healthy and log.recreated == 1
    log.write(AuditRow("r2", time.time(), "/think", 200, "ok", 1.0))
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.write(AuditRow("r3", time.time(), "/think", 200, "ok", 1.0))
