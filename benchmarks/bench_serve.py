"""Benchmark the /think service on loopback: requests/s and p50/p99 latency at 1, 8, 32 clients, and bursts.

What: starts `python -m so8t_hf.serve` on 127.0.0.1 (the scripted tiny demo model of
tests/serve_helpers.py unless --model is given), then for each concurrency level runs that many
closed-loop clients (each sends its next request when the last one returns) until --requests
requests are done or --seconds pass; then fires each --bursts size of simultaneous requests at a
queue of --burst-queue (200s and 503s) and records how long the burst took to drain, the Retry-After
values, leaks of the thinking secret and the audit rows; writes a markdown table with the machine and command.

Limits: client and server share the machine's cores; the tiny model measures the service's own
overhead (HTTP, auth, queue, audit commit, 26-token generation), not a real model's speed.

    .venv/bin/python benchmarks/bench_serve.py [--model DIR] [--levels 1 8 32] [--requests 200] [--bursts 50 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "serve")]
from serve_helpers import SECRET, audit_rows, build_demo_model, start_server

KEY = "bench-secret-key-0001"


async def run_level(url: str, clients: int, total: int, seconds: float, max_new_tokens: int) -> dict:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    tokens = 0
    issued = 0
    stop_at = time.monotonic() + seconds

    async def client(ac: httpx.AsyncClient) -> None:
        nonlocal issued, tokens
        while issued < total and time.monotonic() < stop_at:
            issued += 1
            t0 = time.perf_counter()
            r = await ac.post("/think", json={"query": f"q{issued}", "max_new_tokens": max_new_tokens})
            dt = time.perf_counter() - t0
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code == 200:
                latencies.append(dt)
                tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits,
                                 headers={"Authorization": f"Bearer {KEY}"}) as ac:
        await asyncio.gather(*[ac.post("/think", json={"query": "warm", "max_new_tokens": 4}) for _ in range(2)])
        t0 = time.perf_counter()
        await asyncio.gather(*[client(ac) for _ in range(clients)])
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")
    return {"clients": clients, "ok": len(lat), "codes": codes, "wall": wall, "rps": len(lat) / wall,
            "tok_s": tokens / wall, "p50": q(0.50), "p99": q(0.99), "mean": statistics.fmean(lat) * 1000 if lat else 0}


async def run_burst(url: str, clients: int) -> dict:
    """`clients` requests at once: statuses, Retry-After values, drain time, responses holding the secret."""
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits,
                                 headers={"Authorization": f"Bearer {KEY}"}) as ac:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*[ac.post("/think", json={"query": f"b{i}", "max_new_tokens": 64})
                                    for i in range(clients)])
        wall = time.perf_counter() - t0
    retry = [int(r.headers["Retry-After"]) for r in rs if r.status_code == 503]
    return {"clients": clients, "ok": sum(r.status_code == 200 for r in rs), "busy": len(retry), "wall": wall,
            "retry": (min(retry), max(retry)) if retry else None, "leaks": sum(SECRET in r.text for r in rs),
            "other": sum(r.status_code not in (200, 503) for r in rs)}


def generate_baseline_ms(model_dir: Path, max_new_tokens: int, threads: int, reps: int = 12) -> float:
    """Median in-process time of the engine's own generate call for one request (no HTTP, queue, audit)."""
    import torch

    from so8t_hf.inference.loader import load_for_inference
    from so8t_hf.serve.engine import GenerationEngine, GenParams, Job

    torch.set_num_threads(threads)
    model, tok = load_for_inference(str(model_dir), device="cpu", merge_rotations=True)
    engine = GenerationEngine(model, tok)
    ids = engine.encode_messages([{"role": "user", "content": "q"}])
    loop = asyncio.new_event_loop()
    times = []
    for _ in range(reps + 3):  # the first calls warm up
        t0 = time.perf_counter()
        engine._generate(Job(ids, GenParams(max_new_tokens), loop, stream=False))
        times.append((time.perf_counter() - t0) * 1000)
    loop.close()
    return statistics.median(times[3:])


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
            f"load average at start {load[0]:.2f}" if isinstance(load[0], float) else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: build the scripted tiny demo model)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=200, help="requests per level (default 200)")
    ap.add_argument("--seconds", type=float, default=30.0, help="time limit per level (default 30)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="per request (the demo script stops at 26)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--bursts", type=int, nargs="*", default=[50, 200], help="simultaneous requests per burst")
    ap.add_argument("--burst-queue", type=int, default=8, help="--max-queue of the burst server (8)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/serve_cpu.md"))
    args = ap.parse_args(argv)
    env_line = machine()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = Path(args.model) if args.model else build_demo_model(work / "model").path
        baseline = generate_baseline_ms(model, args.max_new_tokens, args.torch_threads)
        env = {"SO8T_API_KEYS": f"bench:{KEY}"}
        server = start_server(model, work, ["--torch-threads", str(args.torch_threads), "--usage-counts-thinking",
                                            "--max-queue", str(max(64, 2 * max(args.levels))), "--no-access-log",
                                            "--max-new-tokens-cap", str(max(64, args.max_new_tokens))], name="bench",
                              env=env)
        try:
            results = [asyncio.run(run_level(server.url, c, args.requests, args.seconds, args.max_new_tokens))
                       for c in args.levels]
            fixed = asyncio.run(run_level(server.url, 1, 100, args.seconds, 1))  # 1 token: the per-request overhead
        finally:
            code = server.terminate()
        bursts, burst_rows, burst_code = [], 0, 0
        if args.bursts:
            bserver = start_server(model, work, ["--torch-threads", str(args.torch_threads), "--max-queue",
                                                 str(args.burst_queue), "--no-access-log"], name="burst", env=env)
            try:
                asyncio.run(run_burst(bserver.url, 2))  # warm-up: the service time behind Retry-After is measured
                bursts = [asyncio.run(run_burst(bserver.url, n)) for n in args.bursts]
            finally:
                burst_code = bserver.terminate()
            burst_rows = len(audit_rows(bserver.audit_db))
        rows = len(audit_rows(server.audit_db))
    sent = sum(sum(r["codes"].values()) for r in [*results, fixed]) + 2 * (len(results) + 1)
    what = args.model or ("the scripted tiny demo SO8T-Phi3 (vocab 32,064, hidden 64, 2 layers; "
                          "26 generated tokens per request)")
    server_line = (f"Server: `python -m so8t_hf.serve --torch-threads {args.torch_threads} --no-access-log "
                   f"--usage-counts-thinking` (so usage counts every generated token) on "
                   f"127.0.0.1, {what}, audit DB with `synchronous=FULL`; closed-loop clients (httpx, one process) "
                   f"on the same machine. Up to {args.requests} requests or {args.seconds:g} s per level, after 2 "
                   "warm-up requests.")
    lines = [
        "# /think service on CPU (loopback)", "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}` ({time.strftime('%Y-%m-%d')})", "",
        f"Machine: {env_line}.", "",
        server_line, "",
        "| clients | requests ok | other statuses | req/s | generated tok/s | p50 ms | p99 ms | mean ms |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        other = ", ".join(f"{k}: {v}" for k, v in sorted(r["codes"].items()) if k != 200) or "-"
        lines.append(f"| {r['clients']} | {r['ok']} | {other} | {r['rps']:.1f} | {r['tok_s']:.0f} | "
                     f"{r['p50']:.0f} | {r['p99']:.0f} | {r['mean']:.0f} |")
    lines += ["", (f"In-process generation of one request (the engine's generate call, same threads, no HTTP, "
                   f"queue or audit; median of 12 after 3 warm-up calls): {baseline:.0f} ms; the 1-client p50 minus "
                   "this is the service's own overhead per request.")]
    lines += ["", (f"1 client, max_new_tokens=1 (HTTP, auth, validation, chat template, queue hand-off, prefill, "
                   f"one token, fsync'd audit commit): p50 {fixed['p50']:.1f} ms, p99 {fixed['p99']:.1f} ms, "
                   f"{fixed['rps']:.0f} req/s.")]
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += ["", (f"Load average at the end {load_end:.2f}. On a shared or busy machine these timings move by tens "
                   "of percent between runs: compare runs on the same, otherwise idle, machine only.")]
    lines += ["", (f"Audit rows after the run: {rows} for {sent} requests; "
              f"server exit status after SIGTERM: {code}."), ""]
    if bursts:
        lines += [f"Bursts: N simultaneous `/think` requests at a server with `--max-queue {args.burst_queue}` "
                  "(1 worker), after 2 warm-up requests. Retry-After is the queue ahead times the mean service time "
                  "of the last 32 jobs; `drained` is the time until the last response of the burst.", "",
                  "| clients | 200 | 503 queue_full | other | drained s | Retry-After s (min-max) | responses with "
                  "the thinking secret |", "| ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        for b in bursts:
            ra = f"{b['retry'][0]}-{b['retry'][1]}" if b["retry"] else "-"
            lines.append(f"| {b['clients']} | {b['ok']} | {b['busy']} | {b['other']} | {b['wall']:.2f} | {ra} | "
                         f"{b['leaks']} |")
        burst_sent = 2 + sum(b["clients"] for b in bursts)
        lines += ["", f"Burst server: audit rows {burst_rows} for {burst_sent} requests; exit status after SIGTERM: "
                  f"{burst_code}.", ""]
        code = code or burst_code
        if burst_rows != burst_sent or any(b["leaks"] or b["other"] for b in bursts):
            code = code or 1
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0 if rows == sent and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
