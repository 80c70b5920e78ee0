"""Pre-training benchmark (`make bench-pretrain`): the 1.5B recipe under a GPU memory cap, against plain
`transformers.Trainer` + sdpa + fp32 AdamW on the same shape, the largest trainable size under the cap, and the
loss cost of each memory choice against fp32 AdamW (a small model, same data and steps).

    python benchmarks/bench_pretrain.py --tokenizer .fixtures/phi35-tokenizer --cap_gib 10 --out $OUT
    python benchmarks/bench_pretrain.py ... --only so8t_hf so8t_hf_acc16 hf_trainer_uncapped --profile so8t_hf \
        --profile_steps 1 --nan_probe --run_timeout 120 --merge_into benchmarks/results/pretrain_h100.json --out $OUT

Runs (`RUNS`; one process each, `pretrain_worker.py`):
- `so8t_hf`: the recipe `pretrain_1p5b.yaml` as configured, under the cap (since its optimizer-in-backward default:
  16 x 1024, no accumulation, no clipping; rows of earlier calls named so8t_hf were 1 x 1024 x accumulation 16: each
  row's label comes from the micro-batch, accumulation and optimizer_in_backward its run recorded).
- `so8t_hf_acc16`: the recipe's earlier setting, optimizer step after backward, 1 x 1024 x accumulation 16, clipping
  1.0; `so8t_hf_b4x4`: the same as 4 x 1024 x accumulation 4.
- `so8t_hf_oib16`, `so8t_hf_oib8`: `optimizer_in_backward` (no gradient buffer), batch 16 x 1024 (the same 16,384
  tokens per step; what `so8t_hf` runs now, kept under its own name) or 8 x 1024, no accumulation, `max_grad_norm 0`.
- `hf_trainer_uncapped`, `hf_trainer_capped`: the stock baseline without and with the cap, 1 x 1024 x accumulation 16.
- `size`: depth 24, 25, 26, ... at d 2048 under the cap, the recipe as configured, until one fails to train 2 optimizer
  steps (out of memory) -> `max_trainable_params_10gib`.
- `convergence`: fp32 AdamW vs bf16 weights, 8-bit AdamW states, both, without clipping, the recipe's full set (+
  checkpointing, Liger) and with optimizer-in-backward, eval loss at the same steps.
Without `--only`: the timed runs (`TIMED`) alone on the GPU one after another (the capped baseline's OOM check beside
the first), then the size search and the convergence comparison side by side, within `--budget_s`. With `--only`: just
those runs, one after another in that order, each killed at `--run_timeout`.

Writes `pretrain_h100.json` and `pretrain_h100.md` into --out (device, versions, command, figures), each run's JSON and
log under --out/runs. `--merge_into FILE`: the earlier results file's rows, size search and convergence stay; this
call's runs are added as new rows (its `calls` entry: device, versions, command), and a run not made here keeps its
earlier figures; the headline run stays the earlier file's unless `--headline` names another.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from package_versions import package_versions  # noqa: E402

OIB = ["--optimizer_in_backward", "true", "--gradient_accumulation_steps", "1", "--max_grad_norm", "0"]
AFTER_BACKWARD = ["--optimizer_in_backward", "false", "--max_grad_norm", "1.0"]  # one optimizer step, clipping
ACC16 = [*AFTER_BACKWARD, "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "16"]
RUNS = {  # name: (label if the run recorded no settings, worker arguments; cap and steps added by `worker_args`)
    "so8t_hf": ("so8t_hf recipe as configured, cap", ["--system", "so8t_hf"]),
    "so8t_hf_acc16": ("so8t_hf, 1 x 1024 x acc 16, cap", ["--system", "so8t_hf", "--flags", *ACC16]),
    "so8t_hf_b4x4": ("so8t_hf, 4 x 1024 x acc 4, cap", ["--system", "so8t_hf", "--flags", *AFTER_BACKWARD,
                                                       "--per_device_train_batch_size", "4",
                                                       "--gradient_accumulation_steps", "4"]),
    "so8t_hf_oib16": ("so8t_hf + optimizer in backward, 16 x 1024 x acc 1, cap",
                      ["--system", "so8t_hf", "--flags", *OIB, "--per_device_train_batch_size", "16"]),
    "so8t_hf_oib8": ("so8t_hf + optimizer in backward, 8 x 1024 x acc 1, cap",
                     ["--system", "so8t_hf", "--flags", *OIB, "--per_device_train_batch_size", "8"]),
    "hf_trainer_capped": ("HF Trainer + sdpa + AdamW, cap", ["--system", "hf_trainer", "--flags", *ACC16]),
    "hf_trainer_uncapped": ("HF Trainer + sdpa + AdamW, no cap", ["--system", "hf_trainer", "--flags", *ACC16]),
}
PER_RUN_KEYS = ("so8t_hf", "so8t_hf_acc16", "so8t_hf_b4x4", "so8t_hf_oib16", "so8t_hf_oib8")  # top-level result keys
# timed without --only (so8t_hf_oib16 is what so8t_hf runs now: only by name, with --only)
TIMED = ["so8t_hf", "so8t_hf_acc16", "so8t_hf_b4x4", "so8t_hf_oib8", "hf_trainer_uncapped"]
ROW_KEYS = ("ok", "params", "peak_gib", "peak_reserved_gib", "tokens_per_s", "mfu", "mfu_non_embedding",
            "tokens_per_step", "micro_batch", "accumulation", "optimizer_in_backward", "step_times", "timed_steps",
            "losses", "grad_norms", "finite", "oom", "error")
BASELINE = ("transformers.Trainer + Phi3ForCausalLM + sdpa + fused fp32 AdamW, fp32 weights under bf16 autocast, "
            "activation checkpointing, dense 1024-token blocks")


def versions() -> dict:
    return package_versions("torch", "transformers", "trl", "accelerate", "bitsandbytes", "liger-kernel", "triton",
                            "datasets")


def device() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name}, {p.total_memory / 2**30:.1f} GiB"


def launch(name: str, args: list[str], a, timeout: float) -> subprocess.Popen:
    out = Path(a.out) / "runs"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE / "pretrain_worker.py"), "--tokenizer", a.tokenizer, "--tmp", f"/tmp/pb_{name}",
           "--out", str(out / f"{name}.json"), *args]
    log = open(out / f"{name}.log", "w")
    print(f"[{time.strftime('%X')}] {name} (limit {timeout:.0f} s): {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(
        os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
        PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True"))
    proc.bench_name, proc.deadline, proc.started = name, time.time() + timeout, time.time()
    return proc


def wait(procs: list) -> None:
    for proc in procs:
        try:
            proc.wait(timeout=max(1, proc.deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            print(f"{proc.bench_name}: killed at its time limit", flush=True)
        print(f"[{time.strftime('%X')}] {proc.bench_name}: exit {proc.returncode} after "
              f"{time.time() - proc.started:.0f} s", flush=True)


def load(a, name: str) -> dict:
    path = Path(a.out) / "runs" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {"ok": False, "error": "no result (time limit?)"}


def worker_args(name: str, a, tiny: list[str]) -> list[str]:
    """The worker's arguments for run `name`: cap, steps, profiling, the NaN probe, the tiny shapes of --smoke."""
    args = list(RUNS[name][1])
    extra = [] if name == "hf_trainer_uncapped" else ["--cap_gib", str(a.cap_gib)]
    if name == "hf_trainer_capped":  # it runs out of memory at its first backward: two steps are enough
        extra += ["--steps", "2", "--warmup", "0"]
    else:
        extra += ["--steps", str(a.steps), "--warmup", str(a.warmup)]
    if name in a.profile and a.profile_steps:
        extra += ["--profile_steps", str(a.profile_steps)]
    if a.nan_probe and name == "hf_trainer_uncapped":
        extra += ["--nan_probe"]
    flags = args[args.index("--flags") + 1:] if "--flags" in args else []
    head = args[:args.index("--flags")] if "--flags" in args else args
    return [*head, *extra, "--flags", *tiny, *flags] if tiny or flags else [*head, *extra]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", default="microsoft/Phi-3.5-mini-instruct")
    p.add_argument("--cap_gib", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--convergence_steps", type=int, default=300)
    p.add_argument("--layers", type=int, nargs="*", default=[24, 25, 26, 27, 28, 30, 32])
    p.add_argument("--budget_s", type=float, default=600, help="wall-clock budget of the whole benchmark")
    p.add_argument("--only", nargs="*", choices=list(RUNS) + ["size", "convergence"],
                   help="just these runs, one after another in this order (each killed at --run_timeout)")
    p.add_argument("--run_timeout", nargs="*", default=["120"],
                   help="with --only: seconds each run may take: a number (every run), NAME=SECONDS (one run)")
    p.add_argument("--profile", nargs="*", default=[], help="runs that add --profile_steps profiled steps")
    p.add_argument("--profile_steps", type=int, default=0)
    p.add_argument("--nan_probe", action="store_true", help="hf_trainer_uncapped: probe the first batch for NaNs")
    p.add_argument("--skip", nargs="*", default=[], help="runs to leave out (so8t_hf_b4x4, convergence, ...)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the harness, measures nothing")
    p.add_argument("--compose", action="store_true", help="only write the results files from --out/runs")
    p.add_argument("--merge_into", help="an earlier results JSON whose rows, size search and convergence stay")
    p.add_argument("--convergence_json", help="the convergence result of a separate run (e.g. on the CPU)")
    p.add_argument("--headline", help="the run whose figures are the top-level params / mfu (default: the --merge_into "
                   "file's headline run, else so8t_hf)")
    p.add_argument("--note", action="append", default=[], help="a note for the results files")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    given = list(argv if argv is not None else sys.argv[1:])  # the notes are in `notes`: elided here
    a.command = "python benchmarks/bench_pretrain.py " + shlex.join(
        "<note>" if i and given[i - 1] == "--note" else t for i, t in enumerate(given))
    tiny = ["--hidden_size", "64", "--num_attention_heads", "4", "--num_key_value_heads", "4", "--intermediate_size",
            "128", "--max_length", "64", "--dtype", "float32", "--optim", "adamw_torch", "--bf16", "false",
            "--use_liger_kernel", "false", "--num_hidden_layers", "2", "--gradient_accumulation_steps", "1",
            "--activation_checkpointing", "false"] if a.smoke else []
    start = time.time()
    if a.compose:  # only write the results files, from the run JSONs already in --out/runs (+ --convergence_json)
        return compose(a, start)
    left = lambda: a.budget_s - (time.time() - start)  # noqa: E731
    conv = ["--conv_hidden", "64", "--conv_layers", "2"] if a.smoke else []
    side = {"size": ["--system", "size", "--cap_gib", str(a.cap_gib), "--layers", *map(str, a.layers),
                     *(["--flags", *tiny] if tiny else [])],
            "convergence": ["--system", "convergence", "--steps", str(a.convergence_steps), *conv]}
    if a.only is not None:
        limits = {k: float(v) for k, _, v in (t.partition("=") for t in a.run_timeout if "=" in t)}
        default = next((float(t) for t in a.run_timeout if "=" not in t), 120.0)
        a.ran = list(a.only)
        for name in a.only:
            args = worker_args(name, a, tiny) if name in RUNS else side[name]
            wait([launch(name, args, a, max(10.0, min(limits.get(name, default), left() - 15)))])
        return compose(a, start)
    shares = {"so8t_hf": 0.15, "so8t_hf_acc16": 0.17, "so8t_hf_b4x4": 0.12, "so8t_hf_oib8": 0.12,
              "hf_trainer_uncapped": 0.15}  # of --budget_s; the size search and convergence get what is left
    timed = [name for name in TIMED if name not in a.skip]
    a.ran = [*timed, "hf_trainer_capped", *[n for n in side if n not in a.skip]]
    # the capped baseline runs out of memory at its first backward (fp32 weights + gradients alone are 11.3 GiB): it
    # starts beside the first timed run, whose timed steps come after its own start-up and warm-up steps
    oom_check = launch("hf_trainer_capped", worker_args("hf_trainer_capped", a, tiny), a, 0.3 * a.budget_s)
    for name in timed:
        wait([launch(name, worker_args(name, a, tiny), a, min(shares[name] * a.budget_s, left() - 30))])
    wait([oom_check])  # long done
    wait([launch(name, args, a, left()) for name, args in side.items() if name not in a.skip])
    compose(a, start)


def label(name: str, r: dict) -> str:
    """A row's label: for so8t_hf runs, the micro-batch, accumulation and optimizer_in_backward the run recorded (what
    `so8t_hf` means changed with the recipe's default); else, or without them, the label in `RUNS`."""
    if not name.startswith("so8t_hf") or r.get("micro_batch") is None or r.get("accumulation") is None:
        return RUNS.get(name, (name,))[0]
    what = ("so8t_hf recipe" if name == "so8t_hf" else "so8t_hf") + (
        " + optimizer in backward" if r.get("optimizer_in_backward") else "")
    return f"{what}, {r['micro_batch']} x {r.get('block') or 1024} x acc {r['accumulation']}, cap"


def row(name: str, r: dict, call: int) -> dict:
    """One results row: the run's figures (and its profile summary / NaN probe) from its JSON."""
    out = {"name": name, "label": label(name, r), "call": call, **{k: r.get(k) for k in ROW_KEYS}}
    profile = r.get("profile")
    if isinstance(profile, dict):
        out["profile"] = {k: profile.get(k) for k in ("steps", "wall_ms", "host_self_ms", "device_self_ms",
                                                      "device_busy", "line", "top", "error") if k in profile}
        out["profile_table"] = profile.get("table")
    if r.get("nan_probe") is not None:
        out["nan_probe"] = r["nan_probe"]
    return out


def from_old_format(old: dict) -> dict:
    """An earlier results file without `rows` (one call): its runs as rows of call 0. That format predates
    optimizer_in_backward: its so8t_hf run is the recipe of then, 1 x 1024 x accumulation 16 (its `config` says so)."""
    call = {k: old.get(k) for k in ("device", "versions", "command", "cap_gib", "wall_s")}
    call["notes"] = old.get("notes") or []
    then = dict(micro_batch=1, accumulation=16, optimizer_in_backward=False, block=1024)
    recipe = old.get("so8t_hf") and {**then, **{k: v for k, v in old["so8t_hf"].items() if v is not None}}
    runs = {"so8t_hf": recipe, "so8t_hf_b4x4": old.get("so8t_hf_b4x4"),
            "hf_trainer_capped": (old.get("baseline") or {}).get("capped"),
            "hf_trainer_uncapped": (old.get("baseline") or {}).get("uncapped")}
    rows = [row(name, r, 0) for name, r in runs.items() if r and "not run" not in str(r.get("error"))]
    return {**old, "calls": [call], "rows": rows}


def latest(rows: list[dict], name: str) -> dict:
    found = [r for r in rows if r["name"] == name]
    return found[-1] if found else {"ok": False, "error": "not measured"}


def compose(a, start: float) -> None:
    ran = getattr(a, "ran", None)
    names = list(RUNS) + ["size", "convergence"]
    if ran is None:  # --compose: every run JSON found in --out/runs
        ran = [n for n in names if (Path(a.out) / "runs" / f"{n}.json").is_file()]
    r = {name: load(a, name) for name in ran}
    if a.convergence_json:
        r["convergence"] = json.loads(Path(a.convergence_json).read_text())
    old = json.loads(Path(a.merge_into).read_text()) if a.merge_into else None
    if old is not None and "rows" not in old:
        old = from_old_format(old)
    calls = list(old["calls"]) if old else []
    rows = list(old["rows"]) if old else []
    measured = [r[n] for n in ran if r[n].get("device")]  # composed elsewhere: the runs' own device and versions
    call = {"device": measured[0]["device"] if measured else device(),
            "versions": measured[0]["versions"] if measured else versions(), "command": a.command, "cap_gib": a.cap_gib,
            "wall_s": time.time() - start, "notes": a.note, "date": time.strftime("%Y-%m-%d")}
    calls.append(call)
    rows += [row(name, r[name], len(calls) - 1) for name in ran if name in RUNS]
    headline = a.headline or ((old or {}).get("headline") or {}).get("run") or "so8t_hf"
    head = latest(rows, headline)
    size = r.get("size") or {}
    conv = r.get("convergence")
    result = {
        "device": call["device"], "versions": call["versions"], "cap_gib": a.cap_gib, "command": a.command,
        "config": "recipes/configs/pretrain_1p5b.yaml (bf16 weights, adamw_bnb_8bit, activation checkpointing, Liger, "
                  "so8t attention, packed 1024-token blocks; optimizer_in_backward, batch 16 x 1024, no accumulation, "
                  "no clipping; until 2026-12-07 batch 1 x accumulation 16, clipping 1.0, as the so8t_hf rows of "
                  "calls 0 and 1 ran: each row's label, micro_batch, accumulation and optimizer_in_backward say which)",
        "headline": {"run": headline, "call": head.get("call")},
        "params": head.get("params"), "peak_gib": head.get("peak_gib"),
        "tokens_per_s": head.get("tokens_per_s"), "mfu": head.get("mfu"),
        **{name: {k: v for k, v in latest(rows, name).items() if k in ROW_KEYS + ("call", "label")}
           for name in PER_RUN_KEYS},
        "baseline": {"system": BASELINE, "capped": latest(rows, "hf_trainer_capped"),
                     "uncapped": latest(rows, "hf_trainer_uncapped")},
        "max_trainable_params_10gib": size.get("max_trainable_params") if size.get("trials") else
        (old or {}).get("max_trainable_params_10gib"),
        "size_search": size.get("trials") if size.get("trials") else (old or {}).get("size_search"),
        "convergence": {k: v for k, v in conv.items() if k not in ("system", "cap_gib", "flags")}
        if conv and conv.get("variants") else (old or {}).get("convergence"),
        "mfu_definition": "6 N tokens/s / 989 TFLOP/s (dense bf16 peak, H100/H200 SXM); N = all parameters; "
                          "mfu_non_embedding leaves the input embedding out",
        "wall_s": call["wall_s"],
        "notes": [*((old or {}).get("notes") or []), *a.note],
        "calls": calls, "rows": rows,
    }
    for key in PER_RUN_KEYS:
        result[key].pop("step_times", None)  # the rows keep them
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain_h100.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "pretrain_h100.md").write_text(markdown(result) + "\n")
    print(markdown(result))


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _status(r: dict) -> str:
    if r.get("ok"):
        return "ok, non-finite loss / grad norm" if r.get("finite") is False else "ok"
    return "out of memory" if r.get("oom") else f"failed: {r.get('error')}"


