"""Pure-PyTorch attention references for the Triton flash-attention kernel.

Dense softmax attention that materialises the full (T, S) score matrix: exact, slow, and only
meant as ground truth for tests and benchmarks. Same conventions as ``flash_attn_func`` /
``flash_attn_varlen_func``: (B, T, H, D) or packed (total, H, D) with ``cu_seqlens``; GQA by
repeating each K/V head over its group of query heads; causal masking aligned to the
bottom-right corner (query i sees keys j <= i + S - T, as flash-attn >= 2.1), and a query row
that sees no key at all gives a zero output row.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_reference", "so8_rotate_reference", "varlen_attention_reference"]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    compute_dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """softmax(q k^T * scale) v on (B, T, H, D) q and (B, S, Hkv, D) k, v; returns (B, T, H, D).

    ``compute_dtype`` is the precision of every step (float64 for tests, float32 as the GPU
    reference, ``None`` = the inputs' own dtype, i.e. "plain PyTorch in bf16"). The result stays
    in that dtype.
    """
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    assert k.shape == (B, S, Hkv, D) and v.shape == (B, S, Hkv, D), (q.shape, k.shape, v.shape)
    assert H % Hkv == 0, f"num_heads {H} is not a multiple of num_kv_heads {Hkv}"
    dtype = compute_dtype or q.dtype
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qh = q.to(dtype).transpose(1, 2)  # (B, H, T, D)
    kh = k.to(dtype).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)  # (B, H, S, D)
    vh = v.to(dtype).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)  # (B, H, S, D)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, H, T, S)
    if causal:
        i = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (S - T), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows without any key -> zeros
    out = torch.matmul(probs, vh)  # (B, H, T, D)
    return out.transpose(1, 2)  # (B, T, H, D)


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    compute_dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """Packed attention on (total_q, H, D) / (total_k, Hkv, D); sequence b owns rows
    cu_seqlens[b]:cu_seqlens[b+1]; no attention across sequences. Returns (total_q, H, D)."""
    assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, (q.shape, k.shape, v.shape)
    assert cu_seqlens_q.numel() == cu_seqlens_k.numel(), "cu_seqlens_q/k describe different batches"
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    dtype = compute_dtype or q.dtype
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)  # (total_q, H, D)
    for b in range(len(cq) - 1):
        if cq[b + 1] == cq[b]:
            continue
        out[cq[b] : cq[b + 1]] = attention_reference(
            q[None, cq[b] : cq[b + 1]],
            k[None, ck[b] : ck[b + 1]],
            v[None, ck[b] : ck[b + 1]],
            causal=causal,
            softmax_scale=softmax_scale,
            compute_dtype=compute_dtype,
        )[0]
    return out


def so8_rotate_reference(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x_b @ R_b for every 8-wide block b of x's last dim; rotation (n, 8, 8), x (..., n*8)."""
    blocks = x.unflatten(-1, (-1, 8))
    return torch.einsum("...ni,nij->...nj", blocks, rotation.to(x.dtype)).flatten(-2)
