"""Flash attention in Triton: forward + backward, causal, GQA, packed variable-length batches.

What: ``flash_attn_func`` on (B, T, H, D) and ``flash_attn_varlen_func`` on packed (total, H, D)
with ``cu_seqlens``, with the calling conventions of the ``flash-attn`` package, for machines where
it cannot be installed. Exact softmax attention with an online softmax; the forward saves only
the log-sum-exp per row, and the backward recomputes the probabilities tile by tile, so no
(T, S) matrix exists anywhere. The backward is two kernels: dK/dV per key block (looping over the
query heads of its KV group, so GQA needs no reduction buffer) and dQ per query block.

Limits: fp16 / bf16 (fp32 accumulation) and fp32 inputs; head dim <= 256 (64, 96, 128 tuned);
``dropout_p`` must be 0; no sliding window, ALiBi or softcap. Causal masks align to the
bottom-right corner when seqlen_q != seqlen_k (query i sees keys j <= i + seqlen_k - seqlen_q,
as flash-attn >= 2.1); a query row that sees no key returns zeros. Forward and backward are
deterministic (no atomics).

Origin: FlashAttention-2 (Tri Dao, 2023, arXiv:2307.08691) and the Triton fused-attention
tutorial (06-fused-attention.py, after the OpenAI/Tillet kernel); head dims that are not a
power of two (96) run as two power-of-two column blocks instead of a padded 128.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .flash_attention_bwd import attn_backward
from .utils import (
    INTERPRET,
    LOG2E,
    NO_SPECIALIZE,
    _load_tile,
    _seq_bounds,
    _store_tile,
    check_cu_seqlens,
    check_qkv,
    dot_precision,
    launch,
    seq_bucket,
    split_head_dim,
    tuned,
)

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


@triton.jit
def _attn_fwd_block(
    acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_kt, stride_vt,
    start_n, offs_m, len_k, causal_off, qk_scale,
    offs_n, offs_d0, offs_d1,
    HEAD_DIM: tl.constexpr, BLOCK_D1: tl.constexpr, MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # one (BLOCK_M, BLOCK_N) step of the online softmax; MASKED: the block straddles the causal
    # diagonal or the end of the key sequence
    cols = start_n + offs_n  # (BLOCK_N,)
    k0 = _load_tile(k_base, cols, len_k, stride_kt, offs_d0, HEAD_DIM, MASKED)  # (BLOCK_N, D0)
    qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    if BLOCK_D1 > 0:
        k1 = _load_tile(k_base, cols, len_k, stride_kt, offs_d1, HEAD_DIM, MASKED)  # (BLOCK_N, D1)
        qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PRECISION)
    qk = qk * qk_scale  # log2 units
    if MASKED:
        valid = cols[None, :] < len_k
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + causal_off)
        qk = tl.where(valid, qk, -1.0e6)  # finite: a fully masked first block must not NaN
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])  # (BLOCK_M, BLOCK_N)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v0 = _load_tile(v_base, cols, len_k, stride_vt, offs_d0, HEAD_DIM, MASKED)  # (BLOCK_N, D0)
    p = p.to(v0.dtype)
    acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
    if BLOCK_D1 > 0:
        v1 = _load_tile(v_base, cols, len_k, stride_vt, offs_d1, HEAD_DIM, MASKED)  # (BLOCK_N, D1)
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
    return acc0, acc1, l_i, m_new


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qt, stride_qh,  # Q and O: (B, T, H, D) or (total_q, H, D) with stride_qb = 0
    stride_kb, stride_kt, stride_kh,  # K: (B, S, Hkv, D) or (total_k, Hkv, D)
    stride_vb, stride_vt, stride_vh,  # V: like K
    stride_lb, stride_lh,  # LSE fp32: (B, H, T) or (H, total_q) with stride_lb = 0
    seqlen_q, seqlen_k, num_heads, group, qk_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(max_seqlen_q, BLOCK_M), batch * num_heads); the last query blocks (the most
    # work under a causal mask) are launched first. CU_Q / CU_K: int32 (batch + 1,) if IS_VARLEN.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    if start_m >= len_q:
        return
    b64 = b.to(tl.int64)
    q_off = b64 * stride_qb + q_start.to(tl.int64) * stride_qt + h.to(tl.int64) * stride_qh
    hk = (h // group).to(tl.int64)
    k_base = K + b64 * stride_kb + k_start.to(tl.int64) * stride_kt + hk * stride_kh
    v_base = V + b64 * stride_vb + k_start.to(tl.int64) * stride_vt + hk * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    q0 = _load_tile(Q + q_off, offs_m, len_q, stride_qt, offs_d0, HEAD_DIM, True)  # (BLOCK_M, D0)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = _load_tile(Q + q_off, offs_m, len_q, stride_qt, offs_d1, HEAD_DIM, True)  # (BLOCK_M, D1)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    else:
        offs_d1 = offs_d0
        q1 = q0
        acc1 = acc0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # key blocks [0, full_hi) need no mask; [full_hi, hi) straddle the diagonal or the end
    causal_off = len_k - len_q
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(len_k, start_m + BLOCK_M + causal_off), 0)
        full_hi = tl.maximum(tl.minimum(len_k, start_m + causal_off + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = len_k
        full_hi = len_k // BLOCK_N * BLOCK_N
    for start_n in range(0, full_hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc0, acc1, l_i, m_i = _attn_fwd_block(
            acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_kt, stride_vt,
            start_n, offs_m, len_k, causal_off, qk_scale, offs_n, offs_d0, offs_d1,
            HEAD_DIM, BLOCK_D1, False, IS_CAUSAL, DOT_PRECISION,
        )
    for start_n in range(full_hi, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc0, acc1, l_i, m_i = _attn_fwd_block(
            acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_kt, stride_vt,
            start_n, offs_m, len_k, causal_off, qk_scale, offs_n, offs_d0, offs_d1,
            HEAD_DIM, BLOCK_D1, True, IS_CAUSAL, DOT_PRECISION,
        )

    # epilogue: rows that see no key (causal with seqlen_q > seqlen_k, or seqlen_k == 0) -> 0
    if IS_CAUSAL:
        has_keys = (offs_m + causal_off >= 0) & (len_k > 0)
    else:
        has_keys = (offs_m >= 0) & (len_k > 0)
    inv_l = tl.where(has_keys, 1.0 / tl.where(has_keys, l_i, 1.0), 0.0)
    _store_tile(O + q_off, acc0 * inv_l[:, None], offs_m, len_q, stride_qt, offs_d0, HEAD_DIM)
    if BLOCK_D1 > 0:
        _store_tile(O + q_off, acc1 * inv_l[:, None], offs_m, len_q, stride_qt, offs_d1, HEAD_DIM)
    lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("inf"))
    lse_ptrs = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
    tl.store(lse_ptrs, lse, mask=offs_m < len_q)


FWD_CONFIGS = [(128, 64, 8, 3, 256), (128, 128, 8, 3, 256), (128, 64, 4, 3, 96), (64, 64, 4, 3, 256)]
_fwd_tuned = None if INTERPRET else tuned(_attn_fwd_kernel, FWD_CONFIGS)


def attn_forward(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
    """Launch the forward kernel. Dense: q (B, T, H, D), k/v (B, S, Hkv, D), cu_* None.
    Varlen: q (total_q, H, D), k/v (total_k, Hkv, D), cu_* int32 (n+1,).
    Returns o (like q) and lse fp32 in log2 units, (B, H, T) or (H, total_q)."""
    varlen = cu_q is not None
    check_qkv(q, k, v, varlen)
    H, D = q.shape[-2], q.shape[-1]
    if varlen:
        check_cu_seqlens(cu_q, q.shape[0], "cu_seqlens_q", q.device)
        check_cu_seqlens(cu_k, k.shape[0], "cu_seqlens_k", q.device)
        if cu_q.numel() != cu_k.numel():
            raise ValueError("cu_seqlens_q and cu_seqlens_k describe different batch sizes")
        batch, seqlen_q, seqlen_k = cu_q.numel() - 1, int(max_q), int(max_k)
        sq, sk, sv = (0, *q.stride()[:2]), (0, *k.stride()[:2]), (0, *v.stride()[:2])
        lse = torch.empty((H, q.shape[0]), dtype=torch.float32, device=q.device)
        sl = (0, lse.stride(0))
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        sq, sk, sv = q.stride()[:3], k.stride()[:3], v.stride()[:3]
        lse = torch.empty((batch, H, seqlen_q), dtype=torch.float32, device=q.device)
        sl = lse.stride()[:2]
        cu_q = cu_k = lse  # unused placeholders
    o = torch.empty_like(q)  # same strides as q
    d0, d1 = split_head_dim(D)
    grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * H)  # noqa: E731
    if q.numel() == 0 or seqlen_q == 0:
        return o.zero_(), lse.fill_(float("inf"))
    launch(
        _attn_fwd_kernel, _fwd_tuned, "fwd", grid, q.dtype,
        q, k, v, o, lse, cu_q, cu_k, *sq, *sk, *sv, *sl,
        seqlen_q, seqlen_k, H, H // k.shape[-2], softmax_scale * LOG2E, seq_bucket(seqlen_q),
        HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, IS_CAUSAL=bool(causal), IS_VARLEN=varlen,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    return o, lse


class FlashAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
        o, lse = attn_forward(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, softmax_scale, causal)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = attn_backward(do, q, k, v, o, lse, cu_q, cu_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def _prepare(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_common(dropout_p: float, q: torch.Tensor, softmax_scale: float | None) -> float:
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p}: the Triton attention kernel supports no dropout (use 0.0)")
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """Attention on q (B, T, H, D), k/v (B, S, Hkv, D) with H % Hkv == 0; returns (B, T, H, D)."""
    scale = _check_common(dropout_p, q, softmax_scale)
    q, k, v = _prepare(q), _prepare(k), _prepare(v)
    return FlashAttnFunction.apply(q, k, v, None, None, q.shape[1], k.shape[1], scale, causal)


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False
):
    """Packed attention on q (total_q, H, D), k/v (total_k, Hkv, D); sequence b is rows
    cu_seqlens[b]:cu_seqlens[b+1] (int32, (n+1,)); no attention across sequences."""
    scale = _check_common(dropout_p, q, softmax_scale)
    q, k, v = _prepare(q), _prepare(k), _prepare(v)
    return FlashAttnFunction.apply(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale, causal
    )
