"""Phi-3's q / k / v split with RoPE as the `torch.library` op `so8t::qkv_rope` (forward and backward).

SO8T-Phi3 attention layers with `fused_qkv_rope` set (`SO8TConfig.fused_qkv_rope`: `auto` on CUDA runs; remote-code copies too)
look the op up (`torch.ops.so8t.qkv_rope`) and, when it is registered and the call has no KV cache, take contiguous
q, k, v from it instead of slicing `qkv_proj`'s output into strided views and applying transformers' (or Liger's)
RoPE. Its backward writes the gradient of `qkv` in one pass instead of adding three zero-filled slice gradients
(`so8t_hf.ops.qkv_rope` says what that saves).

Backend per call: the Triton kernels of `so8t_hf.ops.qkv_rope` for CUDA tensors when triton is installed, else
transformers' RoPE arithmetic in torch (the same numbers as the unfused path); `SO8T_QKV_ROPE_BACKEND=auto|triton|
torch` overrides (`triton` also runs under `TRITON_INTERPRET=1` on the CPU, for tests). Each (backend, reason) is
logged once at INFO.
"""

from __future__ import annotations

import torch

from so8t_hf.integrations.rotation_op import _choose

QKV_ROPE_BACKENDS = ("auto", "triton", "torch")


def qkv_rope_backend(x: torch.Tensor) -> str:
    """'triton' or 'torch' for this input (see the module docstring)."""
    return _choose(x, "SO8T_QKV_ROPE_BACKEND", QKV_ROPE_BACKENDS, "torch", "q/k/v split + RoPE")


def _rows(cos: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    """cos or sin (1 or batch, tokens, rot) -> (batch * tokens, rot), unit column stride."""
    return cos.expand(batch, tokens, cos.shape[-1]).reshape(batch * tokens, cos.shape[-1]).contiguous()


def qkv_rope_torch(qkv, cos, sin, heads: int, kv_heads: int, head_dim: int):
    """transformers' Phi-3 arithmetic (`apply_rotary_pos_emb` with `rotate_half`, partial rotary) in qkv's dtype,
    in the (B, T, heads, D) layout: contiguous q, k, v."""
    q_cols, kv_cols = heads * head_dim, kv_heads * head_dim
    shape = (*qkv.shape[:-1], -1, head_dim)
    q, k = qkv[..., :q_cols].view(shape), qkv[..., q_cols:q_cols + kv_cols].view(shape)
    v = qkv[..., q_cols + kv_cols:].view(shape)
    rot = cos.shape[-1]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (B, T, 1, rot)

    def rope(x):
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
        return torch.cat([(x_rot * c) + (torch.cat((-x2, x1), dim=-1) * s), x_pass], dim=-1)

    return rope(q), rope(k), v.clone(memory_format=torch.contiguous_format)


@torch.library.custom_op("so8t::qkv_rope", mutates_args=())
def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, T, (heads + 2 kv_heads) * D), cos / sin (1 or B, T, rot) -> q (B, T, heads, D), k and v
    (B, T, kv_heads, D), contiguous, with RoPE on q and k."""
    if qkv_rope_backend(qkv) == "torch":
        return qkv_rope_torch(qkv, cos, sin, heads, kv_heads, head_dim)
    from so8t_hf.ops.qkv_rope import qkv_rope_forward

    batch, tokens = qkv.shape[:2]
    flat = qkv.reshape(batch * tokens, qkv.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    q, k, v = qkv_rope_forward(flat, _rows(cos, batch, tokens), _rows(sin, batch, tokens), heads, kv_heads, head_dim)
    return q.view(batch, tokens, heads, head_dim), k.view(batch, tokens, kv_heads, head_dim), \
        v.view(batch, tokens, kv_heads, head_dim)


@qkv_rope.register_fake
def _(qkv, cos, sin, heads, kv_heads, head_dim):
    batch, tokens = qkv.shape[:2]
    return (qkv.new_empty(batch, tokens, heads, head_dim), qkv.new_empty(batch, tokens, kv_heads, head_dim),
            qkv.new_empty(batch, tokens, kv_heads, head_dim))


@torch.library.custom_op("so8t::qkv_rope_backward", mutates_args=())
def qkv_rope_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
    """The gradient of `qkv` (B, T, (heads + 2 kv_heads) * D) from those of q, k, v (B, T, heads or kv_heads, D)."""
    batch, tokens, heads, head_dim = dq.shape
    if qkv_rope_backend(dq) == "torch":
        rot = cos.shape[-1]
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)

        def rope_t(g):  # the transpose of y = x * c + rotate_half(x) * s
            g_rot, g_pass = g[..., :rot], g[..., rot:]
            gs = g_rot * s
            return torch.cat([g_rot * c + torch.cat((gs[..., rot // 2:], -gs[..., : rot // 2]), dim=-1), g_pass], -1)

        return torch.cat([rope_t(dq), rope_t(dk), dv], dim=-2).flatten(-2)
    from so8t_hf.ops.qkv_rope import qkv_rope_backward as kernel

    rows = batch * tokens
    dqkv = kernel(dq.reshape(rows, heads, head_dim).contiguous(), dk.reshape(rows, -1, head_dim).contiguous(),
                  dv.reshape(rows, -1, head_dim).contiguous(), _rows(cos, batch, tokens), _rows(sin, batch, tokens),
                  head_dim)
    return dqkv.view(batch, tokens, -1)


@qkv_rope_backward.register_fake
def _(dq, dk, dv, cos, sin):
    batch, tokens = dq.shape[:2]
    return dq.new_empty(batch, tokens, (dq.shape[2] + 2 * dk.shape[2]) * dq.shape[3])


def _setup_context(ctx, inputs, output):
    qkv, cos, sin, *_ = inputs
    ctx.save_for_backward(cos, sin)
    ctx.qkv_dtype = qkv.dtype
    ctx.shapes = [t.shape for t in output]


def _backward(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    like = next(g for g in (dq, dk, dv) if g is not None)
    dq, dk, dv = (like.new_zeros(shape) if g is None else g for g, shape in zip((dq, dk, dv), ctx.shapes))
    return torch.ops.so8t.qkv_rope_backward(dq, dk, dv, cos, sin).to(ctx.qkv_dtype), None, None, None, None, None


qkv_rope.register_autograd(_backward, setup_context=_setup_context)
