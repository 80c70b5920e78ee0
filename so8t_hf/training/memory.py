"""Memory policy of activation checkpointing: spend spare GPU memory on speed by checkpointing fewer layers.

`activation_checkpointing_layers` (SO8TConfig): `auto` (the default), `all` (every decoder layer), or an integer N
(the first N layers are checkpointed, the others keep their activations). `auto` checkpoints as few layers as fit
under a budget: the memory the process holds now plus 90% of what the GPU reports free (`torch.cuda.mem_get_info`,
so other processes count), capped by `activation_memory_budget_gib` when set (`memory_budget`). Two cases keep every
layer checkpointed under `auto`: no CUDA GPU, and 4-bit (QLoRA) bases, whose users chose them to save memory and
whose checkpointed layers run as CUDA graphs (`training/cuda_graphs.py`: QLoRA is host-bound without them).

Estimate (bf16 activations, measured on Phi-3.5-mini LoRA at 8,192 tokens: checkpointing off cost 34.2 GiB more,
1.07 GiB per layer): an un-checkpointed layer keeps about `2 * (12 * hidden + 4 * intermediate)` bytes per token;
a checkpointed step also needs the gradients and AdamW states of the trainable parameters, each layer's saved
input, one recomputed layer and 1 GiB of slack. The choice is logged; transformers' `GradientCheckpointingLayer`
checks its own `gradient_checkpointing` flag on each call, which is what this sets.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer

logger = logging.getLogger(__name__)

GIB = 2**30


def checkpoint_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers that transformers can checkpoint, in order."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def has_4bit_base(layers) -> bool:
    """Whether any of `layers` holds a bitsandbytes 4-bit linear (a QLoRA base)."""
    return any(type(m).__name__ == "Linear4bit" for layer in layers for m in layer.modules())


def parse_layers_setting(value) -> str | int:
    """'all', 'auto' or a non-negative int (strings of ints too, as flags and YAML give them)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if value in ("all", "auto"):
        return value
    raise ValueError(
        f"activation_checkpointing_layers={value!r}: use 'all', 'auto' or a number of layers to checkpoint (>= 0)."
    )


def layer_activation_bytes(config, tokens: int) -> int:
    """Bytes one un-checkpointed decoder layer keeps for backward at `tokens` tokens per micro-batch (estimate)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(tokens * 2 * (12 * text.hidden_size + 4 * text.intermediate_size))


def auto_checkpointed_count(config, n_layers: int, tokens: int, trainable_bytes: int, allocated: int, budget: int) -> int:
    """How many of `n_layers` to checkpoint so that the estimated peak stays under `budget` bytes."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    per_layer = layer_activation_bytes(config, tokens)
    reserve = 3 * trainable_bytes + n_layers * tokens * text.hidden_size * 2 + per_layer + GIB
    spare = budget - allocated - reserve
    keep = max(0, min(n_layers, spare // max(per_layer, 1)))
    return n_layers - int(keep)


def memory_budget(allocated: int, free: int, cap_gib: float | None) -> int:
    """Bytes the run may peak at: what it holds plus 90% of the measured free memory, at most `cap_gib`."""
    measured = allocated + int(0.9 * free)
    return measured if cap_gib is None else min(measured, int(cap_gib * GIB))


def apply_checkpoint_policy(model, setting, tokens: int, budget_gib: float | None = None) -> int | None:
    """Turn checkpointing off on the layers the policy keeps; returns how many stay checkpointed (None: no-op)."""
    setting = parse_layers_setting(setting)
    layers = [m for m in checkpoint_layers(model) if m.gradient_checkpointing]
    if setting == "all" or not layers:
        return None
    if setting == "auto":
        if has_4bit_base(layers):
            logger.info("activation_checkpointing_layers=auto: 4-bit bases, every layer stays checkpointed (QLoRA saves "
                        "memory, and its checkpointed layers run as CUDA graphs; a number of layers overrides this).")
            return None
        if not torch.cuda.is_available():
            logger.info("activation_checkpointing_layers=auto: no CUDA GPU, every layer stays checkpointed.")
            return None
        device = next(p.device for p in model.parameters() if p.device.type == "cuda")
        free, _ = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        budget = memory_budget(allocated, free, budget_gib)
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        config = getattr(model, "config", None) or model.get_base_model().config
        count = auto_checkpointed_count(config, len(layers), tokens, trainable, allocated, budget)
    else:
        count = min(setting, len(layers))
    for layer in layers[count:]:
        layer.gradient_checkpointing = False
    logger.info("activation checkpointing: %d of %d decoder layers checkpointed (activation_checkpointing_layers=%s, "
                "%d tokens per micro-batch%s).", count, len(layers), setting, tokens,
                f", budget {budget / GIB:.2f} GiB (cap {budget_gib} GiB)" if setting == "auto" else "")
    return count


class CheckpointPolicyCallback(TrainerCallback):
    """Applies `activation_checkpointing_layers` once checkpointing is on (at train begin)."""

    def __init__(self, setting, budget_gib: float | None, tokens: int):
        self.setting, self.budget_gib, self.tokens = setting, budget_gib, tokens
        self.checkpointed: int | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.checkpointed = apply_checkpoint_policy(model, self.setting, self.tokens, self.budget_gib)
