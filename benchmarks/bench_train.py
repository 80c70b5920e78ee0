"""End-to-end training speed: TRL + PEFT stock, TRL + PEFT + Liger and the so8t_hf recipe, same data and settings,
for LoRA 4 x 2048, QLoRA NF4 1 x 2048 and LoRA 1 x 8192; then the ladder of our recipe (each optimisation switched on
in turn). One process per run (`train_worker.py`); three run at a time, the others preparing on the CPU (data, model,
trainer) while one holds the GPU (a file lock), so only one ever uses the GPU.

    python scripts/make_phi35_shaped.py --tokenizer .fixtures/phi35-tokenizer --out /dev/shm/phi35-shaped
    python benchmarks/bench_train.py --checkpoint /dev/shm/phi35-shaped --out $OUT

Writes `train_h100.md` (device, versions, command, tables) and `train_h100.json` ({"device", "command",
"workloads": [{"workload", "runs": [{"name", "tokens_per_s", "peak_gib"}]}]}) into --out, with every run's JSON,
log and profile under --out/runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reasoning_rows import make_rows  # noqa: E402

WORKLOADS = {"lora_4x2048": (4, 2048, False), "qlora_1x2048": (1, 2048, True), "lora_1x8192": (1, 8192, False)}
FAST = "sync_free_metrics=true,lora_cast_inputs=false,lora_dropout=0.0"
BEFORE = "sync_free_metrics=false,lora_cast_inputs=true,lora_dropout=0.05"
# The ladder (LoRA 4 x 2048): each rung switches one more optimisation on; the last full rung is the recipe itself.
LADDER = [
    ("baseline", dict(packing="false", override=f"so8t_attn_backend=sdpa,use_liger_kernel=false,{BEFORE}", legacy=True),
     "SO8T-Phi3, padded batches, SDPA, per-layer float64 rotations, fp32 LoRA casts, dropout 0.05, syncs"),
    ("packing", dict(override=f"so8t_attn_backend=sdpa,use_liger_kernel=false,{BEFORE}", legacy=True),
     "+ padding-free packing (SDPA with a block-diagonal mask)"),
    ("our_attention", dict(override=f"use_liger_kernel=false,{BEFORE}", legacy=True),
     "+ so8t attention auto (varlen_attn / our kernel per pack)"),
    ("fused_kernels", dict(override=BEFORE, legacy=True), "+ Liger RMSNorm / SwiGLU / RoPE"),
    ("rotation_kernel", dict(override=BEFORE), "+ R once per step, fp32 GPU exponential"),
    ("host_dtype", dict(override=FAST), "+ sync-free loss, LoRA inputs in bf16, dropout off (= the recipe)"),
    ("memory_policy", dict(override=f"{FAST},activation_checkpointing_layers=auto"),
     "+ activation_checkpointing_layers=auto (spends spare GPU memory)"),
]


def plan(args) -> list[dict]:
    runs = []
    for workload, (batch, length, qlora) in WORKLOADS.items():
        for system in ("trl_stock", "trl_liger", "so8t_hf"):
            steps = args.steps + (args.extra_steps if system == "so8t_hf" and workload == "lora_4x2048" else 0)
            runs.append(dict(name=f"{workload}.{system}", workload=workload, system=system, batch=batch, length=length,
                             qlora=qlora, steps=steps, override="", legacy=False, packing="true",
                             profile=args.profile_steps if (system == "so8t_hf" or workload == "qlora_1x2048")
                             and system != "trl_liger" and workload != "lora_1x8192" else 0))
    for rung, spec, _ in LADDER:
        if rung == "host_dtype":
            continue  # = lora_4x2048.so8t_hf
        runs.append(dict(name=f"ladder.{rung}", workload="lora_4x2048", system="so8t_hf", batch=4, length=2048,
                         qlora=False, steps=args.steps, override=spec.get("override", ""), legacy=spec.get("legacy", False),
                         packing=spec.get("packing", "true"), profile=0))
    if args.only:
        runs = [r for r in runs if any(r["name"].startswith(o) for o in args.only)]
    return runs


def launch(run: dict, args, data: Path, lock: Path, out: Path):
    cmd = [sys.executable, str(HERE / "train_worker.py"), "--name", run["name"], "--system", run["system"],
           "--checkpoint", args.checkpoint, "--data", str(data), "--batch", str(run["batch"]), "--max_length",
           str(run["length"]), "--packing", run["packing"], "--warmup", str(args.warmup), "--steps", str(run["steps"]),
           "--profile_steps", str(run["profile"]), "--lock", str(lock), "--out", str(out / f"{run['name']}.json")]
    cmd += ["--qlora"] * run["qlora"] + ["--legacy_rotation"] * run["legacy"]
    if run["override"]:
        cmd += ["--override", run["override"]]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if run["legacy"]:
        env["SO8T_ROTATION_EXP"] = "torch"
    log = open(out / f"{run['name']}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(HERE.parent))


def versions() -> str:
    import importlib.metadata as md

    names = ["torch", "transformers", "peft", "trl", "accelerate", "triton", "liger-kernel", "bitsandbytes", "datasets"]
    out = []
    for n in names:
        try:
            out.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            out.append(f"{n} -")
    return ", ".join(out)


def device_name() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no GPU"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"


def warmup_check(r: dict) -> str:
    times = r["step_times"][: len(r["step_times"]) - (r.get("profile") and 3 or 0)]
    if len(times) <= 11:
        return "-"
    med = statistics.median(times)
    worst = max(times[10:])
    return f"{worst / med:.2f}x (max after step 10 {worst:.2f} s, median {med:.2f} s)"


def report(args, results: dict, data_stats: str, command: str, wall: float, quiet: bool = False):
    out = Path(args.out)
    device = device_name()
    workloads = []
    lines = [f"# End-to-end training speed ({device})", "",
             f"Device: {device}. Versions: {versions()}.", "",
             f"Command: `{command}` ({wall / 60:.1f} min in one device call).", "",
             f"Workload: a random Phi-3.5-mini-shaped checkpoint (3.82B), the real Phi-3.5 tokenizer, {data_stats}; "
             f"LoRA r16 on qkv/o/gate_up/down, bf16, packing (padding-free), non-reentrant checkpointing, fused AdamW, "
             f"gradient accumulation 1. Tokens/s over steps {args.warmup + 1}-{args.warmup + args.steps} (after "
             f"{args.warmup} warm-up steps; a CUDA sync ends each step); peak = max allocated once the model is on the GPU.",
             ""]
    for workload in WORKLOADS:
        names = [n for n in ("trl_stock", "trl_liger", "so8t_hf") if f"{workload}.{n}" in results]
        if not names:
            continue
        rows = [(n, results[f"{workload}.{n}"]) for n in names]
        if workload == "lora_4x2048" and "ladder.memory_policy" in results:
            rows.append(("so8t_hf_memory_auto", results["ladder.memory_policy"]))
        stock = results.get(f"{workload}.trl_stock")
        workloads.append({"workload": workload, "runs": [
            {"name": n, "tokens_per_s": round(r["tokens_per_s"], 1), "peak_gib": round(r["peak_gib"], 2)} for n, r in rows]})
        lines += [f"## {workload}", "", "| run | tokens/s | vs stock | peak GiB | tokens/s of the median step | "
                  "warm-up (worst step after 10 / median) |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        for n, r in rows:
            ratio = f"{r['tokens_per_s'] / stock['tokens_per_s']:.2f}x" if stock else "-"
            lines.append(f"| {n} | {r['tokens_per_s']:,.0f} | {ratio} | {r['peak_gib']:.2f} | "
                         f"{r.get('tokens_per_s_median_step', 0):,.0f} | {warmup_check(r)} |")
        lines.append("")
    ladder = [(rung, desc, results.get(f"ladder.{rung}") or (results.get("lora_4x2048.so8t_hf") if rung == "host_dtype" else None))
              for rung, _, desc in LADDER]
    if any(r for _, _, r in ladder):
        base = next((r for _, _, r in ladder if r), None)
        lines += ["## Ladder (our recipe, LoRA 4 x 2048; each rung adds one optimisation)", "",
                  "| rung | what | tokens/s | vs baseline | peak GiB | attention calls | first / last loss |",
                  "| --- | --- | ---: | ---: | ---: | --- | --- |"]
        for rung, desc, r in ladder:
            if r is None:
                lines.append(f"| {rung} | {desc} | not run | | | | |")
                continue
            calls = ", ".join(f"{k} {v}" for k, v in sorted(r.get("backends", {}).items()))
            loss = f"{r['losses'][0]:.3f} / {r['losses'][-1]:.3f}" if r.get("losses") else "-"
            lines.append(f"| {rung} | {desc} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                         f"{r['peak_gib']:.2f} | {calls} | {loss} |")
        lines += ["", "compile (torch.compile of the decoder layer): not run (see the notes)", ""]
    lines += ["## Profiles (torch.profiler, last steps of the run)", ""]
    for name, r in results.items():
        if "profile" in r:
            p = r["profile"]
            shares = ", ".join(f"{k} {v:.0%}" for k, v in p["shares"].items())
            lines.append(f"- {name}: device {p['device_ms_per_step']:.0f} ms / wall {p['wall_ms_per_step']:.0f} ms per step "
                         f"(host gaps {1 - p['device_ms_per_step'] / p['wall_ms_per_step']:.0%}); {shares}")
    lines.append("")
    (out / "train_h100.md").write_text("\n".join(lines) + "\n")
    payload = {"device": device, "command": command, "workloads": workloads}
    (out / "train_h100.json").write_text(json.dumps(payload, indent=1) + "\n")
    if not quiet:
        print("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=1300)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--extra_steps", type=int, default=12, help="more steps for the recipe's LoRA run (warm-up check)")
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--parallel", type=int, default=3)
    p.add_argument("--timeout", type=float, default=420, help="seconds for all runs; later runs are skipped")
    p.add_argument("--only", nargs="*", default=None, help="run names starting with these")
    args = p.parse_args(argv)
    command = "python benchmarks/bench_train.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    out = Path(args.out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    data = Path("/tmp/bench_train_data")
    data.mkdir(exist_ok=True)
    rows = make_rows(args.rows)
    with open(data / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    lengths = [len(tok(tok.apply_chat_template(r["messages"], tokenize=False)).input_ids) for r in rows]
    data_stats = (f"{len(rows)} generated reasoning rows (benchmarks/reasoning_rows.py) of {min(lengths)}-{max(lengths)} "
                  f"tokens (mean {statistics.mean(lengths):.0f})")
    lock = out / "gpu.lock"
    start = time.perf_counter()
    pending, active, results = plan(args), [], {}
    while pending or active:
        while pending and len(active) < args.parallel and time.perf_counter() - start < args.timeout:
            run = pending.pop(0)
            active.append((run, launch(run, args, data, lock, runs_dir)))
        if not active:
            print(f"time budget spent: skipped {[r['name'] for r in pending]}", flush=True)
            break
        time.sleep(0.5)
        for run, proc in list(active):
            if proc.poll() is not None:
                active.remove((run, proc))
                path = runs_dir / f"{run['name']}.json"
                if path.exists():
                    results[run["name"]] = json.loads(path.read_text())
                    r = results[run["name"]]
                    print(f"{run['name']}: {r['tokens_per_s']:,.0f} tokens/s, {r['peak_gib']:.2f} GiB, "
                          f"gpu {r['gpu_s']:.0f} s", flush=True)
                    report(args, results, data_stats, command, time.perf_counter() - start, quiet=True)
                else:
                    print(f"{run['name']}: FAILED (rc {proc.returncode}), see runs/{run['name']}.log", flush=True)
        if time.perf_counter() - start > args.timeout + 60:
            for run, proc in active:
                proc.kill()
                print(f"{run['name']}: killed at the time limit", flush=True)
            break
    report(args, results, data_stats, command, time.perf_counter() - start)


if __name__ == "__main__":
    main()
