"""Issue 11 in one call: the thinking-SFT recipe on one GPU, under DDP and under FSDP2 (`fully_shard`), with the
same global batch, then FSDP2 save + resume, and QLoRA under DDP; writes the results table and JSON.

    device (nvidia-h200-x2):  python3 scripts/multigpu_check.py --out $OUT            (carry .whl and .fixtures)
    CPU (2 gloo processes):   python scripts/multigpu_check.py --cpu --out /tmp/mg    (tiny model; DDP, FSDP2; no QLoRA)

Every run is `accelerate launch recipes/thinking_sft.py` with the recipe's own configs; the global batch is
`per_device x processes` = the single run's batch (no accumulation anywhere, so every run sums the same
rows per step). Results: `multigpu_h200x2.md` and
`multigpu_h200x2.json` in --out (`{"device", "runs": [{"name", "tokens_per_s", "max_loss_diff_vs_single"}]}`),
which `benchmarks/results/` keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 5  # tokens/s is the mean over the logged steps after these


def losses(log: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in log if "loss" in e and "step" in e}


def tokens_per_s(log: list[dict]) -> float:
    rates = [e["tokens_per_second"] for e in log if "tokens_per_second" in e and e.get("step", 0) > WARMUP_STEPS]
    return sum(rates) / len(rates) if rates else 0.0


def max_loss_diff(log: list[dict], reference: list[dict]) -> float | None:
    """Largest |loss - reference loss| over the steps both runs logged (None when they share none)."""
    a, b = losses(log), losses(reference)
    shared = sorted(set(a) & set(b))
    return max(abs(a[s] - b[s]) for s in shared) if shared else None


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `flag`'s value replaced (or the flag appended)."""
    if flag in args:
        i = args.index(flag)
        return [*args[: i + 1], value, *args[i + 2 :]]
    return [*args, flag, value]


def launch(name: str, accelerate_config: str, processes: int, args: list[str], out: Path, cpu: bool) -> dict:
    """One recipe run through `accelerate launch` with a shipped accelerate config; returns {"name", "rc", "log"
    (training_log.json or []), "ran" (run_summary.json's "distributed": world size, type, precision), "stderr_tail",
    "stderr"}. `cpu`: CPU processes over gloo (`--use_cpu true`; accelerate's own `--cpu` starts one process)."""
    run_dir = out / name
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           "--config_file", str(REPO / "recipes/accelerate" / accelerate_config)]
    if cpu:
        args = [*args, "--use_cpu", "true"]  # gloo: accelerate picks it for CPU processes
    cmd += [str(REPO / "recipes/thinking_sft.py"), *args, "--output_dir", str(run_dir)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    log_file, summary_file = run_dir / "training_log.json", run_dir / "run_summary.json"
    log = json.loads(log_file.read_text()) if log_file.is_file() else []
    ran = json.loads(summary_file.read_text()).get("distributed", {}) if summary_file.is_file() else {}
    (out / f"{name}.log").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-20000:])
    return {"name": name, "rc": proc.returncode, "log": log, "ran": ran, "stderr_tail": proc.stderr[-2000:],
            "stderr": proc.stderr}


