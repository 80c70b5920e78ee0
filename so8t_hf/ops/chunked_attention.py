"""Exact chunked attention in pure PyTorch: online softmax forward, recomputing backward.

The FlashAttention-2 algorithm (Dao, 2023) written with torch ops over (query chunk, key chunk) tiles,
so neither pass holds a T x S matrix: memory is O(chunk^2) per head beyond the inputs and outputs. It is
the CPU / no-kernel path of the `so8t` attention and works for any device and dtype (fp32 accumulation).

Masking (all optional, combined): causal with bottom-right alignment (query i sees key j <= i + S - T, as
flash-attn >= 2.1), packed-sequence segment ids (a query sees only keys of its own segment), and a dense
boolean keep-mask (B or 1, 1, T, S). Query rows that see no key output zeros and get zero gradients.
GQA: K/V may have fewer heads (H % Hkv == 0). Dropout is not supported.
"""

import torch

DEFAULT_CHUNK = 256


def _accumulation_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _tile_keep(i0, i1, j0, j1, causal_offset, segments, keep_mask, device):
    """Boolean keep-mask of one tile, broadcastable to (B, Hkv, G, Cq, Ck), or None for "keep all"."""
    keep = None
    if causal_offset is not None:
        rows = torch.arange(i0, i1, device=device)[:, None]
        cols = torch.arange(j0, j1, device=device)[None, :]
        keep = cols <= rows + causal_offset  # (Cq, Ck)
    if segments is not None:
        same = segments[:, i0:i1, None] == segments[:, None, j0:j1]  # (B, Cq, Ck)
        same = same[:, None, None]  # (B, 1, 1, Cq, Ck)
        keep = same if keep is None else keep & same
    if keep_mask is not None:
        dense = keep_mask[:, :, i0:i1, j0:j1][:, :, None]  # (B|1, 1, 1, Cq, Ck)
        keep = dense if keep is None else keep & dense
    return keep


def _segment_lower_bounds(segments, q_len, chunk):
    """Per query chunk, the first key any of its queries can see when segments (packed rows) restrict it."""
    if segments is None:
        return None
    positions = torch.arange(q_len, device=segments.device).expand_as(segments)
    is_start = torch.ones_like(segments, dtype=torch.bool)
    is_start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    seg_start = torch.where(is_start, positions, 0).cummax(-1).values  # (B, T): start of each token's sequence
    return seg_start[:, ::chunk].amin(0).tolist()


