"""The `so8t` attention implementation: backend dispatch and registration with transformers.

`import so8t_hf` registers `attn_implementation="so8t"` with transformers' `AttentionInterface` and a
matching mask function with `AttentionMaskInterface` (without it a custom attention silently gets
`mask=None`). Backends, best first: `flash_attn` (if installed) > `triton` (the project's kernel) >
`sdpa` > `chunked` (exact online-softmax PyTorch, bounded memory) > `eager` (dense reference).

Masks. The mask function returns `None` for plain causal attention (bottom-right aligned when a KV
cache makes S > T) and for padding-free packed rows, whose sequence boundaries the attention derives
from `position_ids` (restarting at 0) or `cu_seq_lens_q`; otherwise (padding, an active sliding window)
it returns transformers' dense boolean mask. No backend ever lets a packed sequence see another.

Observability: every call counts its backend in `BACKEND_COUNTS`; the first use of each
(backend, reason) pair is logged at INFO, and `last_backend()` names the latest.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections import Counter

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from so8t_hf.ops.chunked_attention import chunked_attention

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "so8t"
BACKENDS = ("flash_attn", "triton", "sdpa", "chunked", "eager")

BACKEND_COUNTS: Counter = Counter()
_announced: set[tuple[str, str]] = set()
_last: list[str] = []
_forced: list[str] = []


def last_backend() -> str | None:
    """The backend of the most recent so8t attention call (None before the first)."""
    return _last[-1] if _last else None


@contextlib.contextmanager
def force_attention_backend(name: str):
    """Force every so8t attention call inside the block onto one backend (tests, benchmarks)."""
    _check_backend_name(name)
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _check_backend_name(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"Unknown so8t attention backend {name!r}; choose auto or one of {', '.join(BACKENDS)}.")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def triton_kernel_available() -> bool:
    try:
        from so8t_hf.ops import triton_available
    except ImportError:
        return False
    return triton_available()


def _backend_unavailable_reason(name: str, query: torch.Tensor) -> str | None:
    half = query.dtype in (torch.float16, torch.bfloat16)
    if name == "flash_attn":
        if not flash_attn_available():
            return "flash-attn is not installed (pip install 'so8t-hf[flash]') or no CUDA GPU"
        if not (query.is_cuda and half):
            return "flash-attn needs CUDA fp16/bf16 tensors"
    if name == "triton" and not triton_kernel_available():
        return "the Triton kernel needs triton and a CUDA GPU (or TRITON_INTERPRET=1)"
    return None


def choose_backend(requested: str, query: torch.Tensor, has_mask: bool, packed: bool, dropout: float):
    """(backend, reason) for one call. A forced backend that cannot run raises; `auto` never does."""
    _check_backend_name(requested)
    if requested != "auto":
        reason = _backend_unavailable_reason(requested, query)
        if reason:
            raise RuntimeError(f"so8t attention backend {requested!r} cannot run: {reason}.")
        if dropout and requested not in ("sdpa", "eager"):
            raise ValueError(f"so8t attention backend {requested!r} has no dropout; use sdpa or eager for dropout>0.")
        return requested, "requested"
    if dropout:
        return "sdpa", "attention dropout > 0"
    fast_kernels = not has_mask and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
    if fast_kernels and flash_attn_available():
        return "flash_attn", "flash-attn installed"
    # Dense causal batches keep SDPA: measured on an H100 (benchmarks/results/attention_h100.md) SDPA's default
    # runs at cuDNN speed, 1.3x ours fwd+bwd at D96. Packed rows take the kernel: 3.75x padded SDPA's tokens/s.
    if fast_kernels and triton_kernel_available() and packed:
        return "triton", "packed rows: varlen kernel"
    if packed and not query.is_cuda:  # measured: benchmarks/results/attention_cpu.md
        return "chunked", "packed rows on CPU: exact, no T x T mask"
    if packed:
        return "sdpa", "packed rows without a varlen kernel: block-diagonal mask"
    return "sdpa", "padding / window mask" if has_mask else "default"


def _record(backend: str, reason: str) -> None:
    BACKEND_COUNTS[backend] += 1
    _last[:] = [backend]
    if (backend, reason) not in _announced:
        _announced.add((backend, reason))
        logger.info("so8t attention: backend %s (%s)", backend, reason)


# --------------------------------------------------------------------------- masks and segments


def packed_segments(position_ids, cu_seq_lens, batch: int, q_len: int, kv_len: int):
    """(B, T) segment ids of padding-free packed rows, or None when each row is one sequence."""
    if q_len != kv_len or q_len < 2:
        return None
    if cu_seq_lens is not None:
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q describes one packed row, but the batch has {batch} rows")
        starts = torch.zeros(q_len, dtype=torch.int32, device=cu_seq_lens.device)
        starts[cu_seq_lens[1:-1].long()] = 1
        return starts.cumsum(0)[None]
    if position_ids is None:
        return None
    position_ids = position_ids.expand(batch, -1)
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    segments = (step != 1).cumsum(-1)
    if not bool((segments[:, -1] > 0).any()):
        return None
    return segments


def so8t_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs):
    """AttentionMaskInterface entry: None when the attention can derive the mask itself, else a dense bool mask."""
    config = kwargs.get("config")
    window = getattr(config, "sliding_window", None)
    window_active = window is not None and window < kv_length + kv_offset
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and not window_active:
        return None  # causal (bottom-right with a cache) or packed rows: derived in the attention itself
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )


def _as_keep_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 4D mask as boolean keep-mask (True = attend); additive float masks are converted."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def dense_keep_mask(q_len, kv_len, segments, keep_mask, device):
    """The full (B|1, 1, T, S) keep-mask: causal (bottom-right) & same segment & the given mask."""
    if keep_mask is not None:
        return keep_mask  # transformers' mask already holds causality, window and padding
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(kv_len, device=device)[None, :]
    keep = (cols <= rows + (kv_len - q_len))[None, None]  # (1, 1, T, S)
    if segments is not None:
        keep = keep & (segments[:, None, :, None] == segments[:, None, None, :])
    return keep


# --------------------------------------------------------------------------- backends
# Each takes q (B, H, T, D), k/v (B, Hkv, S, D) and returns (B, T, H, D).


def _eager(q, k, v, scale, segments, keep_mask, dropout, varlen=None):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, H, T, S)
    keep = dense_keep_mask(q.shape[2], k.shape[2], segments, keep_mask, q.device)
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(v.dtype)  # rows that see nothing -> 0
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return (probs @ v).transpose(1, 2)


def _sdpa(q, k, v, scale, segments, keep_mask, dropout, varlen=None):
    q_len, kv_len = q.shape[2], k.shape[2]
    if keep_mask is None and segments is None and (q_len == kv_len or q_len == 1):
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=q_len > 1, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
        )
        return out.transpose(1, 2)
    keep = dense_keep_mask(q_len, kv_len, segments, keep_mask, q.device)
    keep = keep | ~keep.any(-1, keepdim=True)  # a row that sees nothing would give NaN: let it see all
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout, scale=scale)
    return out.transpose(1, 2)


def _chunked(q, k, v, scale, segments, keep_mask, dropout, varlen=None):
    return chunked_attention(q, k, v, scale=scale, causal=keep_mask is None, segments=segments, keep_mask=keep_mask).transpose(1, 2)


def _cu_seqlens(segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Flattened (B*T) sequence starts of packed rows: a new sequence at each segment change or row start."""
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    idx = starts.flatten().nonzero().flatten()
    cu = torch.cat([idx, idx.new_tensor([segments.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _padding_as_segments(keep_mask: torch.Tensor, q_len: int, kv_len: int):
    """Valid-token indices when `keep_mask` is exactly causal & key padding (so padding can be unpadded)."""
    if q_len != kv_len:
        return None
    valid = keep_mask[:, 0].any(-2)  # (B, S): a key that anyone may see
    rows = torch.arange(q_len, device=keep_mask.device)
    causal = rows[None, :] <= rows[:, None]
    expected = causal[None] & valid[:, None, :] & valid[:, :, None]
    actual = keep_mask[:, 0].expand_as(expected) & valid[:, :, None]
    return valid if torch.equal(expected, actual) else None


def _flash_like(fa_func, fa_varlen_func, name):
    def forward(q, k, v, scale, segments, keep_mask, dropout, varlen=None):
        bsz, heads, q_len, dim = q.shape
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, H, D)
        if keep_mask is None and segments is None:
            return fa_func(qt.contiguous(), kt.contiguous(), vt.contiguous(), softmax_scale=scale, causal=True)
        if keep_mask is not None:
            valid = _padding_as_segments(keep_mask, q_len, k.shape[2])
            if valid is None:
                raise ValueError(f"the {name} backend handles causal, packed and padding masks only (not sliding windows or cache offsets with padding); use sdpa")
            flat_valid = valid.flatten()
            row_of_token = torch.arange(bsz, device=q.device)[:, None].expand(bsz, q_len).flatten()[flat_valid]
            cu, max_len = _cu_seqlens(row_of_token[None])
            pick = lambda t: t.reshape(bsz * q_len, *t.shape[2:])[flat_valid]  # noqa: E731
            out = fa_varlen_func(pick(qt), pick(kt), pick(vt), cu, cu, max_len, max_len, softmax_scale=scale, causal=True)
            full = out.new_zeros(bsz * q_len, heads, dim)
            full[flat_valid] = out
            return full.view(bsz, q_len, heads, dim)
        cu, max_len = varlen if varlen is not None else _cu_seqlens(segments)
        flat = lambda t: t.reshape(bsz * q_len, *t.shape[2:]).contiguous()  # noqa: E731
        out = fa_varlen_func(flat(qt), flat(kt), flat(vt), cu, cu, max_len, max_len, softmax_scale=scale, causal=True)
        return out.view(bsz, q_len, heads, dim)

    return forward


def _triton(q, k, v, scale, segments, keep_mask, dropout, varlen=None):
    from so8t_hf.ops import flash_attn_func, flash_attn_varlen_func

    return _flash_like(flash_attn_func, flash_attn_varlen_func, "triton")(q, k, v, scale, segments, keep_mask, dropout, varlen)


def _flash_attn(q, k, v, scale, segments, keep_mask, dropout, varlen=None):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    return _flash_like(flash_attn_func, flash_attn_varlen_func, "flash_attn")(q, k, v, scale, segments, keep_mask, dropout, varlen)


_BACKEND_FORWARD = {"flash_attn": _flash_attn, "triton": _triton, "sdpa": _sdpa, "chunked": _chunked, "eager": _eager}


def so8t_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """AttentionInterface entry: query (B, H, T, D), key/value (B, Hkv, S, D) -> ((B, T, H, D), None)."""
    bsz, _, q_len, dim = query.shape
    kv_len = key.shape[2]
    keep_mask = _as_keep_mask(attention_mask) if attention_mask is not None else None
    if keep_mask is not None and keep_mask.shape[-1] != kv_len:
        keep_mask = keep_mask[..., :kv_len]
    segments = None
    if keep_mask is None:
        segments = packed_segments(kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"), bsz, q_len, kv_len)
    config = getattr(module, "config", None)
    requested = _forced[-1] if _forced else os.environ.get("SO8T_ATTN_BACKEND") or getattr(config, "so8t_attn_backend", "auto")
    backend, reason = choose_backend(requested, query, keep_mask is not None, segments is not None, dropout)
    _record(backend, reason)
    scale = scaling if scaling is not None else dim**-0.5
    varlen = None
    if segments is not None and kwargs.get("cu_seq_lens_q") is not None and kwargs.get("max_length_q") is not None:
        varlen = (kwargs["cu_seq_lens_q"].to(query.device, torch.int32), int(kwargs["max_length_q"]))  # no sync per layer
    out = _BACKEND_FORWARD[backend](query, key, value, scale, segments, keep_mask, dropout, varlen)
    return out.contiguous(), None


def register() -> None:
    """Register `attn_implementation="so8t"` (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, so8t_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, so8t_mask)


register()
