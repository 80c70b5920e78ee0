"""One run of the end-to-end training benchmark (`bench_train.py` starts one process per run).

Builds what runs on the CPU first (imports, data, a LoRA model loaded on the CPU), then waits for the GPU lock, so the
next run's preparation overlaps this one's loading without sharing the GPU. The timed steps run on a quiet host: a
run prepares under a shared hold of `--quiet_lock`, and the GPU holder takes it exclusively before its first step, so
it waits for the preparations under way and none starts until its steps are done (host-bound runs, QLoRA above all,
were slowed and made uneven by other runs loading 3.8B models beside them). On the GPU: the trainer, `warmup` steps,
`steps` timed steps (timed by CUDA events on the GPU's timeline, no sync per step: `StepTimer`; tokens counted by the
collator, on the host), then optional profiled steps. Writes one JSON result: tokens/s over the timed steps, peak GiB (max allocated after the model is on
the GPU), every step's time and loss, the attention backends used.

Systems: `trl_stock` (TRL SFTTrainer + PEFT, stock Phi-3, sdpa), `trl_liger` (same + use_liger_kernel),
`trl_liger_fa4` (TRL + PEFT + Liger + padding-free packing on the best attention transformers can load here:
flash_attention_4 > _3 > _2 > sdpa, the choice and why the others could not load recorded in the result), `so8t_hf`
(the recipe yaml through so8t_hf's pipeline builders and SO8TTrainer), `unsloth` (Unsloth's FastLanguageModel +
get_peft_model and TRL's SFTTrainer as its notebooks run them: dropout 0, its own offloaded checkpointing, padding-free
packing; its pins need their own site, `bench_train.py --unsloth_site`). Workload: batch x max_length, LoRA or QLoRA.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import statistics
import time
from pathlib import Path

from package_versions import package_versions  # benchmarks/, the worker's own folder

logger = logging.getLogger("train_worker")
LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _common_args(a, out_dir):
    import torch

    return dict(use_cpu=not torch.cuda.is_available(), output_dir=str(out_dir), max_steps=a.warmup + a.steps + a.profile_steps, per_device_train_batch_size=a.batch,
                gradient_accumulation_steps=1, max_length=a.max_length, learning_rate=2e-4, lr_scheduler_type="constant",
                bf16=True, optim="adamw_torch_fused", logging_steps=100000, save_strategy="no", report_to="none",
                disable_tqdm=True, seed=0, dataloader_num_workers=0, packing=a.packing)


def best_stock_attention() -> tuple[str, dict]:
    """The fastest attention transformers can load here for padding-free rows, and why each better one cannot."""
    import transformers.utils as tu

    why = {}
    for impl, check, package in (("flash_attention_4", "is_flash_attn_4_available", "flash-attn-4"),
                                 ("flash_attention_3", "is_flash_attn_3_available", "flash-attn 3 (hopper build)"),
                                 ("flash_attention_2", "is_flash_attn_2_available", "flash-attn")):
        available = getattr(tu, check, None)
        if available is None:
            why[impl] = f"this transformers has no {check}"
        elif available():
            return impl, why
        else:
            why[impl] = f"{package} is not installed (transformers.utils.{check}() is False)"
    return "sdpa", why


def build_trl(a, rows, out_dir):
    """(model on the CPU or None for QLoRA, a builder(model) -> trainer) for the stock TRL + PEFT runs."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(a.checkpoint)
    dataset = Dataset.from_list(rows)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    args = SFTConfig(**_common_args(a, out_dir), gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False},
                     use_liger_kernel=a.system in ("trl_liger", "trl_liger_fa4"))
    attn, a.attn_unavailable = best_stock_attention() if a.system == "trl_liger_fa4" else ("sdpa", {})
    a.attn_implementation = attn
    if a.system == "trl_liger_fa4":
        args.padding_free = True  # packing="bfd" implies it in TRL; explicit here
        logger.info("trl_liger_fa4: attn_implementation=%s (%s)", attn, a.attn_unavailable)

    def load():
        kwargs = dict(dtype=torch.bfloat16, attn_implementation=attn)
        if a.qlora:
            from transformers import BitsAndBytesConfig

            kwargs.update(device_map={"": 0}, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16))
        model = AutoModelForCausalLM.from_pretrained(a.checkpoint, **kwargs)
        if a.qlora:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def trainer(model):
        return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)

    return (None if a.qlora else load()), load, trainer


