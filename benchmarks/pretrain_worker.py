"""One run of the pre-training benchmark (`bench_pretrain.py` starts one process per run, so each peak is its own).

Systems:
- `so8t_hf`: the 1.5B recipe (`recipes/configs/pretrain_1p5b.yaml` through `so8t_hf.pretrain`'s builders and
  `PretrainTrainer`): bf16 weights, bitsandbytes 8-bit AdamW, optimizer in backward at 16 x 1024, activation
  checkpointing, Liger, so8t attention, packed blocks with per-document positions. `--flags` change it (e.g.
  `--optimizer_in_backward false --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --max_grad_norm 1`).
- `hf_trainer`: the same shape as a stock `transformers.Phi3ForCausalLM` (built as ours is: `_from_config` on the
  device, fp32), plain `transformers.Trainer`, sdpa, fp32 weights under bf16 autocast, fused fp32 AdamW, activation
  checkpointing, dense 1024-token blocks. `--nan_probe`: one forward/backward on the first batch before training,
  with forward hooks: the first module whose output is not finite, non-finite weights and gradients (JSON `nan_probe`).
- `size`: the so8t_hf recipe as configured (and `--flags`) at growing depth (d 2048) under the cap, two optimizer
  steps each, until one runs out of memory: the largest that ran is `max_trainable_params`.
- `convergence`: one small model (same init, data, order, steps) trained with each memory choice (`VARIANTS`: weights
  dtype, optimizer, checkpointing + Liger, clipping, optimizer-in-backward; batch 8, no accumulation); eval loss vs fp32.

Writes one JSON (`--out`), with the run's micro-batch, accumulation and optimizer_in_backward even when it fails. Timed steps: `StepTimer` (a CUDA sync closes each optimizer step), after `--warmup` steps;
each run records step times, losses, gradient norms, peak GiB (allocated, reserved), tokens/s, MFU (6N).
`--profile_steps N`: torch.profiler (CPU + CUDA) over N more optimizer steps after the timed ones; the JSON's `profile`
holds the top-25 ops by self device time (table and rows) and the profiled wall, host and device times.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
logger = logging.getLogger("pretrain_worker")
CONFIG = REPO / "recipes" / "configs" / "pretrain_1p5b.yaml"
SETTINGS: dict = {}  # the last parsed run's micro-batch, accumulation, optimizer_in_backward (kept if the run fails)


def parse_recipe(tokenizer: str, out_dir: str, flags: list[str]):
    from so8t_hf.pretrain import make_parser

    from so8t_hf.pretrain.config import PretrainDataConfig

    model_args, _, args = make_parser().parse_args_and_config(
        ["--config", str(CONFIG), "--tokenizer_name_or_path", tokenizer, "--output_dir", out_dir, "--eval_blocks", "0",
         "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
         "--dataloader_num_workers", "0", "--log_line", "false", *flags])
    SETTINGS.update(micro_batch=args.per_device_train_batch_size, accumulation=args.gradient_accumulation_steps,
                    optimizer_in_backward=args.optimizer_in_backward, max_grad_norm=args.max_grad_norm,
                    block=args.max_length)
    return model_args, PretrainDataConfig(dummy_documents=6000), args  # the yaml's data: dummy documents here


def so8t_trainer(a, flags: list[str], layers: int | None = None):
    from so8t_hf.pretrain.pipeline import PretrainTrainer, build_data, build_model, build_tokenizer, prepare_training_args

    model_args, data_args, args = parse_recipe(a.tokenizer, a.tmp, flags)
    if layers:
        model_args.num_hidden_layers = layers
    tokenizer = build_tokenizer(model_args)
    block = prepare_training_args(args, False, False)
    train, _ = build_data(data_args, tokenizer, block, args.seed)
    model = build_model(model_args, tokenizer)
    return PretrainTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer), block


def hf_trainer(a, flags: list[str]):
    from transformers import Phi3Config, Phi3ForCausalLM, Trainer, TrainingArguments, default_data_collator

    from so8t_hf.pretrain.callbacks import StepTimer
    from so8t_hf.pretrain.pipeline import build_data, build_tokenizer, model_config, prepare_training_args

    model_args, data_args, args = parse_recipe(a.tokenizer, a.tmp, flags)
    tokenizer = build_tokenizer(model_args)
    block = prepare_training_args(args, False, False)
    train, _ = build_data(data_args, tokenizer, block, args.seed)
    train = train.filter(lambda row: len(row["input_ids"]) == block).select_columns(["input_ids", "labels"])
    train = train.map(lambda row: {"attention_mask": [1] * len(row["input_ids"])})
    shape = model_config(model_args, tokenizer).to_dict()
    for key in ("so8t_layers", "so8t_attn_backend", "model_type", "auto_map", "architectures"):
        shape.pop(key, None)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # built as ours is (build_model): _from_config
        model = Phi3ForCausalLM._from_config(Phi3Config(**shape, attn_implementation="sdpa"), dtype=torch.float32)
    targs = TrainingArguments(
        output_dir=a.tmp, per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_steps=args.max_steps,
        learning_rate=args.learning_rate, warmup_steps=10, weight_decay=0.1, bf16=torch.cuda.is_available(),
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0, use_cpu=not torch.cuda.is_available())
    timer = StepTimer()
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=default_data_collator,
                      callbacks=[timer])
    trainer.step_timer = timer
    return trainer, block


class ProfileSteps(TrainerCallback):
    """torch.profiler (CPU + CUDA) over optimizer steps `start + 1 .. start + n` (`summary()`: see the module doc)."""

    def __init__(self, start: int, n: int):
        self.start, self.n, self.prof, self.wall_s = start, n, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.prof is None and state.global_step == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
            self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and self.wall_s is None and state.global_step == self.start + self.n:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.wall_s = time.perf_counter() - self._t0
            self.prof.__exit__(None, None, None)

    def summary(self, rows: int = 25) -> dict:
        if self.prof is None or self.wall_s is None:
            return {"error": "the profiled steps did not run"}
        events = self.prof.key_averages()
        device = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        sort = device if torch.cuda.is_available() else "self_cpu_time_total"
        top = sorted(events, key=lambda e: getattr(e, sort), reverse=True)[:rows]
        on_cpu = lambda e: e.device_type == torch.autograd.DeviceType.CPU  # noqa: E731 - as the table's footer sums
        host_ms = sum(e.self_cpu_time_total for e in events) / 1e3
        device_ms = sum(getattr(e, device) for e in events if not on_cpu(e)) / 1e3  # kernels (and memcpy / memset)
        wall_ms = self.wall_s * 1e3
        return dict(
            steps=self.n, sort_by=sort, wall_ms=wall_ms, host_self_ms=host_ms, device_self_ms=device_ms,
            device_busy=device_ms / wall_ms if wall_ms else None,
            line=f"{self.n} optimizer step(s): wall {wall_ms:.1f} ms, host (self CPU, all ops) {host_ms:.1f} ms, device "
                 f"(self CUDA, all kernels) {device_ms:.1f} ms = {device_ms / wall_ms:.0%} of the wall",
            top=[dict(name=e.key, count=e.count, self_device_ms=getattr(e, device) / 1e3,
                      self_cpu_ms=e.self_cpu_time_total / 1e3) for e in top],
            table=events.table(sort_by=sort, row_limit=rows, max_name_column_width=60))


def finite(x) -> bool:
    return x is not None and math.isfinite(x)


def nan_probe(trainer) -> dict:
    """One forward/backward on the first training batch, as the Trainer runs it (bf16 autocast, checkpointing), with
    forward hooks: the first module (in execution order) whose output is not finite, and any non-finite weights or
    gradients. It runs before training, on the initial weights (after a non-finite step they would be NaN too)."""
    model = trainer.model.train()
    if trainer.args.gradient_checkpointing:  # as the Trainer's loop will set it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    bad_params = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    first, handles = [], []

    def hook(name):
        def check(module, args, output):
            tensors = [output] if isinstance(output, torch.Tensor) else [
                t for t in (output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list))
                            else [getattr(output, "logits", None), getattr(output, "loss", None)])
                if isinstance(t, torch.Tensor)]
            if not first and any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors):
                inputs_ok = all(torch.isfinite(a).all().item() for a in args if isinstance(a, torch.Tensor)
                                and a.is_floating_point())
                first.append(dict(module=name, type=type(module).__name__, inputs_finite=inputs_ok,
                                  output_dtype=str(tensors[0].dtype)))
        return check

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(hook(name or "<model>")))
    bf16 = trainer.args.bf16 and torch.cuda.is_available()
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch)
        out.loss.backward()
    finally:
        for h in handles:
            h.remove()
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    bad_grads = [n for n, g in grads if not torch.isfinite(g).all()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for _, g in grads])).item()
    model.zero_grad(set_to_none=True)
    result = dict(loss=out.loss.item(), grad_norm=norm, autocast_bf16=bf16, first_nonfinite_module=first[0] if first
                  else None, nonfinite_params=bad_params[:10], nonfinite_param_count=len(bad_params),
                  nonfinite_grads=bad_grads[:10], nonfinite_grad_count=len(bad_grads))
    logger.info("nan probe: %s", result)
    return result


def timed_train(trainer, block: int, warmup: int, steps: int | None = None, profile_steps: int = 0) -> dict:
    args = trainer.args
    profiler = None
    if profile_steps:
        profiler = ProfileSteps(warmup + (steps or 0), profile_steps)
        trainer.add_callback(profiler)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    times = trainer.step_timer.times or []
    logs = [e for e in trainer.state.log_history if "loss" in e]
    losses = [e["loss"] for e in logs]
    grad_norms = [e.get("grad_norm") for e in logs]
    step_times = [e["step_time"] for e in trainer.state.log_history if "step_time" in e] or times
    timed = step_times[warmup:warmup + steps] if steps else step_times[warmup:]
    timed = timed or step_times
    tokens = args.per_device_train_batch_size * args.gradient_accumulation_steps * block
    n = sum(p.numel() for p in trainer.model.parameters())
    tps = tokens / statistics.mean(timed)
    extra = {}
    if profiler:
        try:
            extra["profile"] = profiler.summary()
        except Exception as err:  # noqa: BLE001 - a profiler failure must not lose the measured figures
            logger.exception("profile summary failed")
            extra["profile"] = {"error": f"{type(err).__name__}: {err}"}
    return dict(params=n, tokens_per_step=tokens, micro_batch=args.per_device_train_batch_size,
                accumulation=args.gradient_accumulation_steps, block=block,
                optimizer_in_backward=getattr(args, "optimizer_in_backward", False),
                optim=str(getattr(args.optim, "value", args.optim)),
                max_grad_norm=args.max_grad_norm, step_times=step_times, timed_steps=len(timed), losses=losses,
                grad_norms=grad_norms, finite=all(finite(x) for x in losses + grad_norms), tokens_per_s=tps, **extra,
                wall_s=wall, peak_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
                mfu=6 * n * tps / peak_flops() if torch.cuda.is_available() else None,
                mfu_non_embedding=6 * (n - trainer.model.get_input_embeddings().weight.numel()) * tps / peak_flops()
                if torch.cuda.is_available() else None)


def peak_flops() -> float:
    """Dense bf16 peak of the GPU (H100 / H200 SXM 989 TFLOP/s; H100 PCIe 756)."""
    name = torch.cuda.get_device_name(0)
    return 756e12 if "PCIe" in name else 989e12


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def partial(a, result: dict) -> None:
    """Write what is done so far: a run stopped at its time limit still reports it."""
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


def run_size(a) -> dict:
    trials = []
    for layers in a.layers:
        trainer = None
        try:
            trainer, block = so8t_trainer(a, ["--max_steps", "2", *a.flags], layers=layers)  # the recipe as configured
            result = timed_train(trainer, block, 0)
            trials.append(dict(layers=layers, params=result["params"], peak_gib=result["peak_gib"],
                               peak_reserved_gib=result["peak_reserved_gib"], fits=True))
        except Exception as err:  # noqa: BLE001 - OOM ends the search; anything else is reported
            trials.append(dict(layers=layers, fits=False, oom=is_oom(err), error=str(err)[:300]))
        logger.info("size trial: %s", trials[-1])
        partial(a, dict(system="size", partial=True, trials=trials))
        del trainer
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        if not trials[-1]["fits"]:
            break
    fits = [t for t in trials if t["fits"]]
    return dict(trials=trials, max_trainable_params=max((t["params"] for t in fits), default=None),
                max_trainable_layers=max((t["layers"] for t in fits), default=None))


VARIANTS = {  # name: (weights dtype, optim, checkpointing + Liger, max_grad_norm, optimizer_in_backward)
    "fp32_adamw": ("float32", "adamw_torch", False, 1.0, False),
    "bf16_weights_fp32_adamw": ("bfloat16", "adamw_torch", False, 1.0, False),
    "fp32_weights_adamw_8bit": ("float32", "adamw_bnb_8bit", False, 1.0, False),
    "bf16_weights_adamw_8bit": ("bfloat16", "adamw_bnb_8bit", False, 1.0, False),
    "bf16_weights_adamw_8bit_no_clipping": ("bfloat16", "adamw_bnb_8bit", False, 0.0, False),
    "recipe_bf16_8bit_checkpointing_liger": ("bfloat16", "adamw_bnb_8bit", True, 1.0, False),
    "recipe_optimizer_in_backward": ("bfloat16", "adamw_bnb_8bit", True, 0.0, True),  # the 1.5B yaml's default
}


def run_convergence(a) -> dict:
    from so8t_hf.pretrain import make_parser
    from so8t_hf.pretrain.pipeline import PretrainTrainer, build_model, build_tokenizer, prepare_training_args
    from so8t_hf.pretrain.data import pack_documents, split_eval
    from datasets import Dataset

    texts = [p.read_text(encoding="utf-8") for p in sorted(REPO.glob("**/*.py")) + sorted(REPO.glob("**/*.md"))
             if "outputs" not in p.parts and not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    results, blocks = {}, None
    for name, (dtype, optim, fast, clip, in_backward) in VARIANTS.items():
        if optim.endswith("8bit") and importlib.util.find_spec("bitsandbytes") is None:
            logger.warning("convergence %s: bitsandbytes is not installed: skipped", name)
            continue
        model_args, _, args = make_parser().parse_args_and_config(
            ["--config", str(CONFIG), "--tokenizer_name_or_path", a.tokenizer, "--output_dir", a.tmp, "--dataset_path",
             "x", "--hidden_size", str(a.conv_hidden), "--num_hidden_layers", str(a.conv_layers),
             "--num_attention_heads", "8", "--num_key_value_heads", "8", "--intermediate_size", str(3 * a.conv_hidden), "--dtype", dtype, "--optim", optim,
             "--max_length", str(a.conv_seq), "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
             "--max_steps", str(a.steps), "--warmup_steps", "30", "--learning_rate", "1e-3", "--eval_strategy",
             "steps", "--eval_steps", str(a.steps // 4), "--save_strategy", "no", "--logging_steps", "10",
             "--activation_checkpointing", str(fast).lower(), "--use_liger_kernel", str(fast).lower(),
             "--max_grad_norm", str(clip), "--optimizer_in_backward", str(in_backward).lower(),
             "--disable_tqdm", "true", "--log_line", "false", "--bf16", str(torch.cuda.is_available()).lower(),
             "--dataloader_num_workers", "0", "--per_device_eval_batch_size", "8", *a.flags])
        torch.manual_seed(0)
        tokenizer = build_tokenizer(model_args)
        prepare_training_args(args, False, True)
        if blocks is None:  # the same blocks, split and order for every variant
            blocks = pack_documents(Dataset.from_dict({"text": texts}), tokenizer, a.conv_seq)
        train, evaluation = split_eval(blocks, a.conv_eval_blocks, 0)
        model = build_model(model_args, tokenizer)
        trainer = PretrainTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                                  processing_class=tokenizer)
        trainer.train()
        log = trainer.state.log_history
        results[name] = dict(dtype=dtype, optim=optim, checkpointing_liger=fast, max_grad_norm=clip,
                             optimizer_in_backward=in_backward,
                             eval_loss=[e["eval_loss"] for e in log if "eval_loss" in e],
                             train_loss=[e["loss"] for e in log if "loss" in e],
                             train_tokens=sum(len(ids) for ids in train["input_ids"]), params=sum(p.numel() for p in model.parameters()))
        logger.info("convergence %s: eval %s", name, results[name]["eval_loss"])
        partial(a, dict(system="convergence", partial=True, steps=a.steps, variants=results))
        del trainer, model
        gc.collect()
    ref = results.get("fp32_adamw", {}).get("eval_loss")
    for r in results.values():
        r["final_eval_loss_vs_fp32"] = r["eval_loss"][-1] - ref[-1] if ref else None
    return dict(model=f"SO8T-Phi3 d{a.conv_hidden} x {a.conv_layers} layers, tokenizer {a.tokenizer}",
                device="cuda" if torch.cuda.is_available() else "cpu", steps=a.steps, tokens_per_step=8 * a.conv_seq,
                data=f"this repository's .py and .md files, packed {a.conv_seq}-token blocks, {a.conv_eval_blocks} held out, same order (no hidden folders)",
                lr="1e-3, 30 warm-up steps, cosine", variants=results)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--system", required=True, choices=["so8t_hf", "hf_trainer", "size", "convergence"])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--cap_gib", type=float, default=None)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile_steps", type=int, default=0, help="torch.profiler over N steps after the timed ones")
    p.add_argument("--nan_probe", action="store_true", help="hf_trainer: probe the first batch for non-finite output")
    p.add_argument("--layers", type=int, nargs="*", default=[24, 28, 32, 36, 40])
    p.add_argument("--conv_hidden", type=int, default=512)
    p.add_argument("--conv_layers", type=int, default=6)
    p.add_argument("--conv_seq", type=int, default=256)
    p.add_argument("--conv_eval_blocks", type=int, default=64)
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="recipe flags (last)")
    p.add_argument("--tmp", default="/tmp/pretrain_bench")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from so8t_hf.pretrain.pipeline import cap_gpu_memory

    cap_gpu_memory(a.cap_gib)
    from bench_pretrain import device, versions  # beside this file

    result = dict(system=a.system, cap_gib=a.cap_gib, flags=a.flags, device=device(), versions=versions())
    try:
        if a.system == "size":
            result.update(run_size(a))
        elif a.system == "convergence":
            result.update(run_convergence(a))
        else:
            build = so8t_trainer if a.system == "so8t_hf" else hf_trainer
            trainer, block = build(a, ["--max_steps", str(a.warmup + a.steps + a.profile_steps), *a.flags])
            if a.nan_probe:
                result["nan_probe"] = nan_probe(trainer)
                partial(a, result)
                torch.cuda.empty_cache() if torch.cuda.is_available() else None  # the probe's blocks: not this run's
            result.update(timed_train(trainer, block, a.warmup, a.steps, a.profile_steps), ok=True)
    except Exception as err:  # noqa: BLE001 - an OOM under the cap is a result
        if not is_oom(err):
            logger.exception("run failed")
        result.update({k: v for k, v in SETTINGS.items() if a.system in ("so8t_hf", "hf_trainer")})
        result.update(ok=False, oom=is_oom(err), error=f"{type(err).__name__}: {str(err)[:400]}",
                      peak_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    logger.info("%s -> %s", {k: v for k, v in result.items() if k not in ("step_times", "losses", "trials", "variants",
                                                                         "profile", "grad_norms")}, a.out)
    if isinstance(result.get("profile"), dict) and "table" in result["profile"]:
        logger.info("profile: %s\n%s", result["profile"]["line"], result["profile"]["table"])


if __name__ == "__main__":
    main()
