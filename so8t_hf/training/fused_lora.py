"""PEFT LoRA layers on the fused LoRA linear (`so8t_hf.ops.fast_lora`): QLoRA's NF4 dequantise + base matmul + adapter,
or a bf16 base + adapter, in one autograd Function per layer instead of PEFT's chain of modules and ops.

`enable_fused_lora(model)` gives every PEFT `lora.Linear` / `lora.Linear4bit` a forward that takes the fused path
when the layer is in the simple case (one active adapter, not merged, no dropout in training, no DoRA, no adapter
bias, a frozen base, a plain call) and PEFT's own forward otherwise, so nothing changes semantics. A 4-bit base is
dequantised with bitsandbytes' `dequantize_4bit` into one reused buffer (the largest weight), forward and backward.
`lean_recompute(model)` marks each Phi-3 decoder layer's fused `mlp.down_proj` to skip its matmul in checkpointing's
recompute (`ops/fast_lora.py`: the layer's backward never reads that output; about a fifth of a layer's recompute
FLOPs; `SO8TConfig.lean_recompute`). `disable_fused_lora(model)` restores PEFT's forwards. Switch: `SO8TConfig.fused_lora` ('auto': every supported
layer, 4-bit and float bases, of a CUDA run; 'on': the same on the CPU too; 'off'); `fused_lora_kinds` decides.
"""

from __future__ import annotations

import logging
import types

import torch

from so8t_hf.ops.fast_lora import DEQUANT_BUFFER, lora_linear

logger = logging.getLogger(__name__)


def fused_lora_kinds(setting: str, on_cuda: bool) -> tuple[str, ...] | None:
    """The base kinds `SO8TConfig.fused_lora` fuses: 'on' both, 'auto' both on a CUDA run (H100, 2026-12-07:
    LoRA 4 x 2048 +12% tokens/s for float bases, QLoRA 1 x 2048 1.17x PEFT's forward; benchmarks/results/train_h100.md),
    'off' or 'auto' off CUDA none (None)."""
    if setting == "on" or (setting == "auto" and on_cuda):
        return ("nf4", "dense")
    return None


def _base_kind(module) -> str | None:
    """'nf4' (bitsandbytes 4-bit), 'dense' (a float nn.Linear) or None (not supported: PEFT's forward)."""
    base = module.get_base_layer()
    weight = getattr(base, "weight", None)
    if weight is None or weight.requires_grad or getattr(module, "fan_in_fan_out", False):
        return None
    if type(base).__name__ == "Linear4bit" and getattr(weight, "quant_state", None) is not None:
        return "nf4"
    if type(base) is torch.nn.Linear and weight.dtype.is_floating_point:
        return "dense"
    return None


def _weight_fn(base, kind: str):
    weight = base.weight
    if kind == "dense":
        return lambda: weight
    import bitsandbytes.functional as bnb_functional

    state = weight.quant_state

    def dequantize():
        if weight.device.type != "cuda":  # bitsandbytes has no out= variant off CUDA
            return bnb_functional.dequantize_4bit(weight.data, state)
        out = DEQUANT_BUFFER.get(state.shape, state.dtype, weight.device)
        return bnb_functional.dequantize_4bit(weight.data, state, out=out)

    return dequantize


def _simple_adapter(module):
    """The active adapter's name if the fused path computes exactly what PEFT would, else None."""
    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if name not in module.lora_A or module.use_dora.get(name, False) or getattr(module, "lora_bias", {}).get(name):
        return None
    dropout = module.lora_dropout[name]
    if module.training and not isinstance(dropout, torch.nn.Identity):
        return None
    if module.lora_A[name].bias is not None or module.lora_B[name].bias is not None:
        return None
    return name


def _fused_forward(self, x, *args, **kwargs):
    name = None if (args or kwargs) else _simple_adapter(self)
    if name is None:
        return self._so8t_peft_forward(x, *args, **kwargs)
    base = self.get_base_layer()
    return lora_linear(x, self._so8t_weight_fn, self.lora_A[name].weight, self.lora_B[name].weight,
                       self.scaling[name], base.bias, getattr(self, "_so8t_unused_in_recompute", False))


