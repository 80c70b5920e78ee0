"""`SO8TConfig`: TRL's `SFTConfig` plus the SO8T settings (SO(8) learning rate, PET, loss fallback) and
both names of activation checkpointing on every supported transformers."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from trl import SFTConfig

from so8t_hf._compat import HF_HAS_ACTIVATION_CHECKPOINTING_NAMES


class LossHasNoGraphError(RuntimeError):
    """The training loss cannot reach any trainable parameter."""


def _auto_on_off(name: str, value) -> str:
    """An 'auto' / 'on' / 'off' switch (booleans and their strings as 'on' / 'off'), or a ValueError naming it."""
    value = {"true": "on", "false": "off"}.get(str(value).lower(), str(value).lower())
    if value not in ("auto", "on", "off"):
        raise ValueError(f"SO8TConfig.{name}={value!r}: use 'auto', 'on' or 'off'.")
    return value


@dataclass
class SO8TConfig(SFTConfig):
    r"""`trl.SFTConfig` plus the SO8T settings. Every `SFTConfig` / `TrainingArguments` field works as there.

    Args:
        so8t_learning_rate (`float`, *optional*): learning rate of the SO(8) generators, in their own param group
            without weight decay; defaults to `learning_rate`.
        so8t_trainable (`bool`, defaults to `True`): train the SO(8) rotations (saved with the adapter).
        pet_lambda (`float`, defaults to `0.0`): weight of the PET smoothness penalty on the last hidden states;
            `pet_phase_boundaries` / `pet_phase_scales` give its 3-phase schedule over training progress.
        loss_fallback (`str`, defaults to `"recover"`): a loss without a graph is recomputed from the last hidden
            state through `lm_head` (`recover`, warned and counted) or raises at once (`error`).
        activation_checkpointing (`bool`, defaults to `True`): non-reentrant unless
            `activation_checkpointing_kwargs` says otherwise; `gradient_checkpointing` is its alias on every
            supported transformers.

    Example:
        ```python
        from so8t_hf import SO8TConfig

        args = SO8TConfig(output_dir="run", learning_rate=2e-4, so8t_learning_rate=1e-3, packing=True, bf16=True)
        ```
    """

    # None = unset: the alias decides, else True (resolved in __post_init__, so an explicit alias is not overridden)
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Gradient (activation) checkpointing; non-reentrant by default. Defaults to True.",
            "nargs": "?",
            "const": True,
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing.", "nargs": "?", "const": True}
    )
    if not HF_HAS_ACTIVATION_CHECKPOINTING_NAMES:  # transformers knows only gradient_checkpointing_kwargs: add the new name
        activation_checkpointing_kwargs: dict[str, Any] | str | None = field(
            default=None, metadata={"help": "Keyword arguments of activation checkpointing (e.g. use_reentrant)."}
        )
    so8t_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the SO(8) generators (own param group, no weight decay); None = learning_rate."},
    )
    so8t_trainable: bool = field(default=True, metadata={"help": "Train the SO(8) rotations (saved with the adapter)."})
    pet_lambda: float = field(default=0.0, metadata={"help": "Weight of the PET smoothness penalty; 0 turns it off."})
    pet_phase_boundaries: list[float] = field(
        default_factory=lambda: [0.3, 0.7], metadata={"help": "Training-progress boundaries of the 3 PET phases."}
    )
    pet_phase_scales: list[float] = field(
        default_factory=lambda: [0.1, 0.5, 1.0], metadata={"help": "pet_lambda multipliers of the 3 PET phases."}
    )
    activation_checkpointing_layers: str = field(
        default="auto",
        metadata={"help": "Memory policy of activation checkpointing: 'auto' (spend spare GPU memory: checkpoint as few "
                          "layers as fit under activation_memory_budget_gib; every layer on a CPU run or a 4-bit "
                          "base), 'all' layers, or a number N (the first N are checkpointed)."},
    )
    activation_memory_budget_gib: float | None = field(
        default=None,
        metadata={"help": "The cap, in GiB, on the peak GPU memory that activation_checkpointing_layers=auto plans "
                          "for; None = what the run holds plus 90%% of the free GPU memory it measures."},
    )
    lora_cast_inputs: bool = field(
        default=False,
        metadata={"help": "Cast LoRA inputs to the fp32 adapters (PEFT's default). Off under bf16/fp16: autocast "
                          "casts the small adapter weights instead of every activation (the adapters stay fp32)."},
    )
    fused_lora: str = field(
        default="auto",
        metadata={"help": "Each LoRA layer (NF4 dequantise or bf16 base matmul + adapter) as one autograd Function "
                          "(training/fused_lora.py): 'auto' (every supported layer, 4-bit or bf16/fp32 base, of a CUDA run), "
                          "'on' (the same, CPU too) or 'off' (PEFT's forward)."},
    )
    lean_recompute: str = field(
        default="auto",
        metadata={"help": "When activation checkpointing recomputes a Phi-3 decoder layer for its backward, skip the "
                          "matmul of its fused mlp.down_proj, whose output that backward never reads (about a fifth "
                          "of the layer's recompute FLOPs; gradients unchanged): 'auto' / 'on' (wherever fused_lora "
                          "runs) or 'off'."},
    )
    fused_qkv_rope: str = field(
        default="auto",
        metadata={"help": "Split each attention layer's qkv_proj output into q, k, v with RoPE in one pass, and its "
                          "gradient in one (the op so8t::qkv_rope: Triton on CUDA, transformers' arithmetic elsewhere): "
                          "'auto' (every SO8T-Phi3 attention layer of a CUDA run; H100, LoRA 1 x 8192: 7%% less device "
                          "time per step than Liger's RoPE, benchmarks/results/train_h100.md), 'on' (CPU runs too) or "
                          "'off' (transformers' slicing and RoPE, Liger's when use_liger_kernel)."},
    )
    cuda_graphs: str = field(
        default="auto",
        metadata={"help": "Replay each checkpointed decoder layer as two CUDA graphs (forward; recompute + backward) "
                          "instead of launching its kernels from Python (training/cuda_graphs.py): 'auto' (a CUDA run "
                          "of one process with padding-free packing whose layers have 4-bit bases: QLoRA is "
                          "host-bound, float bases are not), 'on' (any base; an error where the settings forbid it) "
                          "or 'off'."},
    )
    gc_every_steps: int = field(
        default=50,
        metadata={"help": "Python garbage collection during training: automatic collection off and a young-generation "
                          "collection every N optimizer steps (training/gc_control.py); 0 keeps the automatic one."},
    )
    sync_free_metrics: bool = field(
        default=True,
        metadata={"help": "Keep the per-step metrics (nll, entropy, accuracy, tokens) on the GPU until logging "
                          "instead of a host sync per micro-step."},
    )
    loss_fallback: str = field(
        default="recover",
        metadata={"help": "Graph-less loss: 'recover' from the last hidden state (warn, count) or 'error' at once."},
    )

    def __post_init__(self):
        # activation_checkpointing(_kwargs) win; the gradient_checkpointing(_kwargs) aliases fill them when unset. Both
        # names then hold the same values: whichever names the installed transformers / TRL read, they see ours.
        if self.activation_checkpointing is None:
            self.activation_checkpointing = True if self.gradient_checkpointing is None else self.gradient_checkpointing
        if self.activation_checkpointing_kwargs is None:
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs
        self.gradient_checkpointing = self.activation_checkpointing
        self.gradient_checkpointing_kwargs = self.activation_checkpointing_kwargs
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            # several processes on a machine without GPUs: without use_cpu accelerate sets up no process group, and
            # each process would train alone on the whole data
            logging.getLogger(__name__).warning("%s processes and no GPU: use_cpu=True (gloo)", os.environ["WORLD_SIZE"])
            self.use_cpu = True
        super().__post_init__()  # parses a JSON-string gradient_checkpointing_kwargs (and the new name, if it knows it)
        from so8t_hf.training.memory import parse_layers_setting

        self.activation_checkpointing_layers = parse_layers_setting(self.activation_checkpointing_layers)
        self.fused_lora = _auto_on_off("fused_lora", self.fused_lora)
        self.cuda_graphs = _auto_on_off("cuda_graphs", self.cuda_graphs)
        self.fused_qkv_rope = _auto_on_off("fused_qkv_rope", self.fused_qkv_rope)
        self.lean_recompute = _auto_on_off("lean_recompute", self.lean_recompute)
        if self.loss_fallback not in ("recover", "error"):
            raise ValueError(f"SO8TConfig.loss_fallback={self.loss_fallback!r}: use 'recover' or 'error'.")
        kwargs = dict(self.gradient_checkpointing_kwargs or {})
        kwargs.setdefault("use_reentrant", False)  # reentrant + frozen inputs gives a loss without a graph
        self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs = kwargs
