"""--audit-store-thinking (the positive control of the leak tests) and SIGTERM mid-burst.

The server stores the raw generation in the audit DB, so SECRETMARK must be there (proof that the
scripted model really generates it) while responses and the log still never hold it. Then a
burst of requests is in flight when SIGTERM arrives: with a long grace period every one completes
with its answer; with a short one, those still running when it ends get a JSON 503 (or an SSE `error`
event) with their request id, and the audit row records that status. Either way the process exits 0,
every request has its committed row, and the log holds no traceback.
"""

import json
import time
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

from so8t_hf.thinking import extract_final

pytestmark = pytest.mark.skipif(not PHI35_TOKENIZER.is_dir(),
                                reason=f"Phi-3.5 tokenizer fixture not found at {PHI35_TOKENIZER}")

KEY = {"Authorization": "Bearer ops-secret-key-0001"}
BURST = 24


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return shared_demo_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    srv = start_server(demo.path, tmp_path_factory.mktemp("serve-shutdown"), [
        "--api-key", "ops:ops-secret-key-0001", "--audit-store-thinking", "--torch-threads", "1", "--max-queue", "64",
        "--max-new-tokens-cap", "64"], name="shutdown")
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()


def test_store_thinking_keeps_it_in_the_audit_db_only(server, demo):
    r = httpx.post(f"{server.url}/think", json={"query": "q"}, headers=KEY, timeout=60)
    assert r.status_code == 200 and SECRET not in r.text and r.json()["final"] == extract_final(demo.text)
    row = {x["request_id"]: x for x in audit_rows(server.audit_db)}[r.json()["request_id"]]
    assert row["key_id"] == "ops" and row["generation_text"].count(SECRET) == 1
    assert demo.text.startswith(row["generation_text"])


def _request(url, i):
    stream = i % 2 == 1
    r = httpx.post(f"{url}/think", json={"query": f"q{i}", "stream": stream}, headers=KEY, timeout=120)
    final = think_stream_final(r.text)[1].get("final") if stream else r.json().get("final")
    return r.status_code, r.headers.get("X-Request-ID"), final, time.monotonic(), r.text


def test_sigterm_mid_burst_finishes_in_flight_requests_and_commits_every_row(server, demo):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        done_before = metric(c.get("/metrics").text, "so8t_request_latency_seconds_count")
    with ThreadPoolExecutor(BURST) as pool:
        futures = [pool.submit(_request, server.url, i) for i in range(BURST)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until every request of the burst has reached the server
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            finished = metric(text, "so8t_request_latency_seconds_count") - done_before
            in_flight = metric(text, "so8t_in_flight_requests")
            if finished + in_flight >= BURST:
                break
            time.sleep(0.02)
        assert in_flight >= 2, (finished, in_flight)  # the signal lands mid-burst
        t_signal = time.monotonic()
        server.proc.send_signal(15)
        results = [f.result(timeout=120) for f in futures]
    assert server.proc.wait(60) == 0
    expected = extract_final(demo.text)
    for status, rid, final, _, text in results:
        assert status == 200 and final == expected and SECRET not in text
    assert sum(t_done > t_signal for *_, t_done, _ in results) >= 2  # answered after SIGTERM
    rows = {r["request_id"]: r for r in audit_rows(server.audit_db)}
    assert all(rows[rid]["status"] == 200 and rows[rid]["generation_text"] for _, rid, *_ in results)
    assert len(rows) == 1 + BURST  # the store-thinking request and the burst, nothing lost
    log = server.log_text()
    assert f"shutdown complete: {len(rows)} audit rows committed" in log and SECRET not in log
    assert "Traceback" not in log and "grace period over" not in log
    wal = server.audit_db.with_name(server.audit_db.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed on shutdown


def _mixed_request(url, i):
    """Stream or not, /think or OpenAI: (status, X-Request-ID, what the client saw: ("json", body) or
    ("sse", last event name, its data))."""
    stream, openai = i % 2 == 1, i % 4 >= 2
    path = "/v1/chat/completions" if openai else "/think"
    body = {"messages": [{"role": "user", "content": f"q{i}"}]} if openai else {"query": f"q{i}"}
    r = httpx.post(f"{url}{path}", json={**body, "stream": stream}, headers=KEY, timeout=120)
    if not stream or r.status_code != 200:
        return r.status_code, r.headers.get("X-Request-ID"), ("json", r.json()), r.text
    events = [e for e in sse_events(r.text) if e[1] != "[DONE]"]
    return r.status_code, r.headers.get("X-Request-ID"), ("sse", *events[-1]), r.text


def test_sigterm_after_a_short_grace_period_ends_every_request_with_a_json_503(demo, tmp_path_factory):
    srv = start_server(demo.path, tmp_path_factory.mktemp("serve-short-grace"), [
        "--api-key", "ops:ops-secret-key-0001", "--torch-threads", "1", "--max-queue", "64", "--graceful-timeout",
        "0.5", "--max-new-tokens-cap", "64"], name="grace")
    try:
        n = 32
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(_mixed_request, srv.url, i) for i in range(n)]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                text = httpx.get(f"{srv.url}/metrics", timeout=10).text
                if metric(text, "so8t_request_latency_seconds_count") + metric(text, "so8t_in_flight_requests") >= n:
                    break
                time.sleep(0.02)
            srv.proc.send_signal(15)
            results = [f.result(timeout=120) for f in futures]
        assert srv.proc.wait(60) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    rows = {r["request_id"]: r for r in audit_rows(srv.audit_db)}
    sent = {200: 0, 503: 0}
    for status, rid, seen, text in results:
        assert rid and SECRET not in text, text
        if seen[0] == "json":
            body = seen[1]
            if status == 503:
                assert body["error"]["type"] == "shutting_down" and body["error"]["request_id"] == rid
            else:
                assert status == 200 and body["request_id"] == rid
        else:
            name, data = seen[1], json.loads(seen[2])
            if name == "error":
                assert data["error"] == {"type": "shutting_down", "message": data["error"]["message"],
                                         "request_id": rid}
                status = 503
            else:
                assert status == 200
        sent[status] += 1
        assert rows[rid]["status"] == status and rows[rid]["outcome"] != "client_disconnected", (rows[rid], seen)
    assert sent[503] >= 4 and sent[200] >= 1 and sum(sent.values()) == n, sent  # the grace period ended mid-burst
    assert len(rows) == n
    log = srv.log_text()
    assert "Traceback" not in log and "Exception in ASGI" not in log and "grace period over" in log
