"""Several processes, as they really run: the launch check, FSDP2 on CPU processes, and the precision that ran.

- `check_launch`: `accelerate launch --cpu --num_processes N` starts ONE process (accelerate 1.x's CPU launcher
  starts several only through `mpirun`, `--mpirun_hostfile`; it sets `MASTER_ADDR` and nothing else). That
  process reads its launcher's arguments (Linux `/proc`) and starts the same launch again without `--cpu` and
  with `--use_cpu true` for the recipe, so N gloo processes train (logged); where the launch cannot be read, the
  run is refused with the line that works, instead of training silently on one process.
- `fsdp_on_cpu`: accelerate turns an FSDP config (`fsdp2.yaml`) into plain DDP on CPU processes (its FSDP set-up
  belongs to the GPU distributed types only). PyTorch's `fully_shard` runs on gloo CPU process groups, so
  `SO8TTrainer` hands the accelerator the FSDP plugin of the launch there, and the model is sharded as on GPUs.
- `cpu_mixed_precision`: on CPU the accelerate config's `mixed_precision: bf16` (a GPU setting) is not applied:
  fp32 runs unless `--bf16 true` asks for bf16 autocast on the CPU (logged either way).
- `distributed_summary`: what ran (world size, distributed type, backend, mixed precision, FSDP version and
  whether the parameters are sharded DTensors), logged and written to `run_summary.json` and the card.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["check_launch", "cpu_mixed_precision", "distributed_summary", "fsdp_on_cpu", "is_sharded"]

CPU_LAUNCH = ("accelerate launch --num_processes {n} --config_file recipes/accelerate/ddp.yaml "
              "recipes/thinking_sft.py --config recipes/configs/tiny.yaml --use_cpu true")


def _rank_env() -> bool:
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    return any(os.environ.get(name) for name in names)


RELAUNCHED = "SO8T_CPU_RELAUNCH"  # set in the relaunched launch, so it is never relaunched twice


def _launcher_argv(pid: int) -> list[str] | None:
    """The arguments after `launch` of the `accelerate launch` process `pid` (from /proc), or None."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    argv = [a.decode(errors="surrogateescape") for a in raw.split(b"\0") if a]
    for i, tok in enumerate(argv):
        if tok == "accelerate.commands.launch" or (tok == "launch" and i and Path(argv[i - 1]).name == "accelerate"):
            return argv[i + 1:]
    return None


def cpu_relaunch_argv(launch_argv: list[str]) -> tuple[int, list[str]] | None:
    """(N, the `accelerate launch` arguments that start N gloo processes) for a `--cpu` launch of N > 1 processes;
    None if the arguments do not say N > 1. `--cpu` is dropped and `--use_cpu true` is given to the script."""
    from accelerate.commands.launch import launch_command_parser

    try:
        args = launch_command_parser().parse_args(launch_argv)
    except SystemExit:
        return None
    n = args.num_processes
    if n is None and args.config_file:
        import yaml

        n = (yaml.safe_load(Path(args.config_file).read_text()) or {}).get("num_processes")
    if not args.cpu or not isinstance(n, int) or n < 2 or args.training_script not in launch_argv:
        return None
    at = launch_argv.index(args.training_script)
    script_args = launch_argv[at + 1:]
    if "--use_cpu" not in script_args:
        script_args = [*script_args, "--use_cpu", "true"]
    launch = [tok for tok in launch_argv[:at] if tok != "--cpu"]
    if args.num_processes is None:
        launch += ["--num_processes", str(n)]
    return n, [*launch, launch_argv[at], *script_args]


