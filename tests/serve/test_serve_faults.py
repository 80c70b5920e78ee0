"""The service when its audit DB, keys file or peers misbehave, over real HTTP on loopback (issue 20).

Nothing is delivered that was not audited: a failing audit write ends streams the way it ends plain requests
(a JSON 500 before any final text), a server whose `/healthz` is 503 refuses new requests with 503 +
Retry-After, a deleted audit DB is recreated and reported, a locked DB never stalls `/healthz` or
`/metrics` (the DB work runs off the event loop), and failed authentications are committed before the
401 leaves (they survive `kill -9`). The keys file keeps working line by line (a Latin-1 byte, a BOM, a
same-size rewrite with its mtime restored). SIGTERM while a client uploads a body slowly answers it 503
when the grace period ends, audits that status and exits soon after.
"""

import json
import os
import select
import signal
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import pytest
from serve_helpers import (
    FINAL,
    PHI35_TOKENIZER,
    SECRET,
    audit_rows,
    metric,
    shared_demo_model,
    sse_events,
    start_server,
    think_stream_final,
)

pytestmark = pytest.mark.skipif(not PHI35_TOKENIZER.is_dir(),
                                reason=f"Phi-3.5 tokenizer fixture not found at {PHI35_TOKENIZER}")

ALICE_SECRET = "alice-secret-key-01"
ALICE = {"Authorization": f"Bearer {ALICE_SECRET}"}
BUSY = 3.0  # --audit-busy-timeout: how long a write waits for a locked DB


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return shared_demo_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve-faults")
    keys = work / "keys.txt"
    keys.write_text(f"alice:{ALICE_SECRET}\n", encoding="utf-8")
    srv = start_server(demo.path, work, ["--api-keys-file", str(keys), "--torch-threads", "1", "--max-new-tokens-cap",
                                         "64", "--audit-busy-timeout", str(BUSY)], name="faults")
    srv.keys_file = keys
    yield srv
    assert srv.terminate() == 0


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _wait_healthy(client, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if client.get("/healthz").status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(client.get("/healthz").text)


class _Lock:
    """Another connection holding the audit DB's write lock (as a backup job or a second writer would)."""

    def __init__(self, db):
        self.con = sqlite3.connect(db, isolation_level=None, timeout=10)

    def __enter__(self):
        self.con.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, *exc):
        self.con.execute("ROLLBACK")
        self.con.close()


def _delivered(r):
    """The final text a client got, on any route."""
    if not r.headers["content-type"].startswith("text/event-stream"):
        return r.json()["final"]
    events = [json.loads(d) for _, d in sse_events(r.text) if d != "[DONE]"]
    if "/think" in str(r.url):
        return think_stream_final(r.text)[0]
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events)


ROUTES = [("/think", {"query": "q", "stream": True}), ("/v1/chat/completions",
          {"messages": [{"role": "user", "content": "q"}], "stream": True}), ("/think", {"query": "q"})]


@pytest.mark.parametrize("path, body", ROUTES, ids=["think-sse", "openai-sse", "think-json"])
def test_no_final_leaves_when_its_audit_row_cannot_be_written(server, client, path, body):
    _wait_healthy(client)
    with _Lock(server.audit_db):
        r = client.post(path, json=body, headers=ALICE)
    assert r.status_code == 500 and r.json()["error"]["type"] == "audit_unavailable", r.text
    assert "answer" not in r.text and SECRET not in r.text  # not one word of the final
    _wait_healthy(client)  # the DB works again: so does the service
    ok = client.post(path, json=body, headers=ALICE)
    assert ok.status_code == 200 and _delivered(ok) == FINAL
    assert ok.headers["X-Request-ID"] in {row["request_id"] for row in audit_rows(server.audit_db)}


def test_while_healthz_is_503_requests_get_503_with_retry_after(server, client):
    _wait_healthy(client)
    with _Lock(server.audit_db):
        assert client.post("/think", json={"query": "q"}, headers=ALICE).status_code == 500  # the write times out
        assert client.get("/healthz").status_code == 503
        t0 = time.monotonic()
        for path, body in ROUTES:
            r = client.post(path, json=body, headers=ALICE)
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
            assert r.json()["error"]["type"] == "unavailable" and r.json()["error"]["request_id"]
        assert client.get("/v1/models", headers=ALICE).status_code == 503
        assert time.monotonic() - t0 < BUSY  # refused at once, without waiting on the DB
    _wait_healthy(client)
    assert client.post("/think", json={"query": "q"}, headers=ALICE).status_code == 200


def test_a_locked_audit_db_does_not_stall_healthz_or_metrics(server, client):
    _wait_healthy(client)
    slowest = {"/healthz": 0.0, "/metrics": 0.0}
    with ThreadPoolExecutor(1) as pool, _Lock(server.audit_db):
        pending = pool.submit(httpx.post, f"{server.url}/think", json={"query": "q"}, headers=ALICE, timeout=60)
        time.sleep(0.3)  # the request now waits for the lock in its audit write
        t_end, rounds = time.monotonic() + BUSY - 1.0, 0
        while time.monotonic() < t_end and not pending.done():
            for path in slowest:
                t0 = time.perf_counter()
                assert client.get(path).status_code in (200, 503)
                slowest[path] = max(slowest[path], time.perf_counter() - t0)
            rounds += 1
        assert rounds >= 3 and not pending.done()  # they answered while the write was still waiting
    assert pending.result().status_code in (200, 500)
    assert max(slowest.values()) < 1.0, slowest