def build_unsloth(a, rows, out_dir):
    """(None, loader, builder(model) -> trainer) for Unsloth: it loads straight onto the GPU (device_map), so the
    model is built under the GPU lock, as QLoRA's is."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no download at import (the device is offline)
    import unsloth  # noqa: F401  (first: it patches transformers, peft and trl as it imports)
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    a.versions = package_versions("unsloth", "unsloth_zoo", "transformers", "trl", "peft", "datasets", "bitsandbytes")
    dataset = Dataset.from_list(rows)
    args = SFTConfig(**_common_args(a, out_dir))  # packing="bfd" (TRL's default) is padding-free where Unsloth keeps it
    loaded = {}

    def load():
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=a.checkpoint, max_seq_length=a.max_length, dtype=torch.bfloat16, load_in_4bit=a.qlora,
            local_files_only=True)
        loaded["tokenizer"] = tokenizer
        a.attn_implementation = getattr(model.config, "_attn_implementation", "?")
        return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                                target_modules=LORA_TARGETS, use_gradient_checkpointing="unsloth",
                                                random_state=0)

    def trainer(model):
        return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=loaded["tokenizer"])

    return None, load, trainer


def build_so8t(a, data_dir, out_dir):
    """Our recipe: the yaml + overrides through so8t_hf's builders (as `run_thinking_sft` does, without saving)."""
    from so8t_hf.sft import make_parser
    from so8t_hf.sft.pipeline import build_datasets, build_model, build_tokenizer, lora_config
    from so8t_hf.thinking.format import get_tag_preset
    from so8t_hf.training.trainer import SO8TTrainer

    recipe = "phi35_mini_qlora_12gb" if a.qlora else "phi35_mini_lora"
    c = _common_args(a, out_dir)
    argv = ["--config", f"recipes/configs/{recipe}.yaml", "--model_name_or_path", a.checkpoint,
            "--dataset_path", str(data_dir), "--eval_fraction", "0", "--eval_strategy", "no", "--num_train_epochs", "1"]
    argv += [x for k in ("output_dir", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                         "max_length", "logging_steps", "save_strategy", "report_to", "seed", "lr_scheduler_type",
                         "disable_tqdm", "packing", "use_cpu") for x in (f"--{k}", str(c[k]))]
    argv += a.override
    model_args, data_args, training_args = make_parser().parse_args_and_config(argv)
    if not training_args.packing:
        training_args.padding_free = False
    tags = get_tag_preset(data_args.tag_preset)
    tokenizer, summary = build_tokenizer(model_args, tags)
    train, _, _ = build_datasets(data_args, tokenizer, training_args.max_length, Path(out_dir), tags, training_args.seed)

    def load():
        model = build_model(model_args, tokenizer, summary)
        if a.legacy_rotation:
            model.model.so8t_step_rotations = False
        return model

    def trainer(model):
        peft = lora_config(model_args, summary["new_ids"]) if model_args.use_peft else None
        return SO8TTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                           peft_config=peft)

    return (None if a.qlora else load()), load, trainer


class StepTimer:
    """Callback: the duration of every optimizer step, tokens from the collator, profiling.

    On CUDA a step is timed on the GPU's own timeline: an event is recorded on the stream at each step's end, and
    the events are read once, after training (`times()`), so the host is never made to wait mid-run: as in real
    training, where nothing synchronises each step, the host may prepare the next step while the GPU finishes this
    one, and a step whose host work the GPU has to wait for shows that wait. On the CPU (smoke tests): wall time."""

    def __init__(self, counter, profile_from: int, profile_dir: str | None):
        import torch

        self.torch, self.counter, self.tokens = torch, counter, []
        self.cuda = torch.cuda.is_available()
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.profile_from, self.profile_dir, self.prof = profile_from, profile_dir, None
        self.marks = []  # one per step end: a CUDA event, or perf_counter() on the CPU
        self.start = None
        self.peak_before_steps, self.step_peaks, self.step_ends = 0.0, [], []  # GiB: max allocated in each step, allocated after it

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def times(self) -> list[float]:
        """Seconds of each step (syncs once)."""
        self.sync()
        marks = [self.start, *self.marks]
        if not self.cuda:
            return [b - a for a, b in zip(marks, marks[1:])]
        return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if timer.profile_dir and state.global_step == timer.profile_from and timer.prof is None:
                    timer.sync()
                    activities = [timer.torch.profiler.ProfilerActivity.CPU]
                    if timer.torch.cuda.is_available():
                        activities.append(timer.torch.profiler.ProfilerActivity.CUDA)
                    timer.prof = timer.torch.profiler.profile(activities=activities)
                    timer.prof.__enter__()
                    timer.prof_start = time.perf_counter()
                if timer.start is None:
                    timer.sync()
                    timer.start, timer.n0 = timer._mark(), timer.counter[0]
                if timer.cuda:
                    if not timer.step_peaks:
                        timer.peak_before_steps = timer.torch.cuda.max_memory_allocated() / 2**30
                    timer.torch.cuda.reset_peak_memory_stats()

            def on_step_end(self, args, state, control, **kw):
                timer.marks.append(timer._mark())
                timer.tokens.append(timer.counter[0] - timer.n0)
                timer.n0 = timer.counter[0]
                if timer.cuda:  # the caching allocator's counters are host-side: no sync
                    timer.step_peaks.append(timer.torch.cuda.max_memory_allocated() / 2**30)
                    timer.step_ends.append(timer.torch.cuda.memory_allocated() / 2**30)

            def on_train_end(self, args, state, control, **kw):
                if timer.prof is not None:
                    timer.sync()
                    timer.prof_wall = time.perf_counter() - timer.prof_start
                    timer.prof.__exit__(None, None, None)

        return _CB()


