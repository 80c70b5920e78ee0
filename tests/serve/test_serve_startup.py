"""Start-up of `python -m so8t_hf.serve`: keys, digest key and audit DB are checked before the model loads (one line
each, no traceback, exit 2); secrets from a file or the environment, not the command line; the keyed thinking digest
and full usage when the operator turns them on."""

import hashlib
import hmac
import json
import os
import sqlite3

import httpx
import pytest
from serve_helpers import (
    FINAL,
    PHI35_TOKENIZER,
    SECRET,
    audit_rows,
    run_serve_cli,
    shared_demo_model,
    start_server,
)

from so8t_hf.thinking import thinking_hash

KEY = "ops:ops-secret-key-0001"
NO_MODEL = ["--model", "/nonexistent/model"]  # a check that waited for the model would fail on the model instead


def _one_line_error(out, *needles):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("so8t-hf serve: error: ")]
    assert len(errors) == 1 and "Traceback" not in out.stderr and "nonexistent" not in out.stderr, out.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def test_bad_audit_paths_fail_before_the_model_loads_with_path_and_cause(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "garbage.db").write_bytes(b"not a database " * 200)
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE audit (id INTEGER)")
    con.close()
    cases = [
        (tmp_path, "it is a directory"),
        (tmp_path / "a-file" / "audit.db", "is a file, not a folder"),
        (tmp_path / "garbage.db", "file is not a database"),
        (foreign, "not an so8t_hf audit table"),
        ("/dev/full", "database or disk is full"),  # a full disk
        ("/sys/so8t-audit.db", "unable to open database file ("),  # a place where nothing can be created
    ]
    env = {"SO8T_API_KEYS": KEY}
    for path, cause in cases:
        out = run_serve_cli([*NO_MODEL, "--audit-db", str(path)], env=env)
        _one_line_error(out, f"audit DB {path}: ", cause)


@pytest.mark.parametrize("args, env, needles", [
    (["--api-key", "x"], {}, ["--api-key #1", "has 1 characters; use at least 16"]),
    (["--api-key", "ops:short"], {}, ["the secret of key 'ops' has 5 characters"]),
    ([], {"SO8T_API_KEYS": "a:ok-secret-key-00001 b:tiny"}, ["$SO8T_API_KEYS entry:2", "has 4 characters"]),
    ([], {}, ["no API keys"]),
    (["--thinking-digest", "response"], {"SO8T_API_KEYS": KEY},
     ["needs a secret key of at least 32 bytes", "$SO8T_THINKING_DIGEST_KEY"]),
])
def test_bad_keys_fail_at_start_up_with_a_reason(tmp_path, args, env, needles):
    env = {"SO8T_API_KEYS": "", "SO8T_THINKING_DIGEST_KEY": "", **env}
    out = run_serve_cli([*NO_MODEL, "--audit-db", str(tmp_path / "a.db"), *args], env=env)
    _one_line_error(out, *needles)
    assert not (tmp_path / "a.db").exists() or "--thinking-digest" in args


def test_bad_keys_file_line_is_named(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("ok:ok-secret-key-00001\n\nbroken\n")
    out = run_serve_cli([*NO_MODEL, "--audit-db", str(tmp_path / "a.db"), "--api-keys-file", str(keys)],
                        env={"SO8T_API_KEYS": ""})
    _one_line_error(out, f"{keys}:3: expected key_id:secret")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not PHI35_TOKENIZER.is_dir():
        pytest.skip(f"Phi-3.5 tokenizer fixture not found at {PHI35_TOKENIZER}")
    return shared_demo_model(tmp_path_factory)


def _cold_burst_retry_after_is_realistic(url, auth, clients=50):
    """The first burst a fresh server sees (nothing measured yet): Retry-After must not exceed the drain time."""
    import asyncio
    import math
    import time

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients + 5)) as ac:
            return await asyncio.gather(*[ac.post("/think", json={"query": "q"}, headers={"Authorization": auth})
                                          for _ in range(clients)])

    t0 = time.monotonic()
    responses = asyncio.run(burst())
    drained = time.monotonic() - t0
    retry = [int(r.headers["Retry-After"]) for r in responses if r.status_code == 503]
    assert retry and all(r.status_code in (200, 503) for r in responses)
    assert max(retry) <= math.ceil(drained) + 1, (retry, drained)


DIGEST_KEY = "an operator secret of more than 32 bytes, from the environment"


def test_env_keys_keyed_digest_and_full_usage_when_asked(demo, tmp_path):
    env_secret, cli_secret = "env-secret-key-0001", "cli-secret-key-0001"
    srv = start_server(demo.path, tmp_path, ["--api-key", f"cli:{cli_secret}", "--thinking-digest", "response",
                                             "--usage-counts-thinking", "--torch-threads", "1"], name="env",
                       env={"SO8T_API_KEYS": f"envkey:{env_secret}", "SO8T_THINKING_DIGEST_KEY": DIGEST_KEY})
    try:
        _cold_burst_retry_after_is_realistic(srv.url, f"Bearer {env_secret}")
        cmdline = open(f"/proc/{srv.proc.pid}/cmdline", "rb").read()
        assert env_secret.encode() not in cmdline and DIGEST_KEY.encode() not in cmdline
        r = httpx.post(f"{srv.url}/think", json={"query": "q"}, headers={"Authorization": f"Bearer {env_secret}"},
                       timeout=60)
        body = r.json()
        assert r.status_code == 200 and body["final"] == FINAL and SECRET not in r.text
        expected = thinking_hash(demo.text, key=DIGEST_KEY.encode())
        canonical = f"<think-task>{SECRET} plan</think-task>".encode()
        assert body["thinking_hmac"] == expected == hmac.new(DIGEST_KEY.encode(), canonical, hashlib.sha256).hexdigest()
        assert body["thinking_hmac"] != hashlib.sha256(canonical).hexdigest()  # not guessable without the key
        assert body["usage"]["completion_tokens"] == len(demo.script) - 1  # every generated token, as asked
        o = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}]},
                       headers={"Authorization": f"Bearer {cli_secret}"}, timeout=60)
        assert o.json()["thinking_hmac"] == expected
        row = {x["request_id"]: x for x in audit_rows(srv.audit_db)}[body["request_id"]]
        assert row["thinking_hmac"] == expected and row["key_id"] == "envkey"
    finally:
        assert srv.terminate() == 0
    log = srv.log_text()
    assert "--api-key puts secrets on the command line" in log and env_secret not in log and cli_secret not in log
    assert json.dumps(SECRET) not in log and os.path.exists(srv.audit_db)