def markdown(res: dict) -> str:
    calls = res.get("calls") or []
    lines = [f"# Pre-training from scratch, 1.5B SO8T-Phi3 ({res['device']})", "",
             f"Memory cap: {res['cap_gib']} GiB (`torch.cuda.set_per_process_memory_fraction`). MFU: "
             + res["mfu_definition"] + ". Call: the device call of each row (below the table).", "",
             *[f"- {note}" for note in res.get("notes") or []], *([""] if res.get("notes") else []),
             "| call | run | params (B) | peak GiB (reserved) | tokens/s | MFU | MFU (non-emb.) | step s | grad norm "
             "(first / last) | result |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res.get("rows") or []:
        times = (r.get("step_times") or [])
        timed = times[-r["timed_steps"]:] if r.get("timed_steps") and len(times) >= r["timed_steps"] else []
        step = sum(timed) / len(timed) if timed else None
        norms = [g for g in (r.get("grad_norms") or []) if g is not None]
        norm = f"{norms[0]:.3g} / {norms[-1]:.3g}" if norms else "-"
        lines.append(f"| {r['call']} | {r['label']} | {_fmt(r['params'] / 1e9 if r.get('params') else None, '.3f')} | "
                     f"{_fmt(r.get('peak_gib'))} ({_fmt(r.get('peak_reserved_gib'))}) | "
                     f"{_fmt(r.get('tokens_per_s'), ',.0f')} | {_fmt(r.get('mfu'), '.1%')} | "
                     f"{_fmt(r.get('mfu_non_embedding'), '.1%')} | {_fmt(step, '.3f')} | {norm} | {_status(r)} |")
    lines += [""] + [f"- Call {i}: {c.get('device')}, {c.get('date', '')} `{c.get('command')}`; versions "
                     f"{c.get('versions')}" for i, c in enumerate(calls)]
    for r in res.get("rows") or []:
        if r.get("nan_probe"):
            lines += ["", f"NaN probe of {r['name']} (call {r['call']}; one forward/backward of the first batch before "
                          f"training): `{json.dumps(r['nan_probe'])}`"]
        if r.get("profile"):
            lines += ["", f"Profile of {r['name']} (call {r['call']}): {r['profile'].get('line') or r['profile']}"]
            if r.get("profile_table"):
                lines += ["", "```", r["profile_table"].rstrip(), "```"]
    lines += ["", f"Largest trainable under the cap (d 2048, growing depth): **{res['max_trainable_params_10gib']}** "
              "parameters.", "", "| layers | params (B) | peak GiB | fits |", "| --- | --- | --- | --- |"]
    for t in res.get("size_search") or []:
        lines.append(f"| {t['layers']} | {_fmt(t['params'] / 1e9 if t.get('params') else None, '.3f')} | "
                     f"{_fmt(t.get('peak_gib'))} | "
                     f"{'yes' if t['fits'] else 'no (' + ('OOM' if t.get('oom') else t.get('error', '')[:80]) + ')'} |")
    conv = res.get("convergence") or {}
    lines += ["", f"Convergence ({conv.get('model')}, {conv.get('steps')} steps x {conv.get('tokens_per_step')} tokens, "
              f"{conv.get('data')}): eval loss at each quarter, and the final gap to fp32 AdamW.", "",
              *[f"{k.capitalize()}: {conv[k]}" + "  " for k in ("command", "note", "lr") if conv.get(k)], "",
              "| variant | eval loss (25/50/75/100%) | final - fp32 |", "| --- | --- | --- |"]
    for name, v in (conv.get("variants") or {}).items():
        lines.append(f"| {name} | {' / '.join(f'{x:.4f}' for x in v['eval_loss'])} | "
                     f"{_fmt(v.get('final_eval_loss_vs_fp32'), '+.4f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
