"""The `so8t` attention implementation: backend dispatch and registration with transformers.

`import so8t_hf` registers `attn_implementation="so8t"` with transformers' `AttentionInterface` and a
matching mask function with `AttentionMaskInterface` (without it a custom attention silently gets
`mask=None`). Backends, best first: `flash_attn` (flash-attn 2, if usable) > `torch_varlen` (PyTorch's own
`torch.nn.attention.varlen.varlen_attn`, FlashAttention inside PyTorch >= 2.10) / `triton` (the project's
kernel) > `sdpa` > `chunked` (exact online-softmax PyTorch, bounded memory) > `eager` (dense reference).

`auto` on packed CUDA rows picks by the mean sequence length of the pack (known from `cu_seq_lens_q`'s shape, no
sync): `torch_varlen` up to `TORCH_VARLEN_MAX_MEAN_LEN` tokens, our kernel above. Measured on an H100, fwd+bwd,
H32 D96: 20 SFT rows in 8,192 tokens, varlen_attn 0.735 ms vs ours 1.069 ms; 22 rows in 27k tokens, ours 1.10x
(issue 16; DESIGN.md's anchors). Where flash-attn 3 or 4 is usable (`flash_backends.py`: detected by a tiny call,
not by package name), `auto` measures it against our kernel once per shape of packs of long sequences (mean length
above `TORCH_VARLEN_MAX_MEAN_LEN`), forward and backward, and keeps the faster (`measured_packed_choice`, logged).
Packs of shorter sequences keep varlen_attn unmeasured: there flash-attn 4 was at most 8% faster in attention (under
1% of a training step), and each shape it meets costs it a compile of seconds (H100, LoRA 1 x 8192: 4.3 s steps
among 0.47 s ones; benchmarks/results/train_h100.md). With the collator's `cu_seq_lens_q` / `max_length_q` (TRL's padding-free
collator passes them) no layer synchronises with the host.

Masks. The mask function returns `None` for plain causal attention (bottom-right aligned when a KV
cache makes S > T) and for padding-free packed rows, whose sequence boundaries the attention derives
from `position_ids` (restarting at 0) or `cu_seq_lens_q`; otherwise (padding, an active sliding window)
it returns transformers' dense boolean mask. No backend ever lets a packed sequence see another.

Observability: every call counts its backend in `BACKEND_COUNTS`; the first use of each
(backend, reason) pair is logged at INFO, and `last_backend()` names the latest.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import logging
import os
from collections import Counter

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from so8t_hf.integrations.flash_backends import (
    FLASH_BUILDS,
    flash_build_status,
    isolated_autograd,
    import_functions,
    reset_probes,
    wrap_functions,
)
from so8t_hf.ops.chunked_attention import chunked_attention

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "so8t"
BACKENDS = ("flash_attn", "flash_attn_3", "flash_attn_4", "torch_varlen", "triton", "sdpa", "chunked", "eager")
TORCH_VARLEN_MAX_MEAN_LEN = 1024  # auto: packs of shorter sequences (on average) take torch_varlen, longer ones ours

BACKEND_COUNTS: Counter = Counter()
_announced: set[tuple[str, str]] = set()
_last: list[str] = []
_forced: list[str] = []
_builds_reported: list = []


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
    """flash-attn 2 imports and ran a tiny packed call on this GPU (not merely a `flash_attn` namespace)."""
    return torch.cuda.is_available() and flash_build_status("flash_attn")[0]


@functools.cache
def _torch_varlen_attn():
    """PyTorch's `varlen_attn` and the names of its parameters, or None (PyTorch < 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen_available() -> bool:
    return _torch_varlen_attn() is not None and torch.cuda.is_available()


def triton_kernel_available() -> bool:
    try:
        from so8t_hf.ops import triton_available
    except ImportError:
        return False
    return triton_available()


def _backend_unavailable_reason(name: str, query: torch.Tensor) -> str | None:
    half = query.dtype in (torch.float16, torch.bfloat16)
    if name in FLASH_BUILDS:
        usable, why = flash_build_status(name)
        if not usable:
            return why if name != "flash_attn" else f"{why} (pip install 'so8t-hf[flash]')"
        if not (query.is_cuda and half):
            return f"{FLASH_BUILDS[name][1]} needs CUDA fp16/bf16 tensors"
    if name == "triton" and not triton_kernel_available():
        return "the Triton kernel needs triton and a CUDA GPU (or TRITON_INTERPRET=1)"
    if name == "torch_varlen":
        if _torch_varlen_attn() is None:
            return "this PyTorch has no torch.nn.attention.varlen.varlen_attn (PyTorch >= 2.10)"
        if not (query.is_cuda and half):
            return "varlen_attn needs CUDA fp16/bf16 tensors"
    return None


