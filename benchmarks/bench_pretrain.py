"""Pre-training benchmark (`make bench-pretrain`): the 1.5B recipe under a GPU memory cap, against plain
`transformers.Trainer` + sdpa + fp32 AdamW on the same shape, the largest trainable size under the cap, and the
loss cost of each memory choice against fp32 AdamW (a small model, same data and steps).

    python benchmarks/bench_pretrain.py --tokenizer .fixtures/phi35-tokenizer --cap_gib 10 --out $OUT

Runs (one process each, `pretrain_worker.py`; the timed ones alone on the GPU, then the OOM check under the cap, the
size search and the convergence comparison side by side, since they time nothing):
- `so8t_hf`: recipe `pretrain_1p5b.yaml` (batch 1 x 1024, accumulation 16) under the cap; `so8t_hf_b4x4`: the same
  tokens per step as batch 4 x accumulation 4.
- `hf_trainer_uncapped`, `hf_trainer_capped`: the stock baseline without and with the cap.
- `size`: depth 24, 25, 26, ... at d 2048 under the cap until one runs out of memory -> `max_trainable_params_10gib`.
- `convergence`: fp32 AdamW vs bf16 weights, 8-bit AdamW states, both, and the recipe's full set (+ checkpointing,
  Liger), eval loss at the same steps.
Writes `pretrain_h100.json` and `pretrain_h100.md` into --out (device, versions, command, figures); each run's JSON too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "trl", "accelerate", "bitsandbytes", "liger-kernel", "triton", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


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
    print(f"[{time.strftime('%X')}] {name}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                                      PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True"))
    proc.bench_name, proc.deadline = name, time.time() + timeout
    return proc


def wait(procs: list) -> None:
    for proc in procs:
        try:
            proc.wait(timeout=max(1, proc.deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            print(f"{proc.bench_name}: killed at its time limit", flush=True)


def load(a, name: str) -> dict:
    path = Path(a.out) / "runs" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {"ok": False, "error": "no result (time limit?)"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", default="microsoft/Phi-3.5-mini-instruct")
    p.add_argument("--cap_gib", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after 2 warm-up steps)")
    p.add_argument("--convergence_steps", type=int, default=300)
    p.add_argument("--layers", type=int, nargs="*", default=[24, 25, 26, 27, 28, 30, 32])
    p.add_argument("--budget_s", type=float, default=290, help="wall-clock budget of the whole benchmark")
    p.add_argument("--skip", nargs="*", default=[], help="runs to leave out (so8t_hf_b4x4, convergence, ...)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the harness, measures nothing")
    p.add_argument("--compose", action="store_true", help="only write the results files from --out/runs")
    p.add_argument("--convergence_json", help="the convergence result of a separate run (e.g. on the CPU)")
    p.add_argument("--note", action="append", default=[], help="with --compose: a note for the results files")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    a.command = "python benchmarks/bench_pretrain.py " + " ".join(argv if argv is not None else sys.argv[1:])
    tiny = ["--hidden_size", "64", "--num_attention_heads", "4", "--num_key_value_heads", "4", "--intermediate_size",
            "128", "--max_length", "64", "--dtype", "float32", "--optim", "adamw_torch", "--bf16", "false",
            "--use_liger_kernel", "false", "--num_hidden_layers", "2", "--gradient_accumulation_steps", "1",
            "--activation_checkpointing", "false"] if a.smoke else []
    start = time.time()
    if a.compose:  # only write the results files, from the run JSONs already in --out/runs (+ --convergence_json)
        return compose(a, start)
    left = lambda: a.budget_s - (time.time() - start)  # noqa: E731
    cap = ["--cap_gib", str(a.cap_gib)]
    steps = ["--steps", str(a.steps)]
    timed = [("so8t_hf", ["--system", "so8t_hf", *cap, *steps], 0.36),
             ("so8t_hf_b4x4", ["--system", "so8t_hf", *cap, *steps, "--flags", "--per_device_train_batch_size", "4",
                               "--gradient_accumulation_steps", "4"], 0.25),
             ("hf_trainer_uncapped", ["--system", "hf_trainer", *steps], 0.32)]
    flags = lambda args: args + ([] if "--flags" in args else ["--flags"]) + tiny if tiny else args  # noqa: E731
    timed = [t for t in timed if t[0] not in a.skip]
    # the capped baseline runs out of memory at its first backward (fp32 weights + gradients alone are 11.3 GiB): it
    # starts beside the first timed run, whose timed steps come after its own start-up and 2 warm-up steps
    oom_check = launch("hf_trainer_capped", flags(["--system", "hf_trainer", *cap, "--steps", "2", "--warmup", "0"]),
                       a, 0.3 * a.budget_s)
    for name, args, share in timed:
        wait([launch(name, flags(args), a, min(share * a.budget_s, left() - 30))])
    wait([oom_check])  # long done
    conv = ["--conv_hidden", "64", "--conv_layers", "2"] if a.smoke else []
    side = [("size", flags(["--system", "size", *cap, "--layers", *map(str, a.layers)])),
            ("convergence", ["--system", "convergence", "--steps", str(a.convergence_steps), *conv])]
    wait([launch(name, args, a, left()) for name, args in side if name not in a.skip])
    compose(a, start)


def compose(a, start: float) -> None:
    r = {name: {"ok": False, "error": "not run (--skip)"} if name in a.skip else load(a, name) for name in ("so8t_hf", "so8t_hf_b4x4", "hf_trainer_uncapped", "hf_trainer_capped",
                                          "size", "convergence")}
    if a.convergence_json:
        r["convergence"] = json.loads(Path(a.convergence_json).read_text())
    pick = lambda d, *keys: {k: d.get(k) for k in keys}  # noqa: E731
    keys = ("ok", "params", "peak_gib", "peak_reserved_gib", "tokens_per_s", "mfu", "mfu_non_embedding", "tokens_per_step", "oom", "error")
    result = {
        "device": device(), "versions": versions(), "cap_gib": a.cap_gib,
        "command": a.command,
        "config": "recipes/configs/pretrain_1p5b.yaml (bf16 weights, adamw_bnb_8bit, activation checkpointing, Liger, "
                  "so8t attention, packed 1024-token blocks, batch 1 x accumulation 16)",
        "params": r["so8t_hf"].get("params"), "peak_gib": r["so8t_hf"].get("peak_gib"),
        "tokens_per_s": r["so8t_hf"].get("tokens_per_s"), "mfu": r["so8t_hf"].get("mfu"),
        "so8t_hf": pick(r["so8t_hf"], *keys), "so8t_hf_b4x4": pick(r["so8t_hf_b4x4"], *keys),
        "baseline": {"system": "transformers.Trainer + Phi3ForCausalLM + sdpa + fused fp32 AdamW, fp32 weights under "
                               "bf16 autocast, activation checkpointing, dense 1024-token blocks",
                     "capped": pick(r["hf_trainer_capped"], *keys), "uncapped": pick(r["hf_trainer_uncapped"], *keys)},
        "max_trainable_params_10gib": r["size"].get("max_trainable_params"),
        "size_search": r["size"].get("trials"),
        "convergence": {k: v for k, v in r["convergence"].items() if k not in ("system", "cap_gib", "flags")},
        "mfu_definition": "6 N tokens/s / 989 TFLOP/s (dense bf16 peak, H100/H200 SXM); N = all parameters; "
                          "mfu_non_embedding leaves the input embedding out",
        "wall_s": time.time() - start,
    }
    out = Path(a.out)
    earlier = out / "pretrain_h100.json"
    if a.compose and earlier.is_file():  # composed elsewhere: the device, versions and command of the runs
        runs = json.loads(earlier.read_text())
        result.update({k: runs[k] for k in ("device", "versions", "command", "wall_s", "cap_gib")})
        result["composed_with"] = a.command
    result["notes"] = a.note
    (out / "pretrain_h100.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "pretrain_h100.md").write_text(markdown(result) + "\n")
    print(markdown(result))


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    rows = [("so8t_hf recipe, 1 x 1024 x acc 16, cap", res["so8t_hf"]), ("so8t_hf, 4 x 1024 x acc 4, cap", res["so8t_hf_b4x4"]),
            ("HF Trainer + sdpa + AdamW, cap", res["baseline"]["capped"]),
            ("HF Trainer + sdpa + AdamW, no cap", res["baseline"]["uncapped"])]
    lines = [f"# Pre-training from scratch, 1.5B SO8T-Phi3 ({res['device']})", "",
             f"Command: `{res['command']}`  ", f"Versions: {res['versions']}  ", f"Memory cap: {res['cap_gib']} GiB "
             "(`torch.cuda.set_per_process_memory_fraction`). MFU: " + res["mfu_definition"] + ".", "",
             *[f"- {note}" for note in res.get("notes") or []], *([""] if res.get("notes") else []),
             "| run | params (B) | peak GiB (reserved) | tokens/s | MFU | MFU (non-emb.) | result |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows:
        status = "ok" if r.get("ok") else ("out of memory" if r.get("oom") else f"failed: {r.get('error')}")
        lines.append(f"| {name} | {_fmt(r['params'] / 1e9 if r.get('params') else None, '.3f')} | {_fmt(r.get('peak_gib'))} "
                     f"({_fmt(r.get('peak_reserved_gib'))}) | {_fmt(r.get('tokens_per_s'), ',.0f')} | {_fmt(r.get('mfu'), '.1%')} | "
                     f"{_fmt(r.get('mfu_non_embedding'), '.1%')} | {status} |")
    lines += ["", f"Largest trainable under the cap (d 2048, growing depth): **{res['max_trainable_params_10gib']}** "
              "parameters.", "", "| layers | params (B) | peak GiB | fits |", "| --- | --- | --- | --- |"]
    for t in res.get("size_search") or []:
        lines.append(f"| {t['layers']} | {_fmt(t['params'] / 1e9 if t.get('params') else None, '.3f')} | {_fmt(t.get('peak_gib'))} | "
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
