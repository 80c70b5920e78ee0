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
def _heads_rope_kernel(
    SRC, DST, COS, SIN, n_rows, n_heads, stride_src, stride_dst, stride_cs,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr, APPLY_ROPE: tl.constexpr,
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """One token row x BLOCK_H heads: DST[row, h*D + j] = rope(SRC[row, h*D + j]) (or its transpose, or a copy)."""
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    half = tl.arange(0, BLOCK_HALF)[None, :]
    head_ok = heads < n_heads
    src = SRC + row * stride_src + heads * HEAD_DIM
    dst = DST + row * stride_dst + heads * HEAD_DIM
    if APPLY_ROPE:
        m1 = head_ok & (half < HALF)
        m2 = head_ok & (half < ROT - HALF)
        x1 = tl.load(src + half, mask=m1, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + half, mask=m2, other=0.0).to(tl.float32)
        cs = COS + row * stride_cs
        sn = SIN + row * stride_cs
        c1 = tl.load(cs + half, mask=half < HALF, other=0.0).to(tl.float32)
        c2 = tl.load(cs + HALF + half, mask=half < ROT - HALF, other=0.0).to(tl.float32)
        s1 = tl.load(sn + half, mask=half < HALF, other=0.0).to(tl.float32)
        s2 = tl.load(sn + HALF + half, mask=half < ROT - HALF, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(dst + half, y1.to(DST.dtype.element_ty), mask=m1)
        tl.store(dst + HALF + half, y2.to(DST.dtype.element_ty), mask=m2)
        if BLOCK_PASS > 0:
            rest = ROT + tl.arange(0, BLOCK_PASS)[None, :]
            mp = head_ok & (rest < HEAD_DIM)
            tl.store(dst + rest, tl.load(src + rest, mask=mp, other=0.0), mask=mp)
    else:
        cols = tl.arange(0, BLOCK_PASS)[None, :]
        mp = head_ok & (cols < HEAD_DIM)
        tl.store(dst + cols, tl.load(src + cols, mask=mp, other=0.0), mask=mp)


def _launch(src, dst, cos, sin, n_heads: int, head_dim: int, rot: int, apply_rope: bool, backward: bool) -> None:
    """src / dst: (rows, >= n_heads * head_dim) views with unit column stride; cos / sin: (rows, rot)."""
    rows = src.shape[0]
    if rows == 0 or n_heads == 0:
        return
    half = rot // 2
    block_h = min(16, triton.next_power_of_2(n_heads))
    block_pass = triton.next_power_of_2(head_dim - rot) if apply_rope and rot < head_dim else 0
    if not apply_rope:
        block_pass = triton.next_power_of_2(head_dim)
    _heads_rope_kernel[(rows, triton.cdiv(n_heads, block_h))](
        src, dst, cos, sin, rows, n_heads, src.stride(0), dst.stride(0), cos.stride(0),
        HEAD_DIM=head_dim, HALF=half, ROT=rot, APPLY_ROPE=apply_rope, BACKWARD=backward,
        BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(max(half, 1)), BLOCK_PASS=block_pass,
        num_warps=4,
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