def choose_backend(requested: str, query: torch.Tensor, has_mask: bool, packed: bool, dropout: float,
                   mean_len: float | None = None):
    """(backend, reason) for one call. A forced backend that cannot run raises; `auto` never does.
    `mean_len`: the mean sequence length of a packed batch, when known."""
    _check_backend_name(requested)
    if requested != "auto":
        reason = _backend_unavailable_reason(requested, query)
        if reason:
            raise RuntimeError(f"so8t attention backend {requested!r} cannot run: {reason}.")
        if dropout and requested not in ("sdpa", "eager"):
            raise ValueError(f"so8t attention backend {requested!r} has no dropout; use sdpa or eager for dropout>0.")
        return requested, "requested"
    if not _builds_reported:  # once per process: which FlashAttention builds auto may use, and why (logged)
        _builds_reported.append([flash_build_status(name) for name in FLASH_BUILDS])
    if dropout:
        return "sdpa", "attention dropout > 0"
    fast_kernels = not has_mask and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
    if fast_kernels and flash_attn_available():
        return "flash_attn", "flash-attn 2 usable (a tiny call ran)"
    # Dense causal batches keep SDPA: measured on an H100 (benchmarks/results/attention_h100.md) SDPA's default
    # runs at cuDNN speed, 1.3x ours fwd+bwd at D96. Packed rows take the kernel: 3.75x padded SDPA's tokens/s.
    if fast_kernels and packed:
        choice = packed_gpu_choice(mean_len, _torch_varlen_attn() is not None, triton_kernel_available())
        if choice is not None:
            return choice
    if packed and not query.is_cuda:  # measured: benchmarks/results/attention_cpu.md
        return "chunked", "packed rows on CPU: exact, no T x T mask"
    if packed:
        return "sdpa", "packed rows without a varlen kernel: block-diagonal mask"
    return "sdpa", "padding / window mask" if has_mask else "default"


def packed_gpu_choice(mean_len: float | None, torch_varlen: bool, triton: bool):
    """(backend, reason) for packed fp16/bf16 CUDA rows, or None: PyTorch's varlen_attn for packs of short
    sequences (mean length <= TORCH_VARLEN_MAX_MEAN_LEN, or unknown), our kernel for longer ones."""
    if torch_varlen and (mean_len is None or mean_len <= TORCH_VARLEN_MAX_MEAN_LEN or not triton):
        return "torch_varlen", f"packed rows, mean length <= {TORCH_VARLEN_MAX_MEAN_LEN} or no triton: varlen_attn"
    if triton:
        return "triton", "packed rows, long sequences: varlen kernel"
    return None


_MEASURED: dict[tuple, tuple[str, str]] = {}


def reset_backend_choices() -> None:
    """Forget the probed FlashAttention builds and the measured per-shape choices (tests with fake builds)."""
    reset_probes()
    _builds_reported.clear()
    _MEASURED.clear()


def measured_packed_choice(default: str, query, key, mean_len: float | None):
    """(backend, reason) for packed CUDA rows when flash-attn 3 / 4 is usable: `default` and each usable build are
    timed once per pack shape (tokens rounded up and mean length rounded to powers of 2, heads, kv heads, head dim,
    dtype), forward + backward on random rows of that shape, and the fastest is kept. Without them, or while a CUDA
    graph is being captured (no timing there): (default, None)."""
    if not query.is_cuda or torch.cuda.is_current_stream_capturing():
        return default, None
    extra = [b for b in ("flash_attn_3", "flash_attn_4") if flash_build_status(b)[0]]
    if not extra:
        return default, None
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
    tokens = 2 ** math.ceil(math.log2(max(2, query.shape[2])))  # packs of one token budget share one measurement
    seq = 2 ** round(math.log2(max(2.0, min(mean_len or tokens, tokens))))
    key_ = (tokens, heads, kv_heads, dim, query.dtype, seq, default)
    if key_ not in _MEASURED:
        lengths = [seq] * (tokens // seq) + ([tokens % seq] if tokens % seq else [])
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=query.device)
        varlen = (cu, max(lengths))
        times = {}
        with isolated_autograd():  # inside a checkpointed layer the checkpoint's hooks would capture these
            q = torch.randn(1, heads, tokens, dim, device=query.device, dtype=query.dtype, requires_grad=True)
            k, v = (torch.randn(1, kv_heads, tokens, dim, device=query.device, dtype=query.dtype, requires_grad=True)
                    for _ in range(2))
            for name in [default, *extra]:
                try:
                    times[name] = _time_fwd_bwd(_BACKEND_FORWARD[name], q, k, v, dim**-0.5, varlen)
                except Exception as err:  # a build that passed the probe but fails at this shape is not chosen
                    logger.warning("so8t attention: %s failed at %d tokens x %d heads (%s); not chosen", name, tokens,
                                   heads, err)
        best = min(times, key=times.get) if times else default
        timing = ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(times.items(), key=lambda kv: kv[1]))
        _MEASURED[key_] = (best, f"packed rows, measured fwd+bwd at {tokens} tokens, mean length ~{seq}: {timing}")
    return _MEASURED[key_]


