"""End-to-end training speed: TRL + PEFT stock, the strongest stock stack that runs here (TRL + PEFT + Liger +
padding-free on transformers' best loadable attention: `trl_liger_fa4`), Unsloth (on its own pinned site, where
staged: `--unsloth_site`; else recorded as not run, with why) and the so8t_hf recipe, same data and settings, for
LoRA 4 x 2048, QLoRA NF4 1 x 2048 and LoRA 1 x 8192; then each workload's ladder of our recipe (each
optimisation switched on in turn; `--only ladder` or a rung's name). One process per run (`train_worker.py`); three run at a time, the others preparing on the CPU (data, model,
trainer) while one holds the GPU (a file lock), so only one ever uses the GPU; no run prepares during another's
timed steps (a second lock), so those steps run on a quiet host.

    python scripts/make_phi35_shaped.py --tokenizer .fixtures/phi35-tokenizer --out /dev/shm/phi35-shaped
    python benchmarks/bench_train.py --checkpoint /dev/shm/phi35-shaped --out $OUT

Writes `train_h100.md` (device, versions, command, tables) and `train_h100.json` ({"device", "command",
"workloads": [{"workload", "runs": [{"name", "tokens_per_s", "peak_gib", "mfu", ...}], "ladder": [...]}]}) into
--out, with every run's JSON, log and profile under --out/runs. MFU = 4 N tokens/s over the card's dense bf16 peak
(N = 3.82e9; H100 SXM / H200 989 TFLOP/s).
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

from package_versions import package_versions  # noqa: E402
from reasoning_rows import make_rows  # noqa: E402

WORKLOADS = {"lora_4x2048": (4, 2048, False), "qlora_1x2048": (1, 2048, True), "lora_1x8192": (1, 8192, False)}
SYSTEMS = {"lora_4x2048": ("trl_stock", "trl_liger_fa4", "so8t_hf", "so8t_hf_capped", "unsloth"),
           "qlora_1x2048": ("trl_stock", "so8t_hf", "unsloth"),
           "lora_1x8192": ("trl_stock", "trl_liger_fa4", "so8t_hf", "so8t_hf_capped", "unsloth")}
# so8t_hf: the recipe as a user runs it (the memory policy spends the free memory it measures); so8t_hf_capped: the
# same with the user's cap on that policy below stock's peak (11.26 GiB at both LoRA shapes in every call so far)
CAP_GIB = 11.0
VARIANTS = {"so8t_hf_capped": f"activation_memory_budget_gib={CAP_GIB}"}
N_PARAMS = 3.82e9
ALL = "activation_checkpointing_layers=all"  # the rungs before the memory policy checkpoint every layer
FAST = f"sync_free_metrics=true,lora_cast_inputs=false,lora_dropout=0.0,fused_lora=off,cuda_graphs=off,fused_qkv_rope=off,{ALL}"
BEFORE = f"sync_free_metrics=false,lora_cast_inputs=true,lora_dropout=0.05,fused_lora=off,cuda_graphs=off,fused_qkv_rope=off,{ALL}"
# cuda_graphs=auto graphs 4-bit bases only (float bases inside graphs with the fused q/k/v + RoPE and the lean
# recompute have not run on a GPU yet): the rung switches it on
CUDA_GRAPHS_RUNG = ("cuda_graphs", dict(override=f"cuda_graphs=on,{ALL}"),
                    "+ each checkpointed layer as CUDA graphs (cuda_graphs=on)")
LEAN_RUNG = ("lean_recompute", dict(override=f"fused_qkv_rope=off,{ALL}"),
             "+ the recompute skips mlp.down_proj's unread matmul (lean_recompute=auto)")
QKV_ROPE_RUNG = ("fused_qkv_rope", dict(override=ALL),
                 "+ q/k/v split with RoPE in one pass, its gradient in one (fused_qkv_rope=auto)")
MEMORY_RUNG = ("memory_policy", dict(override=""),
               "+ activation_checkpointing_layers=auto, no cap: spends the measured free memory (= the recipe)")
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
    ("host_dtype", dict(override=FAST), "+ sync-free loss, LoRA inputs in bf16, dropout off (issue 16's recipe)"),
    ("fused_lora", dict(override=f"lean_recompute=off,fused_qkv_rope=off,{ALL}"),
     "+ fused LoRA linear on the bf16 base (fused_lora=auto)"),
    LEAN_RUNG,
    QKV_ROPE_RUNG,
    CUDA_GRAPHS_RUNG,
    MEMORY_RUNG,
]
# The other workloads' ladders: the rungs this issue added, from issue 16's recipe up.
LADDERS = {"lora_4x2048": LADDER, "qlora_1x2048": [
    ("host_dtype", dict(override=FAST), "issue 16's recipe (PEFT's LoRA forward over bitsandbytes' 4-bit matmul)"),
    ("fused_lora", dict(override="cuda_graphs=off,lean_recompute=off,fused_qkv_rope=off"),
     "+ fused NF4 dequantise + matmul + LoRA"),
    ("cuda_graphs", dict(override="lean_recompute=off,fused_qkv_rope=off"), "+ each checkpointed layer as CUDA graphs "
     "(cuda_graphs=auto graphs 4-bit bases)"),
    ("lean_recompute", dict(override="fused_qkv_rope=off"), "+ the recompute skips mlp.down_proj's unread dequantise + "
     "matmul (lean_recompute=auto)"),
    ("fused_qkv_rope", dict(override=""), "+ q/k/v split with RoPE in one pass, its gradient in one (= the recipe: "
     "fused_qkv_rope=auto)")],
    "lora_1x8192": [
    ("host_dtype", dict(override=FAST), "issue 16's recipe (PEFT's LoRA forward)"),
    ("fused_lora", dict(override=f"lean_recompute=off,fused_qkv_rope=off,{ALL}"),
     "+ fused LoRA linear on the bf16 base (fused_lora=auto)"),
    LEAN_RUNG,
    QKV_ROPE_RUNG,
    CUDA_GRAPHS_RUNG,
    MEMORY_RUNG]}
# the rung that is the main table's so8t_hf run (the recipe: every switch at its default, 'auto'): LoRA's is the
# memory_policy rung; QLoRA's is its last rung (auto keeps every 4-bit layer checkpointed, and graphs them)
RECIPE_RUNG = {"lora_4x2048": "memory_policy", "qlora_1x2048": "fused_qkv_rope", "lora_1x8192": "memory_policy"}


def ladder_name(workload: str, rung: str) -> str:
    return f"ladder.{rung}" if workload == "lora_4x2048" else f"ladder_{workload}.{rung}"


def peak_flops(device: str) -> float | None:
    """Dense bf16 peak of the card (no sparsity): H100 SXM / H200 989 TFLOP/s, H100 PCIe 756."""
    if "H100" in device and "PCIe" in device:
        return 756e12
    return 989e12 if ("H100" in device or "H200" in device) else None


def plan(args) -> list[dict]:
    runs = []
    for workload, (batch, length, qlora) in WORKLOADS.items():
        for system in SYSTEMS[workload]:
            ours = system.startswith("so8t_hf")
            runs.append(dict(name=f"{workload}.{system}", workload=workload, system="so8t_hf" if ours else system,
                             batch=batch, length=length, qlora=qlora, steps=args.steps,
                             override=VARIANTS.get(system, ""), legacy=False, packing="true",
                             profile=args.profile_steps if ours or workload == "qlora_1x2048" else 0))
    for workload, ladder in LADDERS.items():
        batch, length, qlora = WORKLOADS[workload]
        for rung, spec, _ in ladder:
            if rung == RECIPE_RUNG[workload]:
                continue  # = the main table's so8t_hf run
            runs.append(dict(name=ladder_name(workload, rung), workload=workload, system="so8t_hf", batch=batch,
                             length=length, qlora=qlora, steps=args.ladder_steps, override=spec.get("override", ""),
                             legacy=spec.get("legacy", False), packing=spec.get("packing", "true"),
                             profile=args.profile_steps))
    if args.only:
        runs = [r for r in runs if any(r["name"].startswith(o) for o in args.only)]
    for spec in args.tries:  # exploration: our recipe with extra overrides, reported apart from the tables
        workload, label, override = spec.split(":", 2)
        batch, length, qlora = WORKLOADS[workload]
        runs.append(dict(name=f"try_{workload}.{label}", workload=workload, system="so8t_hf", batch=batch,
                         length=length, qlora=qlora, steps=args.ladder_steps, override=override, legacy=False,
                         packing="true", profile=args.profile_steps))
    return runs


def not_runnable(run: dict, args) -> str | None:
    """Why a planned run cannot start here (recorded in the results in its place), or None."""
    if run["system"] == "unsloth" and not (Path(args.unsloth_site) / "unsloth" / "__init__.py").is_file():
        return (f"Unsloth is not staged at {args.unsloth_site}: its pins (transformers <= 5.17, trl <= 1.15, "
                "datasets < 5) need a site of their own beside the stock stack's: pack it with "
                "scripts/fetch_unsloth.sh and carry .stash_unsloth to scripts/device_train_bench.sh (--unsloth_site)")
    return None


def failure(log: Path) -> str:
    """The last line of a failed run's log that names an error, to stand in the results in the run's place."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln or "Killed" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def launch(run: dict, args, data: Path, lock: Path, out: Path):
    cmd = [sys.executable, str(HERE / "train_worker.py"), "--name", run["name"], "--system", run["system"],
           "--checkpoint", args.checkpoint, "--data", str(data), "--batch", str(run["batch"]), "--max_length",
           str(run["length"]), "--packing", run["packing"], "--warmup", str(args.warmup), "--steps", str(run["steps"]),
           "--profile_steps", str(run["profile"]), "--lock", str(lock), "--quiet_lock", str(lock.with_name("quiet.lock")), "--out", str(out / f"{run['name']}.json")]
    cmd += ["--qlora"] * run["qlora"] + ["--legacy_rotation"] * run["legacy"] + ["--memory_trace"] * args.memory_trace
    if run["override"]:
        cmd += ["--override", run["override"]]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if run["system"] == "unsloth":  # its own site first: trl 1.15 and datasets 4 shadow the stock stack's
        env["PYTHONPATH"] = os.pathsep.join(x for x in (args.unsloth_site, env.get("PYTHONPATH")) if x)
    if run["legacy"]:
        env["SO8T_ROTATION_EXP"] = "torch"
    log = open(out / f"{run['name']}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(HERE.parent))


def versions() -> str:
    found = package_versions("torch", "transformers", "peft", "trl", "accelerate", "triton", "liger-kernel",
                             "bitsandbytes", "datasets")
    return ", ".join(f"{n} {v or '-'}" for n, v in found.items())


def device_name() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no GPU"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"


def warmup_ratio(r: dict) -> float | None:
    """Worst step after step 10 over the median step (profiled steps left out), or None for short runs."""
    times = r["step_times"][: len(r["step_times"]) - (3 if r.get("profile") else 0)]
    if len(times) <= 11:
        return None
    return max(times[10:]) / statistics.median(times)


def warmup_check(r: dict) -> str:
    ratio = warmup_ratio(r)
    if ratio is None:
        return "-"
    times = r["step_times"][: len(r["step_times"]) - (3 if r.get("profile") else 0)]
    return (f"{ratio:.2f}x{'' if ratio <= 1.2 else ' (over 1.2x)'} (max after step 10 {max(times[10:]):.2f} s, "
            f"median {statistics.median(times):.2f} s)")


def _row(name: str, r: dict, flops: float | None) -> dict:
    row = {"name": name, "tokens_per_s": round(r["tokens_per_s"], 1), "peak_gib": round(r["peak_gib"], 2)}
    if flops:
        row["mfu"] = round(4 * N_PARAMS * r["tokens_per_s"] / flops, 4)
    row["tokens_per_s_median_step"] = round(r.get("tokens_per_s_median_step", 0), 1)
    row["timed_steps"] = r.get("timed_steps")
    ratio = warmup_ratio(r)
    row["worst_step_after_10_over_median"] = round(ratio, 3) if ratio else None
    row["attention"] = r.get("attn_implementation") if r.get("system", "").startswith(("trl", "unsloth")) else \
        ", ".join(f"{k} {v}" for k, v in sorted(r.get("backends", {}).items()))
    if r.get("attn_unavailable"):
        row["attention_not_loadable"] = r["attn_unavailable"]
    if r.get("fused_lora"):
        row["fused_lora"] = r["fused_lora"]
    if r.get("cuda_graphs"):
        row["cuda_graphs"] = r["cuda_graphs"]
    if r.get("versions"):  # a run on a stack of its own (unsloth)
        row["versions"] = r["versions"]
    if r.get("packing_used") is False and r.get("system") == "unsloth":
        row["attention"] += " (Unsloth turned packing off: padded batches)"
    if r.get("losses"):
        row["first_last_loss"] = [round(r["losses"][0], 4), round(r["losses"][-1], 4)]
    return row


def report(args, results: dict, data_stats: str, command: str, wall: float, quiet: bool = False,
           not_run: dict | None = None):
    """Writes train_h100.md / .json. `not_run`: {run name: why} for planned runs with no result (not runnable here,
    failed, killed or out of time), written in their place."""
    not_run = not_run or {}
    out = Path(args.out)
    device = device_name()
    flops = peak_flops(device)
    workloads = []
    lines = [f"# End-to-end training speed ({device})", "",
             f"Device: {device}. Versions: {versions()}.", "",
             f"Command: `{command}` ({wall / 60:.1f} min in one device call).", "",
             f"Workload: a random Phi-3.5-mini-shaped checkpoint (3.82B), the real Phi-3.5 tokenizer, {data_stats}; "
             f"LoRA r16 on qkv/o/gate_up/down, bf16, packing (padding-free), non-reentrant checkpointing, fused AdamW, "
             f"gradient accumulation 1. Tokens/s over steps {args.warmup + 1}-{args.warmup + args.steps} (after "
             f"{args.warmup} warm-up steps; each step timed on the GPU by CUDA events, no sync per step); peak = max allocated once the model is on the "
             f"GPU. MFU = 4 x {N_PARAMS / 1e9:.2f}e9 x tokens/s over {flops / 1e12 if flops else 0:.0f} TFLOP/s "
             f"(dense bf16 peak of the card).", ""]
    for workload in WORKLOADS:
        names = [n for n in SYSTEMS[workload] if f"{workload}.{n}" in results]
        missing = {n: not_run[f"{workload}.{n}"] for n in SYSTEMS[workload] if f"{workload}.{n}" in not_run}
        ladder = [(rung, desc, results.get(ladder_name(workload, rung)) or
                   (results.get(f"{workload}.so8t_hf") if rung == RECIPE_RUNG[workload] else None)) for rung, _, desc in LADDERS[workload]]
        ladder_missing = any(ladder_name(workload, rung) in not_run for rung, *_ in ladder)
        if not names and not missing and not ladder_missing and not any(r for *_, r in ladder):
            continue
        rows = [_row(n, results[f"{workload}.{n}"], flops) for n in names]
        stock = results.get(f"{workload}.trl_stock")
        anchor = results.get(f"{workload}.trl_liger_fa4")
        rows += [{"name": n, "not_run": why} for n, why in missing.items()]
        entry = {"workload": workload, "runs": rows}
        lines += [f"## {workload}", "", "| run | tokens/s | vs trl_stock | vs trl_liger_fa4 | peak GiB | MFU | median-step "
                  "tokens/s | worst step after 10 / median | attention |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for n, row in zip(names, rows):
            r = results[f"{workload}.{n}"]
            vs = lambda base: f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"  # noqa: E731
            mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
            lines.append(f"| {n} | {r['tokens_per_s']:,.0f} | {vs(stock)} | {vs(anchor)} | {r['peak_gib']:.2f} | {mfu} | "
                         f"{row['tokens_per_s_median_step']:,.0f} | {warmup_check(r)} | {row['attention']} |")
        lines += [f"| {n} | not run: {why} | | | | | | | |" for n, why in missing.items()]
        lines += [f"\n{row['name']} ran on its own stack: " + ", ".join(f"{k} {v}" for k, v in row["versions"].items())
                  for row in rows if row.get("versions")]
        lines.append("")
        if ladder_missing or any(r for *_, r in ladder):
            base = next((r for *_, r in ladder if r), None)
            entry["ladder"] = []
            lines += [f"Ladder ({workload}; each rung adds one optimisation):", "",
                      "| rung | what | tokens/s | vs first rung | peak GiB | checkpointed layers | first / last loss |",
                      "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
            for rung, desc, r in ladder:
                if r is None:
                    why = not_run.get(ladder_name(workload, rung))
                    lines.append(f"| {rung} | {desc} | not run{': ' + why if why else ''} | | | | |")
                    if why:
                        entry["ladder"].append({"rung": rung, "what": desc, "not_run": why})
                    continue
                entry["ladder"].append({"rung": rung, "what": desc, **_row(rung, r, flops)})
                loss = f"{r['losses'][0]:.3f} / {r['losses'][-1]:.3f}" if r.get("losses") else "-"
                lines.append(f"| {rung} | {desc} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                             f"{r['peak_gib']:.2f} | {r.get('checkpointed_layers') if r.get('checkpointed_layers') is not None else 'all'} | {loss} |")
            lines.append("")
        workloads.append(entry)
    tries = []
    for name, r in results.items():
        if name.startswith("try_"):
            flags = r.get("override") or []
            tries.append({**_row(name, r, flops), "overrides": ", ".join(
                f"{k.lstrip('-')}={v}" for k, v in zip(flags[::2], flags[1::2])) or "-"})
    if tries:
        lines += ["## Tries (the recipe with extra overrides; not part of the tables)", "",
                  "| run | overrides | tokens/s | peak GiB | MFU | first / last loss |", "| --- | --- | ---: | ---: | ---: | --- |"]
        for row in tries:
            mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
            loss = "{:.3f} / {:.3f}".format(*row["first_last_loss"]) if "first_last_loss" in row else "-"
            lines.append(f"| {row['name']} | {row['overrides']} | {row['tokens_per_s']:,.0f} | {row['peak_gib']:.2f} | "
                         f"{mfu} | {loss} |")
        lines.append("")
    lines += ["## Profiles (torch.profiler, last steps of the run)", ""]
    for name, r in results.items():
        if "profile" in r:
            p = r["profile"]
            shares = ", ".join(f"{k} {v:.0%}" for k, v in p["shares"].items())
            lines.append(f"- {name}: device {p['device_ms_per_step']:.0f} ms / wall {p['wall_ms_per_step']:.0f} ms per step "
                         f"(host gaps {1 - p['device_ms_per_step'] / p['wall_ms_per_step']:.0%}); {shares}"
                         + (f"; per step {p['runtime_per_step']}" if p.get("runtime_per_step") else "")
                         + (f"; GPU idle {p['gpu_idle']['idle_ms_per_step']} ms per step in "
                            f"{p['gpu_idle']['gaps_per_step']} gaps, most under: " + "; ".join(
                                f"{h['outermost']} > {h['innermost']} {h['ms_per_step']} ms"
                                for h in p['gpu_idle']['by_host_op'][:4]) if p.get("gpu_idle") else ""))
    lines.append("")
    (out / "train_h100.md").write_text("\n".join(lines) + "\n")
    payload = {"device": device, "command": command, "peak_bf16_tflops": flops and flops / 1e12, "n_params": N_PARAMS,
               "workloads": workloads}
    if tries:
        payload["tries"] = tries
    (out / "train_h100.json").write_text(json.dumps(payload, indent=1) + "\n")
    if not quiet:
        print("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=1300)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=36, help="timed steps of the main tables' runs (after --warmup)")
    p.add_argument("--ladder_steps", type=int, default=10, help="timed steps of the ladder's rungs")
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--parallel", type=int, default=3)
    p.add_argument("--timeout", type=float, default=420, help="seconds for all runs; later runs are skipped")
    p.add_argument("--only", nargs="*", default=None, help="run names starting with these")
    p.add_argument("--tries", nargs="*", default=[], metavar="WORKLOAD:LABEL:OVERRIDES",
                   help="extra runs of our recipe, e.g. lora_1x8192:workers:dataloader_num_workers=2 (named "
                        "try_<workload>.<label>, --ladder_steps steps, profiled, reported apart from the tables)")
    p.add_argument("--unsloth_site", default=os.environ.get("UNSLOTH_SITE", "/dev/shm/site_unsloth"),
                   help="folder with Unsloth and its pinned stack (packed by scripts/fetch_unsloth.sh, unpacked by "
                        "scripts/device_train_bench.sh), put first on the "
                        "unsloth runs' PYTHONPATH; where it is missing those runs are recorded as not run, with why")
    p.add_argument("--memory_trace", action="store_true", help="record every run's CUDA allocations and write what is "
                   "live at its peak (runs/<name>.memory.txt); recording slows the steps, so its speeds are not results")
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
    pending, active, results, not_run = plan(args), [], {}, {}

    def write(quiet=True):
        report(args, results, data_stats, command, time.perf_counter() - start, quiet=quiet, not_run=not_run)

    while pending or active:
        while pending and len(active) < args.parallel and time.perf_counter() - start < args.timeout:
            run = pending.pop(0)
            why = not_runnable(run, args)
            if why:
                not_run[run["name"]] = why
                print(f"{run['name']}: not run: {why}", flush=True)
            else:
                active.append((run, launch(run, args, data, lock, runs_dir)))
        if not active:
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
                else:
                    not_run[run["name"]] = (f"failed (rc {proc.returncode}): {failure(runs_dir / (run['name'] + '.log'))}"
                                            f" (runs/{run['name']}.log)")
                    print(f"{run['name']}: FAILED (rc {proc.returncode}), see runs/{run['name']}.log", flush=True)
                write()
        if time.perf_counter() - start > args.timeout + 60:
            for run, proc in active:
                proc.kill()
                not_run[run["name"]] = f"killed at the call's time limit (--timeout {args.timeout:.0f} s + 60 s)"
                print(f"{run['name']}: killed at the time limit", flush=True)
            break
    if pending:
        print(f"time budget spent: skipped {[r['name'] for r in pending]}", flush=True)
        not_run.update({r["name"]: f"not started: the call's time budget (--timeout {args.timeout:.0f} s) was spent"
                        for r in pending})
    write(quiet=False)


if __name__ == "__main__":
    main()