def test_a_deleted_audit_db_is_recreated_and_reported(server, client):
    _wait_healthy(client)
    before = client.post("/think", json={"query": "q"}, headers=ALICE)
    assert before.status_code == 200
    os.unlink(server.audit_db)  # an operator's mistake, or a rotation that forgot the server
    ids = []
    for _ in range(3):
        r = client.post("/think", json={"query": "q"}, headers=ALICE)
        assert r.status_code in (200, 503), r.text
        ids.append(r.headers["X-Request-ID"])
    _wait_healthy(client)
    ids += [client.post("/think", json={"query": "q"}, headers=ALICE).headers["X-Request-ID"]]
    rows = {row["request_id"]: row for row in audit_rows(server.audit_db)}
    assert all(rid in rows for rid in ids), (ids, list(rows))  # nothing written after the deletion is lost
    health = client.get("/healthz").json()
    assert "recreated" in health["audit"], health
    assert metric(client.get("/metrics").text, "so8t_audit_db_recreated_total") == 1
    assert f"audit DB {server.audit_db} was deleted or replaced" in server.log_text()


def test_keys_file_survives_latin1_bom_and_a_same_size_rewrite(server, client):
    def status(secret):
        return client.post("/think", json={"query": "hi", "max_new_tokens": 1},
                           headers={"Authorization": f"Bearer {secret}"}).status_code

    f = server.keys_file
    original = f.read_bytes()
    try:
        # a Latin-1 byte in a comment and in a broken line: the other lines keep working, the bad one is named
        f.write_bytes(b"# caf\xe9 keys\n" + original + b"bad:caf\xe9-secret-key-0001\n")
        time.sleep(1.3)
        assert status(ALICE_SECRET) == 200
        assert f"{f}:3: not UTF-8" in server.log_text()
        f.write_bytes(b"\xef\xbb\xbf" + original)  # a UTF-8 BOM (Notepad) does not disable line 1
        time.sleep(1.3)
        assert status(ALICE_SECRET) == 200
        # the same size, the old mtime restored: the content changed, so it is re-read
        f.write_bytes(original)
        time.sleep(1.3)
        st = f.stat()
        revoked = original.replace(b"alice-secret-key-01", b"alice-secret-key-02")
        assert len(revoked) == len(original)
        f.write_bytes(revoked)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        time.sleep(1.3)
        assert status(ALICE_SECRET) == 401 and status("alice-secret-key-02") == 200
    finally:
        f.write_bytes(original)
        time.sleep(1.3)
    assert status(ALICE_SECRET) == 200


def test_failed_authentications_survive_kill_9(demo, tmp_path):
    srv = start_server(demo.path, tmp_path, ["--api-key", f"alice:{ALICE_SECRET}", "--torch-threads", "1"],
                       name="kill9")
    try:
        n = 40
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            codes = [c.post("/think", json={"query": "x"}, headers={"Authorization": "Bearer wrong-key-number-0001"}
                            if i % 2 else {}).status_code for i in range(n)]
        assert codes == [401] * n
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(30)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    rows = [r for r in audit_rows(srv.audit_db) if r["key_id"] is None]
    assert sum(r["count"] for r in rows) == n and {r["status"] for r in rows} == {401}


def _slow_upload(url, stop, out):
    """POST /think with a 400-byte body sent a byte at a time until `stop`; (response or b"", when) into `out`."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock:
        sock.sendall(b"POST /think HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE_SECRET.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n")
        sent = 0
        while not stop.is_set() and sent < 399:
            if select.select([sock], [], [], 0.05)[0]:  # the server answered: stop sending, read it
                break
            try:
                sock.sendall(b" ")
            except OSError:
                break
            sent += 1
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        out.append((data, time.monotonic()))


def test_sigterm_while_a_body_uploads_answers_it_and_exits_within_the_grace(demo, tmp_path):
    grace = 1.0
    srv = start_server(demo.path, tmp_path, ["--api-key", f"alice:{ALICE_SECRET}", "--torch-threads", "1",
                                             "--graceful-timeout", str(grace)], name="upload")
    stop, out = threading.Event(), []
    uploader = threading.Thread(target=_slow_upload, args=(srv.url, stop, out))
    try:
        uploader.start()
        time.sleep(1.0)  # the body is arriving
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(grace + 15)
        took = time.monotonic() - t0
    finally:
        stop.set()
        uploader.join(30)
        if srv.proc.poll() is None:
            srv.proc.kill()
    answered = out[0][1] - t0
    assert code == 0 and answered < grace + 3 and took < grace + 10, (answered, took)  # was 31.8 s, audited 499
    head, _, body = out[0][0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), out
    rid = json.loads(body)["error"]["request_id"]
    row = {r["request_id"]: r for r in audit_rows(srv.audit_db)}[rid]
    assert (row["status"], row["outcome"], row["key_id"]) == (503, "shutting_down", "alice")