def _time_fwd_bwd(forward, q, k, v, scale, varlen, reps: int = 3) -> float:
    """Median ms of one forward + backward of a backend over the given packed rows (after one warm-up)."""
    times = []
    for i in range(reps + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = forward(q, k, v, scale, None, None, 0.0, varlen)
        out.float().sum().backward()
        end.record()
        end.synchronize()
        if i:
            times.append(start.elapsed_time(end))
    q.grad = k.grad = v.grad = None
    return sorted(times)[len(times) // 2]


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
        starts = torch.zeros(q_len + 1, dtype=torch.int32, device=cu_seq_lens.device)  # + 1: zero-length tails
        starts[cu_seq_lens[1:-1].long()] = 1
        return starts[:q_len].cumsum(0)[None]
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
        if keep_mask is None and segments is None and varlen is None:
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


def _flash_build(name):
    def forward(q, k, v, scale, segments, keep_mask, dropout, varlen=None):
        funcs = import_functions(name)
        if isinstance(funcs, str):
            raise RuntimeError(funcs)
        return _flash_like(*wrap_functions(*funcs), name)(q, k, v, scale, segments, keep_mask, dropout, varlen)

    return forward


def _torch_varlen_funcs():
    """(dense, varlen) callables in flash-attn's conventions over PyTorch's `varlen_attn` (causal only)."""
    varlen_attn, params = _torch_varlen_attn()

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=True):
        assert causal
        kwargs = {"scale": softmax_scale}
        if "is_causal" in params:
            kwargs["is_causal"] = True
        else:
            kwargs["window_size"] = (-1, 0)
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                kwargs["enable_gqa"] = True
            else:
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), **kwargs)

    def dense(q, k, v, softmax_scale=None, causal=True):
        bsz, t = q.shape[:2]
        cu = torch.arange(0, (bsz + 1) * t, t, device=q.device, dtype=torch.int32)
        flat = lambda x: x.reshape(bsz * x.shape[1], *x.shape[2:])  # noqa: E731
        return varlen(flat(q), flat(k), flat(v), cu, cu, t, t, softmax_scale, causal).view(q.shape)

    return dense, varlen


def _torch_varlen(q, k, v, scale, segments, keep_mask, dropout, varlen=None):
    if q.shape[2] != k.shape[2] and keep_mask is None and segments is None:
        raise ValueError("the torch_varlen backend needs as many keys as queries (no KV cache); use sdpa")
    return _flash_like(*_torch_varlen_funcs(), "torch_varlen")(q, k, v, scale, segments, keep_mask, dropout, varlen)


_BACKEND_FORWARD = {"flash_attn": _flash_attn, "flash_attn_3": _flash_build("flash_attn_3"),
                    "flash_attn_4": _flash_build("flash_attn_4"), "torch_varlen": _torch_varlen, "triton": _triton, "sdpa": _sdpa,
                    "chunked": _chunked, "eager": _eager}
_VARLEN_BACKENDS = ("flash_attn", "flash_attn_3", "flash_attn_4", "torch_varlen", "triton")  # take (cu_seqlens, max_len) instead of segment ids


def so8t_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """AttentionInterface entry: query (B, H, T, D), key/value (B, Hkv, S, D) -> ((B, T, H, D), None)."""
    bsz, _, q_len, dim = query.shape
    kv_len = key.shape[2]
    keep_mask = _as_keep_mask(attention_mask) if attention_mask is not None else None
    if keep_mask is not None and keep_mask.shape[-1] != kv_len:
        keep_mask = keep_mask[..., :kv_len]
    segments = varlen = mean_len = None
    packed = False
    cu = kwargs.get("cu_seq_lens_q")
    if keep_mask is None and cu is not None and kwargs.get("max_length_q") is not None and bsz == 1 and q_len == kv_len:
        # the collator's sequence starts: packed or not, and the mean length, from the shape alone (no sync)
        packed = q_len >= 2 and cu.numel() > 2
        if packed:
            varlen = (cu.to(query.device, torch.int32), int(kwargs["max_length_q"]))
            mean_len = q_len / (cu.numel() - 1)
    elif keep_mask is None:
        segments = packed_segments(kwargs.get("position_ids"), cu, bsz, q_len, kv_len)
        packed = segments is not None
    config = getattr(module, "config", None)
    requested = _forced[-1] if _forced else os.environ.get("SO8T_ATTN_BACKEND") or getattr(config, "so8t_attn_backend", "auto")
    backend, reason = choose_backend(requested, query, keep_mask is not None, packed, dropout, mean_len)
    if requested == "auto" and packed and backend == "triton":  # long sequences (see the module docstring)
        backend, measured = measured_packed_choice(backend, query, key, mean_len)
        reason = measured or reason
    _record(backend, reason)
    if packed and segments is None and backend not in _VARLEN_BACKENDS:
        segments = packed_segments(None, cu, bsz, q_len, kv_len)
    scale = scaling if scaling is not None else dim**-0.5
    out = _BACKEND_FORWARD[backend](query, key, value, scale, segments, keep_mask, dropout, varlen)
    return out.contiguous(), None


def register() -> None:
    """Register `attn_implementation="so8t"` (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, so8t_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, so8t_mask)


register()