def enable_fused_lora(model: torch.nn.Module, kinds=("nf4", "dense")) -> dict[str, int]:
    """Put the fused forward on every supported PEFT LoRA layer whose base is one of `kinds` ('nf4', 'dense');
    returns the count per base kind, plus layers left on PEFT's forward ('unsupported', 'off': not in `kinds`)."""
    from peft.tuners.lora import LoraLayer

    counts = {"nf4": 0, "dense": 0, "unsupported": 0, "off": 0}
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "get_base_layer"):
            continue
        if hasattr(module, "_so8t_peft_forward"):
            continue
        kind = _base_kind(module)
        if kind is None:
            counts["unsupported"] += 1
            continue
        if kind not in kinds:
            counts["off"] += 1
            continue
        if kind == "nf4":
            try:
                import bitsandbytes.functional  # noqa: F401
            except ImportError:
                counts["unsupported"] += 1
                continue
        module._so8t_weight_fn = _weight_fn(module.get_base_layer(), kind)
        module._so8t_peft_forward = module.forward
        module._so8t_own_forward = "forward" in module.__dict__  # someone else's patch, to put back as it was
        module.forward = types.MethodType(_fused_forward, module)
        counts[kind] += 1
    if counts["nf4"] or counts["dense"]:
        logger.info("fused LoRA: %d 4-bit (NF4 dequantise + matmul + adapter) and %d float-base LoRA layers on one "
                    "autograd Function each; %d left on PEFT's forward (fused_lora=off turns it off)", counts["nf4"],
                    counts["dense"], counts["unsupported"] + counts["off"])
    return counts


def reserve_dequant_buffer(modules) -> int:
    """Grow the shared dequantisation buffer to the largest 4-bit weight under `modules` now, then freeze it (CUDA
    graphs record its address); returns its size in elements (0: no fused 4-bit layer)."""
    largest = None
    for root in modules:
        for module in root.modules():
            if hasattr(module, "_so8t_weight_fn") and _base_kind(module) == "nf4":
                weight = module.get_base_layer().weight
                state = weight.quant_state
                numel = int(torch.Size(state.shape).numel())
                if weight.device.type == "cuda" and (largest is None or numel > largest[0]):
                    largest = (numel, state.shape, state.dtype, weight.device)
    if largest is None:
        return 0
    DEQUANT_BUFFER.get(largest[1], largest[2], largest[3])
    DEQUANT_BUFFER.frozen = True
    return largest[0]


_MLP_FORWARDS = ("Phi3MLP.forward", "LigerPhi3SwiGLUMLP.forward")  # both return down_proj(...) as the MLP's output


def _output_only_feeds_the_residual(layer) -> bool:
    """A Phi-3 decoder layer as transformers (or Liger's SwiGLU) computes it: `residual + dropout(mlp(x))` with
    `mlp(x) = down_proj(...)`, so nothing in the layer's backward reads `down_proj`'s output."""
    import inspect

    from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

    # transformers re-wraps `forward` in each subclass (output capturing): compare what the wrappers wrap
    if not isinstance(layer, Phi3DecoderLayer) or "forward" in vars(layer) or \
            inspect.unwrap(type(layer).forward) is not inspect.unwrap(Phi3DecoderLayer.forward):
        return False
    mlp = getattr(layer, "mlp", None)
    forward = getattr(getattr(mlp, "forward", None), "__func__", None)
    return forward is not None and getattr(forward, "__qualname__", "") in _MLP_FORWARDS


def lean_recompute(model: torch.nn.Module) -> int:
    """Mark the fused `mlp.down_proj` of every Phi-3 decoder layer to skip its output in checkpointing's recompute;
    returns how many were marked (layers of other shapes, or on PEFT's own forward, are left as they are)."""
    marked = 0
    for layer in model.modules():
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if down is not None and hasattr(down, "_so8t_peft_forward") and _output_only_feeds_the_residual(layer):
            down._so8t_unused_in_recompute = True
            marked += 1
    if marked:
        logger.info("lean recompute: %d decoder layers skip mlp.down_proj's matmul when checkpointing recomputes them "
                    "(its output is never read there; lean_recompute=off turns it off)", marked)
    return marked


def disable_fused_lora(model: torch.nn.Module) -> int:
    """Restore PEFT's own forward on every layer `enable_fused_lora` changed; returns how many."""
    restored = 0
    for module in model.modules():
        if hasattr(module, "_so8t_peft_forward"):
            if module._so8t_own_forward:
                module.forward = module._so8t_peft_forward
            else:
                del module.forward  # the class's forward again
            del module._so8t_peft_forward, module._so8t_weight_fn, module._so8t_own_forward
            module.__dict__.pop("_so8t_unused_in_recompute", None)
            restored += 1
    return restored