def _key_range(i0, i1, kv_len, chunk, causal_offset, lower_bounds=None):
    """Key chunk starts that can hold a visible key for queries i0..i1-1: causal skips the upper triangle,
    packed segments skip the keys of earlier sequences (block-diagonal sparsity)."""
    stop = kv_len if causal_offset is None else min(kv_len, i1 + causal_offset)
    start = 0 if lower_bounds is None else lower_bounds[i0 // chunk] // chunk * chunk
    return range(start, max(stop, 0), chunk)


class ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal_offset, segments, keep_mask, chunk):
        # q (B, H, T, D); k, v (B, Hkv, S, D); returns out (B, H, T, D)
        bsz, heads, q_len, dim = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        acc_dtype = _accumulation_dtype(q)
        qg = q.view(bsz, kv_heads, groups, q_len, dim)  # (B, Hkv, G, T, D)
        lower_bounds = _segment_lower_bounds(segments, q_len, chunk)
        out = torch.empty_like(qg, dtype=acc_dtype)
        lse = torch.empty(bsz, kv_heads, groups, q_len, device=q.device, dtype=acc_dtype)
        for i0 in range(0, q_len, chunk):
            i1 = min(i0 + chunk, q_len)
            qc = qg[..., i0:i1, :].to(acc_dtype)
            row_max = torch.full(qc.shape[:-1], float("-inf"), device=q.device, dtype=acc_dtype)
            row_sum = torch.zeros_like(row_max)
            acc = torch.zeros_like(qc)
            for j0 in _key_range(i0, i1, kv_len, chunk, causal_offset, lower_bounds):
                j1 = min(j0 + chunk, kv_len)
                kc, vc = k[:, :, None, j0:j1].to(acc_dtype), v[:, :, None, j0:j1].to(acc_dtype)  # (B, Hkv, 1, Ck, D)
                scores = qc @ kc.transpose(-1, -2) * scale  # (B, Hkv, G, Cq, Ck)
                keep = _tile_keep(i0, i1, j0, j1, causal_offset, segments, keep_mask, q.device)
                if keep is not None:
                    scores = scores.masked_fill(~keep, float("-inf"))
                new_max = torch.maximum(row_max, scores.amax(-1))
                safe_max = torch.where(torch.isinf(new_max), 0.0, new_max)
                probs = torch.exp(scores - safe_max[..., None])
                correction = torch.exp(row_max - safe_max)
                row_sum = row_sum * correction + probs.sum(-1)
                acc = acc * correction[..., None] + probs @ vc
                row_max = new_max
            seen = row_sum > 0
            out[..., i0:i1, :] = torch.where(seen[..., None], acc / row_sum.clamp_min(1e-30)[..., None], 0.0)
            safe_max = torch.where(torch.isinf(row_max), 0.0, row_max)
            lse[..., i0:i1] = torch.where(seen, safe_max + torch.log(row_sum.clamp_min(1e-30)), float("inf"))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, segments, keep_mask)
        ctx.scale, ctx.causal_offset, ctx.chunk = scale, causal_offset, chunk
        return out.view(bsz, heads, q_len, dim)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, segments, keep_mask = ctx.saved_tensors
        scale, causal_offset, chunk = ctx.scale, ctx.causal_offset, ctx.chunk
        bsz, heads, q_len, dim = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        acc_dtype = _accumulation_dtype(q)
        qg = q.view(bsz, kv_heads, groups, q_len, dim)
        dout = grad_out.reshape(bsz, kv_heads, groups, q_len, dim)
        delta = (dout.to(acc_dtype) * out.to(acc_dtype)).sum(-1)  # (B, Hkv, G, T)
        dq = torch.zeros_like(qg, dtype=acc_dtype)
        dk = torch.zeros_like(k, dtype=acc_dtype)
        dv = torch.zeros_like(v, dtype=acc_dtype)
        lower_bounds = _segment_lower_bounds(segments, q_len, chunk)
        for i0 in range(0, q_len, chunk):
            i1 = min(i0 + chunk, q_len)
            qc, doc = qg[..., i0:i1, :].to(acc_dtype), dout[..., i0:i1, :].to(acc_dtype)
            lse_c, delta_c = lse[..., i0:i1, None], delta[..., i0:i1, None]
            for j0 in _key_range(i0, i1, kv_len, chunk, causal_offset, lower_bounds):
                j1 = min(j0 + chunk, kv_len)
                kc, vc = k[:, :, None, j0:j1].to(acc_dtype), v[:, :, None, j0:j1].to(acc_dtype)
                scores = qc @ kc.transpose(-1, -2) * scale
                keep = _tile_keep(i0, i1, j0, j1, causal_offset, segments, keep_mask, q.device)
                if keep is not None:
                    scores = scores.masked_fill(~keep, float("-inf"))
                probs = torch.exp(scores - lse_c)  # (B, Hkv, G, Cq, Ck); 0 where masked or unseen
                dv[:, :, j0:j1] += (probs.transpose(-1, -2) @ doc).sum(2)
                dprobs = doc @ vc.transpose(-1, -2)
                dscores = probs * (dprobs - delta_c) * scale
                dq[..., i0:i1, :] += dscores @ kc
                dk[:, :, j0:j1] += (dscores.transpose(-1, -2) @ qc).sum(2)
        dq = dq.view(bsz, heads, q_len, dim).to(q.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def chunked_attention(q, k, v, scale=None, causal=True, segments=None, keep_mask=None, chunk=DEFAULT_CHUNK):
    """Exact attention over (B, H, T, D) queries and (B, Hkv, S, D) keys/values -> (B, H, T, D).

    causal: bottom-right aligned causal mask; segments: (B, T) int ids of packed sequences (needs T == S);
    keep_mask: dense boolean (B or 1, 1, T, S), True where attention is allowed.
    """
    bsz, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if segments is not None and (q_len != kv_len or segments.shape != (bsz, q_len)):
        raise ValueError(f"segments must be (B, T) = {(bsz, q_len)} with T == S, got {tuple(segments.shape)}, S={kv_len}")
    if keep_mask is not None and keep_mask.dtype != torch.bool:
        raise ValueError(f"keep_mask must be boolean, got {keep_mask.dtype}")
    scale = dim**-0.5 if scale is None else scale
    causal_offset = kv_len - q_len if causal else None
    return ChunkedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale, causal_offset, segments, keep_mask, chunk)