def check_launch() -> None:
    """Make `accelerate launch --cpu --num_processes N` (N > 1) train on N processes, before anything is built.

    That launcher sets `ACCELERATE_USE_CPU=True` and, for N > 1, `MASTER_ADDR` / `MASTER_PORT`, but starts a single
    process with no rank. This process then becomes `accelerate launch` without `--cpu` (its multi-process launcher,
    torchrun) with `--use_cpu true` for the recipe: N gloo processes. Where the launcher's arguments cannot be read,
    the run is refused with the line that works."""
    asked_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1", "yes")
    if not (asked_cpu and os.environ.get("MASTER_ADDR") and not _rank_env()) or os.environ.get(RELAUNCHED):
        return
    launch_argv = _launcher_argv(os.getppid())
    plan = cpu_relaunch_argv(launch_argv) if launch_argv is not None else None
    if plan is None:
        raise RuntimeError(
            "accelerate launch --cpu --num_processes N started ONE process: accelerate's CPU launcher starts several "
            "only through mpirun (--mpirun_hostfile), so this run would train on one process. For N CPU processes "
            "(gloo), leave --cpu out and pass --use_cpu true to the recipe: " + CPU_LAUNCH.format(n=2)
            + " (or recipes/accelerate/fsdp2.yaml for FSDP2). For one process, drop --num_processes.")
    n, argv = plan
    logger.warning("accelerate launch --cpu starts one process; starting %d CPU (gloo) processes instead: "
                   "accelerate launch %s", n, " ".join(argv))
    for handler in logging.getLogger().handlers:
        handler.flush()
    env = {**os.environ, RELAUNCHED: "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    os.execve(sys.executable, [sys.executable, "-m", "accelerate.commands.launch", *argv], env)


def cpu_mixed_precision(args) -> None:
    """On CPU, drop the launcher's `mixed_precision` (ACCELERATE_MIXED_PRECISION from an accelerate config) unless
    the run itself asks for it with `bf16` / `fp16`: GPU configs say bf16, and bf16 autocast on a CPU is slow and
    changes the losses. `args`: a `TrainingArguments` after `__post_init__`."""
    on_cpu = args.use_cpu or not torch.cuda.is_available()
    if not on_cpu or args.mixed_precision in (None, "no") or args.bf16 or args.fp16:
        return
    logger.warning("mixed_precision=%s from the accelerate launch is not applied on CPU: training in fp32 "
                   "(pass --bf16 true for bf16 autocast on the CPU)", args.mixed_precision)
    args.mixed_precision = "no"


def fsdp_on_cpu(trainer) -> bool:
    """Give a Trainer's accelerator the FSDP plugin of the launch (ACCELERATE_USE_FSDP, FSDP_*) on CPU processes,
    where accelerate would otherwise run DDP; returns whether it did. Call right after the accelerator is made."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = trainer.accelerator
    state = accelerator.state
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or trainer.args.fsdp_plugin_args
    if not wants_fsdp or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = (FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args) if trainer.args.fsdp_plugin_args
              else FullyShardedDataParallelPlugin())
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPU processes needs FSDP2 (fsdp_version: 2, PyTorch's fully_shard); FSDP1 has no "
                         "CPU (gloo) support in this recipe. Use recipes/accelerate/fsdp2.yaml.")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP  # AcceleratorState and PartialState share this field
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
    logger.info("FSDP%d on %d CPU processes (%s): the model is sharded with fully_shard", plugin.fsdp_version,
                state.num_processes, state.backend)
    return True


def unshard_head_before_backbone(model):
    """Under FSDP2, unshard the LM head before the backbone runs; returns the hook handle (None if not needed).

    TRL's fused LM head reads `lm_head.weight` without calling `lm_head`, and accelerate makes the head an FSDP2 unit
    of its own, so that read sees the sharded DTensor and TRL gathers it with `full_tensor()`, whose backward keeps
    each rank's local slice of its own gradient: the head's gradients were never averaged across the processes
    (1.33x the grad norm of DDP and of one process on the tiny recipe, and different weights). Unsharded before the
    backbone, the head hands the fused loss its plain parameter, and FSDP2 reduce-scatters its gradient like every
    other unit's (the root's post-backward callback runs it for units whose forward did not run)."""
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = inner.get_output_embeddings()
    if not isinstance(head, FSDPModule):
        return None
    backbone = inner.base_model  # the decoder that TRL's fused forward runs before reading the head

    def unshard(module, args):
        head.unshard()

    logger.info("FSDP2: the LM head (%s) is unsharded before each forward of the backbone, for TRL's fused LM-head "
                "loss", type(head).__name__)
    return backbone.register_forward_pre_hook(unshard)


def is_sharded(model) -> bool:
    """Whether `model` (or a module under it) is an FSDP2 `FSDPModule` whose parameters are DTensors."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    has_fsdp = any(isinstance(m, FSDPModule) for m in model.modules())
    return has_fsdp and all(isinstance(p, DTensor) for p in model.parameters())


def distributed_summary(trainer) -> dict:
    """What ran: world size, distributed type, backend, device, mixed precision, FSDP version, sharded."""
    state = trainer.accelerator.state
    fsdp = getattr(state, "fsdp_plugin", None)
    param = next(iter(trainer.model.parameters()), None)
    return {
        "weights_dtype": str(param.dtype).removeprefix("torch.") if param is not None else None,
        "world_size": state.num_processes,
        "distributed_type": str(state.distributed_type).split(".")[-1],
        "backend": state.backend,
        "device": str(state.device),
        "mixed_precision": str(state.mixed_precision),
        "fsdp_version": fsdp.fsdp_version if fsdp is not None else None,
        "sharded": is_sharded(trainer.model_wrapped) if fsdp is not None else False,
    }