def _count_tokens(trainer, counter):
    collator = trainer.data_collator

    def counting(features):
        batch = collator(features)
        if "attention_mask" in batch:
            counter[0] += int(batch["attention_mask"].sum())
        else:
            counter[0] += int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting


def gpu_idle(kernels, cpu_ops, steps: int, min_gap_us: float = 20.0, top: int = 12) -> dict:
    """Where the GPU waits on the host. `kernels`: (start, end) us of every device kernel; `cpu_ops`: (start, end,
    name, outermost name) of the host ops. Each gap of at least `min_gap_us` between busy intervals is charged to the
    innermost host op that spans it (and that op's outermost ancestor), else to "(no single host op)". Returns the idle
    ms per step, the gap count per step and the `top` (outermost, innermost) pairs by idle ms per step."""
    busy = []
    for start, end in sorted(kernels):
        if busy and start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], end)
        else:
            busy.append([start, end])
    gaps = [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] - a[1] >= min_gap_us]
    ops = sorted(cpu_ops)
    charged: dict = {}
    active, i = [], 0
    for start, end in gaps:  # sweep: `active` holds the host ops begun before this gap and not over by its start
        while i < len(ops) and ops[i][0] <= start:
            active.append(ops[i])
            i += 1
        active = [op for op in active if op[1] >= start]
        spanning = [op for op in active if op[1] >= end]
        key = ("(no single host op)", "")
        if spanning:
            innermost = min(spanning, key=lambda op: op[1] - op[0])
            key = (innermost[3], innermost[2])
        charged[key] = charged.get(key, 0.0) + (end - start)
    ranked = sorted(charged.items(), key=lambda kv: -kv[1])[:top]
    return {"idle_ms_per_step": round(sum(e - s for s, e in gaps) / 1e3 / steps, 2),
            "gaps_per_step": round(len(gaps) / steps, 1),
            "by_host_op": [{"outermost": k[0], "innermost": k[1], "ms_per_step": round(v / 1e3 / steps, 2)}
                           for k, v in ranked]}


def kernel_sites(launches, steps: int, top: int = 15) -> list[dict]:
    """Which host code launched the device time. `launches`: (kernel name, device us, host op names from the innermost
    outwards) per launched kernel. Each kernel is keyed by its name, its innermost host op and the nearest enclosing
    autograd Function or backward node (the layer code that asked for it); returns the `top` keys by device ms per
    step."""
    sites: dict = {}
    for kernel, us, names in launches:
        owner = next((n for n in names[1:] if n.startswith("autograd::engine::evaluate_function") or
                      (n[:1].isupper() and "::" not in n)), names[-1] if names else "")
        key = (kernel[:60], names[0] if names else "", owner)
        sites[key] = sites.get(key, 0.0) + us
    ranked = sorted(sites.items(), key=lambda kv: -kv[1])[:top]
    return [{"kernel": k[0], "host_op": k[1], "within": k[2], "ms_per_step": round(v / 1e3 / steps, 2)}
            for k, v in ranked]