def report(device: str, command: str, runs: list[dict], notes: list[str], out: Path) -> dict:
    """Write multigpu_h200x2.{json,md}; `runs[0]` is the single-GPU reference."""
    single = runs[0]
    rows = []
    for run in runs:
        row = {"name": run["name"], "tokens_per_s": round(tokens_per_s(run["log"]), 1), "rc": run["rc"],
               **{k: run.get("ran", {}).get(k) for k in ("world_size", "distributed_type", "mixed_precision", "sharded")}}
        if run is not single:
            diff = max_loss_diff(run["log"], single["log"])
            row["max_loss_diff_vs_single"] = None if diff is None else round(diff, 5)
            if row["tokens_per_s"] and rows[0]["tokens_per_s"]:
                row["scaling_vs_single"] = round(row["tokens_per_s"] / rows[0]["tokens_per_s"], 3)
        rows.append(row)
    result = {"device": device, "command": command, "runs": rows, "notes": notes}
    (out / "multigpu_h200x2.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Several GPUs: the recipe on one GPU, DDP and FSDP2\n", f"- device: {device}", f"- command: `{command}`",
             "", "| run | rc | processes | ran as | tokens/s | x single | max loss diff vs single |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for row in rows:
        ran_as = f"{row.get('distributed_type')}{' (sharded)' if row.get('sharded') else ''}, {row.get('mixed_precision')}"
        lines.append(f"| {row['name']} | {row['rc']} | {row.get('world_size')} | {ran_as} | {row['tokens_per_s']:,.0f} "
                     f"| {row.get('scaling_vs_single', '')} | {row.get('max_loss_diff_vs_single', '')} |")
    lines += ["", *[f"- {n}" for n in notes]]
    (out / "multigpu_h200x2.md").write_text("\n".join(lines) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the logs and the results table/JSON")
    parser.add_argument("--cpu", action="store_true", help="tiny model, 2 gloo processes: a smoke test of the script")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per run (>= 20 for the issue)")
    parser.add_argument("--base", default="/tmp/phi35-shaped", help="Phi-3.5-shaped checkpoint (built if missing)")
    parser.add_argument("--tokenizer", default=str(REPO / ".fixtures/phi35-tokenizer"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    common = ["--max_steps", str(args.steps), "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
              "--eval_fraction", "0", "--disable_tqdm", "true", "--seed", "0", "--data_seed", "0"]
    if args.cpu:
        device = f"CPU ({platform.processor() or platform.machine()}), gloo"
        recipe = ["--config", str(REPO / "recipes/configs/tiny.yaml"), "--dataset_path", str(REPO / "data/sample"),
                  "--tiny_hidden_size", "64", "--tiny_intermediate_size", "128", "--max_length", "256"]
        per_device, processes = 2, 2
    else:
        import torch

        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        if not Path(args.base, "config.json").is_file():
            subprocess.run([sys.executable, str(REPO / "scripts/make_phi35_shaped.py"), "--tokenizer", args.tokenizer,
                            "--out", args.base], check=True)
        recipe = ["--config", str(REPO / "recipes/configs/phi35_mini_lora.yaml"), "--model_name_or_path", args.base]
        per_device, processes = 4, 2
    recipe += common
    single = launch("single", "single_gpu.yaml", 1, recipe + ["--per_device_train_batch_size", str(per_device * processes),
                    "--gradient_accumulation_steps", "1"], out, args.cpu)
    runs = [single, launch("ddp", "ddp.yaml", processes, recipe + ["--per_device_train_batch_size", str(per_device),
                           "--gradient_accumulation_steps", "1"], out, args.cpu)]
    notes = [f"global batch {per_device * processes} packed rows per step; tokens/s = mean over steps > {WARMUP_STEPS}",
             "loss differences: the same rows per step; the all-reduce sums gradients in another order than one "
             "process, so rounding (bf16 on the GPU) separates the curves slowly"]
    fsdp = recipe + ["--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps", "1"]
    half = args.steps // 2
    saving = with_flag(fsdp, "--save_strategy", "steps") + ["--save_steps", str(half)]
    if args.cpu:  # one run measures and saves (CPU tokens/s are no benchmark)
        first = launch("fsdp2", "fsdp2.yaml", processes, saving, out, True)
        runs.append(first)
    else:
        runs.append(launch("fsdp2", "fsdp2.yaml", processes, fsdp, out, False))
        first = launch("fsdp2_save", "fsdp2.yaml", processes, saving, out, False)
    resumed = launch("fsdp2_resume", "fsdp2.yaml", processes, saving + [
        "--resume_from_checkpoint", str(out / first["name"] / f"checkpoint-{half}")], out, args.cpu)
    tail = [e for e in resumed["log"] if e.get("step", 0) > half]
    resume_diff = max_loss_diff(tail, first["log"])
    notes.append(f"FSDP2 resume from checkpoint-{half}: rc {first['rc']}/{resumed['rc']}, max loss diff after resume "
                 f"vs the uninterrupted run: {resume_diff}")
    if not args.cpu:
        qlora = launch("qlora_ddp", "ddp.yaml", processes, ["--config", str(REPO / "recipes/configs/phi35_mini_qlora_12gb.yaml"),
                       "--model_name_or_path", args.base, *common, "--max_steps", "5"], out, False)
        notes.append(f"QLoRA under DDP: rc {qlora['rc']}; " + (qlora["stderr_tail"].strip().splitlines() or [""])[-1][:300])
    command = "python3 scripts/multigpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = report(device, command, runs, notes, out)
    result["fsdp2_resume"] = {"rc": [first["rc"], resumed["rc"]], "max_loss_diff": resume_diff}
    (out / "multigpu_h200x2.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["runs"], indent=1))
    return result


if __name__ == "__main__":
    main()
