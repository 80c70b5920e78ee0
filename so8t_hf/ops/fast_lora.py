"""Fused LoRA linear: the frozen base matmul and the adapter in one autograd Function.

    y = x @ W^T + s * (x @ A^T) @ B^T (+ bias)       x (N, in), W (out, in), A (r, in), B (out, r)

Forward: W comes from `weight_fn()` (a frozen bf16 weight, or a 4-bit weight dequantised into a reused buffer),
one cuBLAS matmul gives `x @ W^T`, and the adapter lands on it with an in-place `addmm_` (no separate mul / add
kernels, no second activation-sized tensor). Backward recomputes `W = weight_fn()` (nothing weight-sized is saved)
and gives dx = dy @ W + (s dy @ B) @ A, dA = (s dy @ B)^T @ x, dB = s dy^T @ (x @ A^T), s riding on the matmuls as
cuBLAS's alpha. x, x @ A^T (N x r) and the adapters in the compute dtype (cast once in forward) are saved.
Everything runs in the autocast dtype when autocast is on (else x's dtype); the adapter gradients are returned in the
adapters' dtype (fp32 adapters stay fp32).

Recompute (`output_unused_in_recompute`): while activation checkpointing recomputes a layer for its backward, a
linear whose output that backward never reads (a Phi-3 decoder layer's `mlp.down_proj`: only the residual add, the
layer's output, follows it) skips `x @ W^T` and the adapter product: the saved tensors (x, x @ A^T) are all the
backward needs, and the returned tensor is left unwritten. "Recomputing" is detected as running inside a backward pass
(`torch._C._current_graph_task_id() != -1`), where a forward runs only for checkpointing's recompute.

Limits: one adapter, no dropout, no DoRA, no adapter bias, a frozen base (the integration falls back to PEFT's own
forward otherwise). `DequantBuffer` assumes one CUDA stream (every user of the buffer is ordered on it).
Origin: the pattern of Unsloth's `fast_lora` (`matmul_lora`, LoRA_W), written from the maths above.
"""

from __future__ import annotations

import torch


class DequantBuffer:
    """One flat buffer per (dtype, device), grown to the largest weight asked for; a weight of any shape is a view of
    its first elements. Peak memory is one dequantised weight, as with bitsandbytes' own per-call allocation."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.frozen = False  # set while CUDA graphs hold the buffers' addresses: growing one would be a silent bug

    def get(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= int(d)
        key = (dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            if self.frozen:
                raise RuntimeError(f"the dequantisation buffer must grow to {numel} elements ({dtype}, {device}) "
                                   "while CUDA graphs hold its address; reserve the largest weight first")
            self._buffers[key] = buf = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(*shape)

    def clear(self) -> None:
        self._buffers.clear()
        self.frozen = False


DEQUANT_BUFFER = DequantBuffer()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and x.dtype.is_floating_point:
        return torch.get_autocast_dtype(kind)
    return x.dtype


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_fn, lora_a, lora_b, scale, bias, output_unused_in_recompute=False):
        dtype = _compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)  # (N, in)
        with torch.autocast(x.device.type, enabled=False):
            a, b = lora_a.to(dtype), lora_b.to(dtype)  # cast once: backward reuses them
            xa = x2 @ a.t()  # (N, r)
            if output_unused_in_recompute and recomputing():
                out = x2.new_empty(x2.shape[0], lora_b.shape[0])  # nothing reads it (see the module docstring)
            else:
                out = x2 @ weight_fn().to(dtype).t()  # (N, out)
                out.addmm_(xa, b.t(), alpha=scale)
                if bias is not None:
                    out += bias.to(dtype)
        ctx.save_for_backward(x2, xa, a, b)
        ctx.weight_fn, ctx.scale, ctx.dtype, ctx.in_shape, ctx.x_dtype = weight_fn, scale, dtype, shape, x.dtype
        ctx.adapter_dtypes = lora_a.dtype, lora_b.dtype
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, a, b = ctx.saved_tensors
        dtype, scale = ctx.dtype, ctx.scale
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (N, out)
        with torch.autocast(dy.device.type, enabled=False):
            # the scale rides on the matmul (alpha, beta=0: the 0-d input is never read): no separate mul kernel
            unused = dy.new_empty(())
            d_xa = torch.addmm(unused, dy, b, beta=0, alpha=scale)  # (N, r)
            grad_b = torch.addmm(unused, dy.t(), xa, beta=0, alpha=scale) if ctx.needs_input_grad[3] else None
            grad_a = d_xa.t() @ x2 if ctx.needs_input_grad[2] else None  # (r, in)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = dy @ ctx.weight_fn().to(dtype)  # (N, in)
                grad_x.addmm_(d_xa, a)
                grad_x = grad_x.view(ctx.in_shape).to(ctx.x_dtype)
        a_dtype, b_dtype = ctx.adapter_dtypes
        return (grad_x, None, grad_a.to(a_dtype) if grad_a is not None else None,
                grad_b.to(b_dtype) if grad_b is not None else None, None, None, None)


def recomputing() -> bool:
    """True inside a backward pass: a forward there is activation checkpointing's recompute."""
    return torch._C._current_graph_task_id() != -1


def lora_linear(x: torch.Tensor, weight_fn, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                bias: torch.Tensor | None = None, output_unused_in_recompute: bool = False) -> torch.Tensor:
    """x (..., in) -> (..., out): the fused LoRA linear. `weight_fn()` returns the frozen (out, in) base weight.
    `output_unused_in_recompute`: in checkpointing's recompute, skip the output (see the module docstring)."""
    r, fan_in = lora_a.shape
    assert x.shape[-1] == fan_in, f"x has {x.shape[-1]} features, lora_A expects {fan_in}"
    assert lora_b.shape[1] == r, f"lora_B {tuple(lora_b.shape)} does not match lora_A rank {r}"
    assert bias is None or not bias.requires_grad, "the fused LoRA linear keeps the base bias frozen"
    return LoraLinearFunction.apply(x, weight_fn, lora_a, lora_b, float(scale), bias, bool(output_unused_in_recompute))


def lora_linear_reference(x, weight, lora_a, lora_b, scale, bias=None):
    """The same maths in plain PyTorch ops (autograd through every op)."""
    out = x @ weight.t() + scale * ((x @ lora_a.t()) @ lora_b.t())
    return out if bias is None else out + bias
