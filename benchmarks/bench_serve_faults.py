"""Measure the /think service under faults: a locked audit DB, a failing audit write on a stream, kill -9, SIGTERM
during a slow upload.

What: starts `python -m so8t_hf.serve` (the scripted tiny demo model of tests/serve/serve_helpers.py) and records
- the slowest `/healthz` and `/metrics` answer while a request's audit write waits on a lock held by another
  connection (`--audit-busy-timeout 5`, the lock held 4 s);
- what a `/think` SSE stream delivers when its audit write fails (final characters sent, status);
- the status of a request while `/healthz` is 503;
- how many of N failed authentications are in the audit DB after `kill -9`;
- after SIGTERM (`--graceful-timeout 1`) while a client uploads a body a byte per 50 ms: when the client is
  answered, when the process exits, and the audited status.
Prints one JSON object; run it from the checkout whose code is measured (the server runs from the repository).

Limits: one machine for client and server; timings move with the machine's load.

    .venv/bin/python benchmarks/bench_serve_faults.py [--kills 40]
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "serve")]
from serve_helpers import FINAL, audit_rows, build_demo_model, start_server, think_stream_final  # noqa: E402

SECRET_KEY = "bench-secret-key-0001"
AUTH = {"Authorization": f"Bearer {SECRET_KEY}"}
BASE = ["--api-key", f"bench:{SECRET_KEY}", "--torch-threads", "1", "--no-access-log"]


def locked_db(model: Path, work: Path) -> dict:
    srv = start_server(model, work, [*BASE, "--audit-busy-timeout", "5"], name="locked")
    out: dict = {}
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            lock = sqlite3.connect(srv.audit_db, isolation_level=None, timeout=10)
            lock.execute("BEGIN IMMEDIATE")
            slowest = {"/healthz": 0.0, "/metrics": 0.0}
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(httpx.post, f"{srv.url}/think", json={"query": "q"}, headers=AUTH, timeout=60)
                time.sleep(0.3)
                end = time.monotonic() + 3.7
                while time.monotonic() < end:
                    for path in slowest:
                        t0 = time.perf_counter()
                        c.get(path)
                        slowest[path] = max(slowest[path], time.perf_counter() - t0)
                lock.execute("ROLLBACK")
                out["request_status_after_the_lock"] = pending.result().status_code
            out["slowest_s_while_a_write_waits"] = {k: round(v, 3) for k, v in slowest.items()}
            # a failing audit write on a stream: hold the lock until the write times out
            lock.execute("BEGIN IMMEDIATE")
            r = c.post("/think", json={"query": "q", "stream": True}, headers=AUTH)
            streamed = think_stream_final(r.text)[0] if r.headers["content-type"].startswith("text/event") else ""
            out["stream_with_failing_audit"] = {"status": r.status_code, "final_chars_delivered": len(streamed),
                                                "of": len(FINAL)}
            h = c.get("/healthz").status_code
            r = c.post("/think", json={"query": "q"}, headers=AUTH)
            out["request_while_healthz_503"] = {"healthz": h, "status": r.status_code,
                                                "retry_after": r.headers.get("Retry-After")}
            lock.execute("ROLLBACK")
            lock.close()
    finally:
        srv.terminate()
    return out


def kill9(model: Path, work: Path, n: int) -> dict:
    srv = start_server(model, work, BASE, name="kill9")
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            codes = [c.post("/think", json={"query": "x"}, headers={"Authorization": "Bearer wrong-key-number-0001"}
                            if i % 2 else {}).status_code for i in range(n)]
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(30)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    survived = sum(r["count"] for r in audit_rows(srv.audit_db) if r["key_id"] is None)
    return {"failed_authentications": n, "answered_401": codes.count(401), "in_the_db_after_kill_9": survived}


def slow_upload(model: Path, work: Path, grace: float = 1.0) -> dict:
    srv = start_server(model, work, [*BASE, "--graceful-timeout", str(grace)], name="upload")
    got: list = []

    def upload() -> None:
        u = urlparse(srv.url)
        with socket.create_connection((u.hostname, u.port), timeout=120) as sock:
            sock.sendall(b"POST /think HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + SECRET_KEY.encode()
                         + b"\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n")
            for _ in range(3999):
                if select.select([sock], [], [], 0.05)[0]:
                    break
                try:
                    sock.sendall(b" ")
                except OSError:
                    break
            data = b""
            while True:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                data += chunk
            got.append((data, time.monotonic()))

    th = threading.Thread(target=upload, daemon=True)
    th.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(120)
    exited = time.monotonic() - t0
    th.join(200)
    data, when = got[0] if got else (b"", time.monotonic())
    rows = audit_rows(srv.audit_db)
    return {"grace_s": grace, "exit_s_after_sigterm": round(exited, 2), "exit_code": code,
            "client_answered_s_after_sigterm": round(when - t0, 2) if data else None,
            "client_got": data.split(b"\r\n", 1)[0].decode(errors="replace"),
            "audited": [(r["status"], r["outcome"]) for r in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=40, help="failed authentications before kill -9 (40)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_demo_model(tmp / "model").path
        result = {"repo": str(REPO), "locked_db": locked_db(model, tmp / "a"), "kill_9": kill9(model, tmp / "b",
                  args.kills), "sigterm_during_upload": slow_upload(model, tmp / "c")}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
