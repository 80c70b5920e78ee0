"""Backward of the Triton flash-attention kernel (see flash_attention.py for the method).

Three launches: ``_attn_bwd_preprocess_kernel`` (delta = rowsum(dO * O)), ``_attn_bwd_dkdv_kernel``
(one program per key block and KV head, looping over the query heads of its GQA group and over
the query blocks, so dK / dV are summed over the group in registers) and ``_attn_bwd_dq_kernel``
(one program per query block and head, looping over key blocks). Probabilities are recomputed
from the saved log-sum-exp: P = exp2(S * scale * log2(e) - lse). As in the Triton tutorial the
two kernels each recompute S and dP (7 matmuls instead of FlashAttention-2's 5 with atomic dQ)
in exchange for determinism and no fp32 dQ buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    INTERPRET,
    LOG2E,
    NO_SPECIALIZE,
    _load_tile,
    _seq_bounds,
    _store_tile,
    dot_precision,
    launch,
    seq_bucket,
    split_head_dim,
    tuned,
)

__all__ = ["attn_backward"]


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_ot, stride_oh,  # O and dO: (B, T, H, D) or (total_q, H, D) with stride_ob = 0
    stride_lb, stride_lh,  # DELTA fp32: (B, H, T) or (H, total_q)
    seqlen_q, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # grid: (cdiv(max_seqlen_q, BLOCK_M), batch * num_heads); delta[row] = sum_d O * dO (fp32)
    start_m = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1) // num_heads
    h = tl.program_id(1) % num_heads
    q_start, len_q, _, _ = _seq_bounds(CU_Q, CU_Q, b, seqlen_q, seqlen_q, IS_VARLEN)
    if start_m >= len_q:
        return
    off = b.to(tl.int64) * stride_ob + q_start.to(tl.int64) * stride_ot + h.to(tl.int64) * stride_oh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + off, offs_m, len_q, stride_ot, offs_d, HEAD_DIM, True).to(tl.float32)
    do = _load_tile(DO + off, offs_m, len_q, stride_ot, offs_d, HEAD_DIM, True).to(tl.float32)
    ptrs = DELTA + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
    tl.store(ptrs, tl.sum(o * do, 1), mask=offs_m < len_q)


@triton.jit
def _attn_bwd_dkdv_block(
    dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base, stride_qt,
    start_m, offs_n, len_q, causal_off, qk_scale, offs_mb, offs_d0, offs_d1,
    HEAD_DIM: tl.constexpr, BLOCK_D1: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # one (BLOCK_N keys) x (BLOCK_M queries) step, computed transposed: S^T = K Q^T
    rows = start_m + offs_mb  # (BLOCK_M,)
    q0 = _load_tile(q_base, rows, len_q, stride_qt, offs_d0, HEAD_DIM, True)  # (BLOCK_M, D0)
    do0 = _load_tile(do_base, rows, len_q, stride_qt, offs_d0, HEAD_DIM, True)
    lse = tl.load(lse_base + rows, mask=rows < len_q, other=float("inf"))  # +inf: P = 0
    delta = tl.load(delta_base + rows, mask=rows < len_q, other=0.0)
    qkT = tl.dot(k0, tl.trans(q0), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
    if BLOCK_D1 > 0:
        q1 = _load_tile(q_base, rows, len_q, stride_qt, offs_d1, HEAD_DIM, True)  # (BLOCK_M, D1)
        do1 = _load_tile(do_base, rows, len_q, stride_qt, offs_d1, HEAD_DIM, True)
        qkT = tl.dot(k1, tl.trans(q1), qkT, input_precision=DOT_PRECISION)
    pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
    if MASKED:  # causal diagonal (rows past the end already have lse = +inf)
        pT = tl.where(offs_n[:, None] <= rows[None, :] + causal_off, pT, 0.0)
    dpT = tl.dot(v0, tl.trans(do0), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
    if BLOCK_D1 > 0:
        dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=DOT_PRECISION)
    dsT = (pT * (dpT - delta[None, :])).to(q0.dtype)
    pT = pT.to(q0.dtype)
    dv0 = tl.dot(pT, do0, dv0, input_precision=DOT_PRECISION)
    dk0 = tl.dot(dsT, q0, dk0, input_precision=DOT_PRECISION)
    if BLOCK_D1 > 0:
        dv1 = tl.dot(pT, do1, dv1, input_precision=DOT_PRECISION)
        dk1 = tl.dot(dsT, q1, dk1, input_precision=DOT_PRECISION)
    return dk0, dk1, dv0, dv1


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K,
    stride_qb, stride_qt, stride_qh,  # Q and dO: (B, T, H, D) or (total_q, H, D) with stride_qb = 0
    stride_kb, stride_kt, stride_kh,  # K and dK: (B, S, Hkv, D) or (total_k, Hkv, D)
    stride_vb, stride_vt, stride_vh,  # V and dV: like K
    stride_lb, stride_lh,  # LSE, DELTA fp32: (B, H, T) or (H, total_q)
    seqlen_q, seqlen_k, num_kv_heads, group, qk_scale, sm_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(max_seqlen_k, BLOCK_N), batch * num_kv_heads); dK, dV of one key block,
    # summed over the `group` query heads that share this KV head
    start_n = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1) // num_kv_heads
    hk = tl.program_id(1) % num_kv_heads
    q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    if start_n >= len_k:
        return
    b64 = b.to(tl.int64)
    k_off = b64 * stride_kb + k_start.to(tl.int64) * stride_kt + hk.to(tl.int64) * stride_kh
    v_off = b64 * stride_vb + k_start.to(tl.int64) * stride_vt + hk.to(tl.int64) * stride_vh
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    k0 = _load_tile(K + k_off, offs_n, len_k, stride_kt, offs_d0, HEAD_DIM, True)  # (BLOCK_N, D0)
    v0 = _load_tile(V + v_off, offs_n, len_k, stride_vt, offs_d0, HEAD_DIM, True)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        k1 = _load_tile(K + k_off, offs_n, len_k, stride_kt, offs_d1, HEAD_DIM, True)  # (BLOCK_N, D1)
        v1 = _load_tile(V + v_off, offs_n, len_k, stride_vt, offs_d1, HEAD_DIM, True)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    else:
        offs_d1, k1, v1, dk1, dv1 = offs_d0, k0, v0, dk0, dv0

    # query blocks [m_lo, m_full) straddle the causal diagonal; [m_full, len_q) see all keys
    causal_off = len_k - len_q
    if IS_CAUSAL:
        m_lo = tl.maximum(start_n - causal_off, 0) // BLOCK_M * BLOCK_M
        m_full = tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0)
        m_full = tl.maximum((m_full + BLOCK_M - 1) // BLOCK_M * BLOCK_M, m_lo)
        m_mask_hi = tl.minimum(m_full, len_q)
    else:
        m_lo = start_n * 0
        m_full = m_lo
        m_mask_hi = m_lo
    for g in range(group):
        h = (hk * group + g).to(tl.int64)
        q_off = b64 * stride_qb + q_start.to(tl.int64) * stride_qt + h * stride_qh
        l_off = b64 * stride_lb + h * stride_lh + q_start
        for start_m in range(m_lo, m_mask_hi, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            dk0, dk1, dv0, dv1 = _attn_bwd_dkdv_block(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q + q_off, DO + q_off, LSE + l_off, DELTA + l_off,
                stride_qt, start_m, offs_n, len_q, causal_off, qk_scale, offs_mb, offs_d0, offs_d1,
                HEAD_DIM, BLOCK_D1, True, DOT_PRECISION,
            )
        for start_m in range(m_full, len_q, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            dk0, dk1, dv0, dv1 = _attn_bwd_dkdv_block(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q + q_off, DO + q_off, LSE + l_off, DELTA + l_off,
                stride_qt, start_m, offs_n, len_q, causal_off, qk_scale, offs_mb, offs_d0, offs_d1,
                HEAD_DIM, BLOCK_D1, False, DOT_PRECISION,
            )
    _store_tile(DK + k_off, dk0 * sm_scale, offs_n, len_k, stride_kt, offs_d0, HEAD_DIM)
    _store_tile(DV + v_off, dv0, offs_n, len_k, stride_vt, offs_d0, HEAD_DIM)
    if BLOCK_D1 > 0:
        _store_tile(DK + k_off, dk1 * sm_scale, offs_n, len_k, stride_kt, offs_d1, HEAD_DIM)
        _store_tile(DV + v_off, dv1, offs_n, len_k, stride_vt, offs_d1, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_block(
    dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_kt, stride_vt,
    start_n, offs_m, len_k, causal_off, qk_scale, offs_nb, offs_d0, offs_d1,
    HEAD_DIM: tl.constexpr, BLOCK_D1: tl.constexpr, MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    cols = start_n + offs_nb  # (BLOCK_N,)
    k0 = _load_tile(k_base, cols, len_k, stride_kt, offs_d0, HEAD_DIM, MASKED)  # (BLOCK_N, D0)
    v0 = _load_tile(v_base, cols, len_k, stride_vt, offs_d0, HEAD_DIM, MASKED)
    qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PRECISION)
    if BLOCK_D1 > 0:
        k1 = _load_tile(k_base, cols, len_k, stride_kt, offs_d1, HEAD_DIM, MASKED)  # (BLOCK_N, D1)
        v1 = _load_tile(v_base, cols, len_k, stride_vt, offs_d1, HEAD_DIM, MASKED)
        qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PRECISION)
        dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PRECISION)
    p = tl.math.exp2(qk * qk_scale - lse[:, None])
    if MASKED:
        valid = cols[None, :] < len_k
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + causal_off)
        p = tl.where(valid, p, 0.0)
    ds = (p * (dp - delta[:, None])).to(k0.dtype)
    dq0 = tl.dot(ds, k0, dq0, input_precision=DOT_PRECISION)
    if BLOCK_D1 > 0:
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PRECISION)
    return dq0, dq1


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K,
    stride_qb, stride_qt, stride_qh,  # Q, dO, dQ: (B, T, H, D) or (total_q, H, D) with stride_qb = 0
    stride_kb, stride_kt, stride_kh,  # K: (B, S, Hkv, D) or (total_k, Hkv, D)
    stride_vb, stride_vt, stride_vh,  # V: like K
    stride_lb, stride_lh,  # LSE, DELTA fp32: (B, H, T) or (H, total_q)
    seqlen_q, seqlen_k, num_heads, group, qk_scale, sm_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(max_seqlen_q, BLOCK_M), batch * num_heads); dQ of one query block
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    b = tl.program_id(1) // num_heads
    h = tl.program_id(1) % num_heads
    q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    if start_m >= len_q:
        return
    b64 = b.to(tl.int64)
    q_off = b64 * stride_qb + q_start.to(tl.int64) * stride_qt + h.to(tl.int64) * stride_qh
    hk = (h // group).to(tl.int64)
    k_base = K + b64 * stride_kb + k_start.to(tl.int64) * stride_kt + hk * stride_kh
    v_base = V + b64 * stride_vb + k_start.to(tl.int64) * stride_vt + hk * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    q0 = _load_tile(Q + q_off, offs_m, len_q, stride_qt, offs_d0, HEAD_DIM, True)  # (BLOCK_M, D0)
    do0 = _load_tile(DO + q_off, offs_m, len_q, stride_qt, offs_d0, HEAD_DIM, True)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = _load_tile(Q + q_off, offs_m, len_q, stride_qt, offs_d1, HEAD_DIM, True)  # (BLOCK_M, D1)
        do1 = _load_tile(DO + q_off, offs_m, len_q, stride_qt, offs_d1, HEAD_DIM, True)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    else:
        offs_d1, q1, do1, dq1 = offs_d0, q0, do0, dq0
    l_offs = b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
    lse = tl.load(LSE + l_offs, mask=offs_m < len_q, other=float("inf"))  # +inf: P = 0
    delta = tl.load(DELTA + l_offs, mask=offs_m < len_q, other=0.0)

    causal_off = len_k - len_q
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(len_k, start_m + BLOCK_M + causal_off), 0)
        full_hi = tl.maximum(tl.minimum(len_k, start_m + causal_off + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = len_k
        full_hi = len_k // BLOCK_N * BLOCK_N
    for start_n in range(0, full_hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        dq0, dq1 = _attn_bwd_dq_block(
            dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_kt, stride_vt,
            start_n, offs_m, len_k, causal_off, qk_scale, offs_nb, offs_d0, offs_d1,
            HEAD_DIM, BLOCK_D1, False, IS_CAUSAL, DOT_PRECISION,
        )
    for start_n in range(full_hi, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        dq0, dq1 = _attn_bwd_dq_block(
            dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_kt, stride_vt,
            start_n, offs_m, len_k, causal_off, qk_scale, offs_nb, offs_d0, offs_d1,
            HEAD_DIM, BLOCK_D1, True, IS_CAUSAL, DOT_PRECISION,
        )
    _store_tile(DQ + q_off, dq0 * sm_scale, offs_m, len_q, stride_qt, offs_d0, HEAD_DIM)
    if BLOCK_D1 > 0:
        _store_tile(DQ + q_off, dq1 * sm_scale, offs_m, len_q, stride_qt, offs_d1, HEAD_DIM)


DKDV_CONFIGS = [(32, 128, 8, 3, 256), (16, 128, 8, 3, 256), (64, 128, 8, 3, 96), (32, 64, 4, 3, 256)]
DQ_CONFIGS = [(128, 64, 8, 3, 256), (128, 32, 8, 3, 256), (128, 32, 4, 3, 96), (64, 64, 4, 3, 256)]
_dkdv_tuned = None if INTERPRET else tuned(_attn_bwd_dkdv_kernel, DKDV_CONFIGS)
_dq_tuned = None if INTERPRET else tuned(_attn_bwd_dq_kernel, DQ_CONFIGS)


def attn_backward(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
    """dQ, dK, dV (like q, k, v) from dO and the forward's o, lse (see attn_forward)."""
    varlen = cu_q is not None
    if do.stride() != o.stride():
        do = torch.empty_like(o).copy_(do)  # dO shares the strides of O (and Q)
    H, Hkv, D = q.shape[-2], k.shape[-2], q.shape[-1]
    if varlen:
        batch, seqlen_q, seqlen_k = cu_q.numel() - 1, int(max_q), int(max_k)
        sq, sk, sv = (0, *q.stride()[:2]), (0, *k.stride()[:2]), (0, *v.stride()[:2])
        sl = (0, lse.stride(0))
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        sq, sk, sv = q.stride()[:3], k.stride()[:3], v.stride()[:3]
        sl = lse.stride()[:2]
        cu_q = cu_k = lse  # unused placeholders
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # strides of q, k, v
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    d0, d1 = split_head_dim(D)
    bucket = seq_bucket(max(seqlen_q, seqlen_k))
    prec = dot_precision(q.dtype)
    _attn_bwd_preprocess_kernel[(triton.cdiv(seqlen_q, 64), batch * H)](
        o, do, delta, cu_q, *sq, *sl, seqlen_q, H,
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=64, IS_VARLEN=varlen,
    )
    common = dict(HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, IS_CAUSAL=bool(causal), IS_VARLEN=varlen, DOT_PRECISION=prec)
    scale2 = softmax_scale * LOG2E
    launch(
        _attn_bwd_dkdv_kernel, _dkdv_tuned, "dkdv", lambda meta: (triton.cdiv(seqlen_k, meta["BLOCK_N"]), batch * Hkv),
        q.dtype, q, k, v, do, dk, dv, lse, delta, cu_q, cu_k, *sq, *sk, *sv, *sl,
        seqlen_q, seqlen_k, Hkv, H // Hkv, scale2, softmax_scale, bucket, **common,
    )
    launch(
        _attn_bwd_dq_kernel, _dq_tuned, "dq", lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * H),
        q.dtype, q, k, v, do, dq, lse, delta, cu_q, cu_k, *sq, *sk, *sv, *sl,
        seqlen_q, seqlen_k, H, H // Hkv, scale2, softmax_scale, bucket, **common,
    )
    return dq, dk, dv
