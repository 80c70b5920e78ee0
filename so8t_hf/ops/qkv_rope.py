"""Triton kernels that split Phi-3's fused `qkv_proj` output into q, k, v with RoPE applied to q and k (forward),
and assemble the gradient of `qkv` from dq, dk, dv (backward), one memory pass each way.

The unfused path slices `qkv` into strided views, copies q and k for the RoPE kernel and v for attention, and its
backward builds the `qkv` gradient as three zero-filled slice gradients that are then added: on a Phi-3.5 layer of
8,192 tokens that is about 10 memory passes over (tokens x 9,216) per training step, where this needs 2.

RoPE is transformers' `rotate_half` form on the first `rot` columns of each head (the rest pass through):
    x1, x2 = x[:h], x[h:rot]  (h = rot / 2)
    y = (x1 * c1 - x2 * s1, x2 * c2 + x1 * s2, x[rot:])
with (c1, c2) = cos[:h], cos[h:] (likewise sin) of the token's position. Its transpose, for the backward:
    dx = (g1 * c1 + g2 * s2, g2 * c2 - g1 * s1, g[rot:]).
Products and sums are fp32, stored in the output's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_rows"])
def _rope_rows_kernel(
    SRC, DST, COS, SIN, n_rows, n_cols, stride_src, stride_dst, stride_cs,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr, APPLY_ROPE: tl.constexpr,
    BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """A (BLOCK_M rows x BLOCK_N columns) tile of heads laid side by side: column c is column j = c % HEAD_DIM of its
    head, and its RoPE partner is column c + HALF (j < HALF) or c - HALF (HALF <= j < ROT) of the same head."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    src = SRC + rows * stride_src
    x = tl.load(src + cols, mask=mask, other=0.0)
    if APPLY_ROPE:
        j = cols % HEAD_DIM
        first = j < HALF
        rotated = mask & (j < ROT)
        partner = tl.where(first, cols + HALF, cols - HALF)
        xp = tl.load(src + partner, mask=rotated, other=0.0).to(tl.float32)
        c = tl.load(COS + rows * stride_cs + j, mask=rotated, other=1.0).to(tl.float32)  # 1, 0: columns past ROT pass
        if BACKWARD:  # the transpose: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
            s = tl.load(SIN + rows * stride_cs + tl.where(first, j + HALF, j - HALF), mask=rotated, other=0.0)
            y = x.to(tl.float32) * c + tl.where(first, xp, -xp) * s.to(tl.float32)
        else:  # y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
            s = tl.load(SIN + rows * stride_cs + j, mask=rotated, other=0.0)
            y = x.to(tl.float32) * c + tl.where(first, -xp, xp) * s.to(tl.float32)
        tl.store(DST + rows * stride_dst + cols, y.to(DST.dtype.element_ty), mask=mask)
    else:
        tl.store(DST + rows * stride_dst + cols, x, mask=mask)


def _launch(src, dst, cos, sin, n_heads: int, head_dim: int, rot: int, apply_rope: bool, backward: bool) -> None:
    """src / dst: (rows, >= n_heads * head_dim) views with unit column stride; cos / sin: (rows, rot)."""
    rows, n_cols = src.shape[0], n_heads * head_dim
    if rows == 0 or n_cols == 0:
        return
    block_n = min(1024, triton.next_power_of_2(n_cols))
    block_m = max(1, 4096 // block_n)
    _rope_rows_kernel[(triton.cdiv(rows, block_m), triton.cdiv(n_cols, block_n))](
        src, dst, cos, sin, rows, n_cols, src.stride(0), dst.stride(0), cos.stride(0),
        HEAD_DIM=head_dim, HALF=rot // 2, ROT=rot, APPLY_ROPE=apply_rope, BACKWARD=backward,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8,
    )


def _check(rot: int, head_dim: int) -> None:
    if rot % 2 or not 0 < rot <= head_dim:
        raise ValueError(f"RoPE over {rot} of {head_dim} head columns: need an even count between 2 and {head_dim}")


def qkv_rope_forward(qkv, cos, sin, heads: int, kv_heads: int, head_dim: int):
    """qkv (rows, (heads + 2 kv_heads) * head_dim), cos / sin (rows, rot) -> contiguous q (rows, heads, head_dim),
    k and v (rows, kv_heads, head_dim), RoPE on q and k."""
    rot = cos.shape[-1]
    _check(rot, head_dim)
    rows = qkv.shape[0]
    q = qkv.new_empty(rows, heads, head_dim)
    k = qkv.new_empty(rows, kv_heads, head_dim)
    v = qkv.new_empty(rows, kv_heads, head_dim)
    q_cols, kv_cols = heads * head_dim, kv_heads * head_dim
    _launch(qkv, q.view(rows, -1), cos, sin, heads, head_dim, rot, True, False)
    _launch(qkv[:, q_cols:], k.view(rows, -1), cos, sin, kv_heads, head_dim, rot, True, False)
    _launch(qkv[:, q_cols + kv_cols:], v.view(rows, -1), cos, sin, kv_heads, head_dim, rot, False, False)
    return q, k, v


def qkv_rope_backward(dq, dk, dv, cos, sin, head_dim: int) -> torch.Tensor:
    """dq (rows, heads, head_dim), dk / dv (rows, kv_heads, head_dim) -> dqkv (rows, (heads + 2 kv_heads) * head_dim)."""
    rot = cos.shape[-1]
    _check(rot, head_dim)
    rows, heads, kv_heads = dq.shape[0], dq.shape[1], dk.shape[1]
    q_cols, kv_cols = heads * head_dim, kv_heads * head_dim
    dqkv = dq.new_empty(rows, q_cols + 2 * kv_cols)
    _launch(dq.reshape(rows, -1), dqkv, cos, sin, heads, head_dim, rot, True, True)
    _launch(dk.reshape(rows, -1), dqkv[:, q_cols:], cos, sin, kv_heads, head_dim, rot, True, True)
    _launch(dv.reshape(rows, -1), dqkv[:, q_cols + kv_cols:], cos, sin, kv_heads, head_dim, rot, False, True)
    return dqkv