def _launches(prof) -> list[tuple]:
    """(kernel name, device us, host op names innermost first) of every kernel the profile tied to a host op."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.events():
        if e.device_type != DeviceType.CPU or not getattr(e, "kernels", None):
            continue
        names, node = [], e
        while node is not None:
            names.append(node.name[:80])
            node = getattr(node, "cpu_parent", None)
        out.extend((k.name, k.duration, names) for k in e.kernels)
    return out


def _host_ops(prof) -> list[tuple]:
    """(start, end, name, outermost ancestor's name) of every host event of a profile."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.events():
        if e.device_type != DeviceType.CPU:
            continue
        root = e
        while getattr(root, "cpu_parent", None) is not None:
            root = root.cpu_parent
        out.append((e.time_range.start, e.time_range.end, e.name[:80], root.name[:80]))
    return out


def _profile_summary(prof, steps: int, wall: float) -> dict:
    """Device time per step (sum of CUDA kernel durations), wall time per step, and the share of the device time
    spent in the aten ops the issue named (self device time: no double counting), plus the top-30 table."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    total = sum(e.time_range.elapsed_us() for e in kernels)
    events = prof.key_averages()
    groups = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm"),
              "copy/cast": ("aten::copy_", "aten::_to_copy"), "mul": ("aten::mul",), "add": ("aten::add",),
              "cat": ("aten::cat",), "dropout": ("aten::native_dropout", "aten::bernoulli", "aten::dropout"),
              "attention": ("aten::_flash_attention", "aten::_efficient_attention", "flash_attn", "varlen"),
              "matrix_exp": ("aten::linalg_matrix_exp",)}
    shares = {k: 0.0 for k in groups}
    for e in events:
        for k, keys in groups.items():
            if any(e.key.startswith(x) for x in keys):
                shares[k] += getattr(e, "self_device_time_total", 0)
                break
    by_kernel = {}
    for e in kernels:
        by_kernel[e.name[:90]] = by_kernel.get(e.name[:90], 0) + e.time_range.elapsed_us()
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:25]
    table = events.table(sort_by="self_device_time_total", row_limit=30)
    table += "\n\nTop kernels (us over the profiled steps):\n" + "\n".join(f"{v:12.0f}  {k}" for k, v in top)
    runtime = {"launches": 0, "syncs": 0, "sync_ms": 0.0, "graph_replays": 0}
    for e in prof.events():  # the CUDA runtime calls the host made: how many launches, and how long it waited
        name = e.name
        if "LaunchKernel" in name or "cudaLaunchCooperativeKernel" in name:
            runtime["launches"] += 1
        elif "Synchronize" in name or name == "cudaMemcpy" or ("cudaMemcpyAsync" in name and e.cpu_time_total > 50):
            runtime["syncs"] += 1
            runtime["sync_ms"] += e.cpu_time_total / 1e3
        elif "GraphLaunch" in name:
            runtime["graph_replays"] += 1
    runtime = {k: round(v / steps, 2) for k, v in runtime.items()}
    table += "\n\nCUDA runtime calls per step: " + json.dumps(runtime)
    idle = gpu_idle([(e.time_range.start, e.time_range.end) for e in kernels], _host_ops(prof), steps)
    table += "\n\nGPU idle between kernels (gaps >= 20 us), per step: " + json.dumps(idle, indent=1)
    sites = kernel_sites(_launches(prof), steps)
    table += "\n\nDevice time by kernel and the host code that launched it, per step: " + json.dumps(sites, indent=1)
    return {"device_ms_per_step": total / 1e3 / steps, "wall_ms_per_step": wall * 1e3 / steps,
            "shares": {k: v / max(total, 1) for k, v in shares.items()}, "runtime_per_step": runtime,
            "gpu_idle": idle, "kernel_sites": sites[:8], "table": table}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", required=True)
    p.add_argument("--system", choices=["trl_stock", "trl_liger", "trl_liger_fa4", "so8t_hf", "unsloth"], required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="folder with rows.jsonl")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--packing", default="true")
    p.add_argument("--legacy_rotation", action="store_true", help="per-layer float64 rotations (ladder baseline)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile_steps", type=int, default=0)
    p.add_argument("--lock", required=True)
    p.add_argument("--quiet_lock", default=None, help="file lock: held shared while preparing, exclusive while training")
    p.add_argument("--out", required=True)
    p.add_argument("--override", default="", help="extra recipe flags (so8t_hf): 'key=value,key=value'")
    p.add_argument("--memory_trace", action="store_true",
                   help="record CUDA allocations and write what is live at the peak (<out>.memory.txt; slows the run)")
    a = p.parse_args(argv)
    a.override = [x for kv in a.override.split(",") if kv for x in (f"--{kv.split('=', 1)[0]}", kv.split("=", 1)[1])]
    a.packing = a.packing.lower() == "true"
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{a.name}] %(levelname)s %(name)s: %(message)s")
    import torch

    out_dir = Path(f"/tmp/bench_{a.name}")
    quiet = open(a.quiet_lock, "w") if a.quiet_lock else None
    if quiet:
        fcntl.flock(quiet, fcntl.LOCK_SH)  # preparing: no timed steps of another run meanwhile
    rows = [json.loads(line) for line in open(Path(a.data) / "rows.jsonl")]
    t_prep = time.perf_counter()
    if a.system == "unsloth":
        model, load, make_trainer = build_unsloth(a, rows, out_dir)
    elif a.system.startswith("trl"):
        model, load, make_trainer = build_trl(a, rows, out_dir)
    else:
        model, load, make_trainer = build_so8t(a, Path(a.data), out_dir)
    trainer = None
    if model is not None:  # LoRA: the trainer (PEFT wrapping, data packing) is built on the CPU too
        from unittest import mock

        from transformers import Trainer

        with mock.patch.object(Trainer, "_move_model_to_device", lambda self, model, device: None):
            trainer = make_trainer(model)
    prep_s = time.perf_counter() - t_prep
    if quiet:
        fcntl.flock(quiet, fcntl.LOCK_UN)
    with open(a.lock, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the GPU is ours from here
        t_gpu = time.perf_counter()
        if trainer is None:  # QLoRA (bitsandbytes quantises while loading onto the GPU) and Unsloth
            trainer = make_trainer(load())
        else:
            trainer._move_model_to_device(trainer.model, trainer.args.device)
        counter = [0]
        _count_tokens(trainer, counter)
        timer = StepTimer(counter, a.warmup + a.steps, str(out_dir) if a.profile_steps else None)
        trainer.add_callback(timer.callback())
        losses = []
        step = trainer.training_step
        trainer.training_step = lambda *x, **k: losses.append(step(*x, **k)) or losses[-1]
        timer.sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            if a.memory_trace:
                torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        t_wait = time.perf_counter()
        if quiet:
            fcntl.flock(quiet, fcntl.LOCK_EX)  # waits for the preparations under way; blocks new ones until done
        quiet_wait_s = time.perf_counter() - t_wait
        trainer.train()
        if quiet:
            fcntl.flock(quiet, fcntl.LOCK_UN)
        peak = max([timer.peak_before_steps, *timer.step_peaks]) if timer.step_peaks else 0.0
        if a.memory_trace and torch.cuda.is_available():
            from memory_trace import live_at_peak

            Path(a.out).with_suffix(".memory.txt").write_text(live_at_peak(torch.cuda.memory._snapshot()))
            torch.cuda.memory._record_memory_history(enabled=None)
        backends = {}
        if a.system == "so8t_hf":
            from so8t_hf.integrations.attention import BACKEND_COUNTS

            backends = dict(BACKEND_COUNTS)
        n = a.warmup + a.steps
        step_times = timer.times()
        timed_t, timed_n = step_times[a.warmup:n], timer.tokens[a.warmup:n]
        result = dict(
            name=a.name, system=a.system, batch=a.batch, max_length=a.max_length, qlora=a.qlora,
            tokens_per_s=sum(timed_n) / sum(timed_t), peak_gib=peak,
            tokens_per_s_median_step=statistics.median(n / t for n, t in zip(timed_n, timed_t)), step_times=step_times, step_tokens=timer.tokens,
            step_timing="cuda events at each step end, read after training (no sync per step)" if timer.cuda else "wall",
            step_peak_gib=timer.step_peaks, step_end_gib=timer.step_ends, peak_before_steps_gib=timer.peak_before_steps,
            reserved_end_gib=torch.cuda.memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0,
            losses=[float(x) for x in losses], backends=backends, prep_s=prep_s,
            gpu_s=time.perf_counter() - t_gpu, quiet_wait_s=quiet_wait_s, override=a.override, legacy_rotation=a.legacy_rotation,
            checkpointed_layers=getattr(getattr(trainer, "checkpoint_policy", None), "checkpointed", None),
            fused_lora=getattr(trainer, "fused_lora_counts", None),
            cuda_graphs=getattr(getattr(trainer, "cuda_graphs", None), "summary", None), warmup=a.warmup, timed_steps=len(timed_t),
            attn_implementation=getattr(a, "attn_implementation", "so8t"),
            attn_unavailable=getattr(a, "attn_unavailable", {}), versions=getattr(a, "versions", None),
            packing_used=bool(getattr(trainer.args, "packing", False)),  # Unsloth may turn it off (and says why)
        )
        if timer.prof is not None:
            summary = _profile_summary(timer.prof, a.profile_steps, timer.prof_wall)
            Path(a.out).with_suffix(".profile.txt").write_text(summary.pop("table"))
            result["profile"] = summary
        Path(a.out).write_text(json.dumps(result))
        logger.info("%s: %.0f tokens/s, peak %.2f GiB", a.name, result["tokens_per_s"], peak)


if __name__ == "__main__":
    main()
