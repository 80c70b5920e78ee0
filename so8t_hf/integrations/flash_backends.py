"""Installed FlashAttention builds, detected by what they can do rather than by their package name.

Three builds share names and must not be confused:
- flash-attn 2 (`pip install flash-attn`): `flash_attn.flash_attn_func` / `flash_attn_varlen_func`.
- flash-attn 3 (the `hopper/` build): module `flash_attn_interface`, same two function names.
- flash-attn 4 (`pip install flash-attn-4`, CuTe DSL for Hopper / Blackwell): `flash_attn.cute.flash_attn_func` /
  `flash_attn_varlen_func` (`flash_attn.cute.interface`). It installs a `flash_attn` namespace *without*
  `flash_attn_func`, so `find_spec("flash_attn")` alone reports flash-attn 2 where there is none.

A build is offered to `auto` only if its two functions import **and** a tiny packed causal call (forward and backward,
bf16, head dim 96, GQA) runs on this device and matches a plain PyTorch reference. The probe runs once per process and
device (cached); its verdict and reason are logged once and reported by `so8t-hf env`. PyTorch's own flash registry
(`torch.nn.attention.list_flash_attention_impls` / `activate_flash_attention_impl("FA4")`, PyTorch >= 2.10) wraps
the same `flash_attn.cute` kernels and swaps them in process-wide; it is reported here, and `auto` calls the FA4
kernels directly instead (no global switch).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging

import torch

logger = logging.getLogger(__name__)

# backend name -> (module holding flash_attn_func / flash_attn_varlen_func, what it is, how to install it)
FLASH_BUILDS = {
    "flash_attn": ("flash_attn", "flash-attn 2", "pip install flash-attn"),
    "flash_attn_3": ("flash_attn_interface", "flash-attn 3 (hopper build)", "build flash-attention's hopper/ folder"),
    "flash_attn_4": ("flash_attn.cute", "flash-attn 4 (CuTe DSL)", "pip install flash-attn-4"),
}
PROBE_TOKENS, PROBE_HEADS, PROBE_KV_HEADS, PROBE_DIM = 48, 4, 2, 96


def _first(out):
    """flash-attn 3 / 4 return (out, lse) where flash-attn 2 returns out."""
    return out[0] if isinstance(out, (tuple, list)) else out


@functools.cache
def import_functions(name: str):
    """(flash_attn_func, flash_attn_varlen_func) of one build, or a string saying why they do not import."""
    module_name, what, install = FLASH_BUILDS[name]
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or a broken build raising anything while importing its extension
        return f"{what} is not installed or does not import ({type(err).__name__}: {err}; {install})"
    missing = [f for f in ("flash_attn_func", "flash_attn_varlen_func") if not callable(getattr(module, f, None))]
    if missing:
        return (f"{module_name} has no {' / '.join(missing)}: not {what} (flash-attn 4 installs a flash_attn "
                f"namespace with only flash_attn.cute)")
    return module.flash_attn_func, module.flash_attn_varlen_func


def wrap_functions(dense, varlen):
    """The build's functions in the conventions of `attention._flash_like`, returning the output tensor only."""

    def dense_call(q, k, v, softmax_scale=None, causal=True):
        return _first(dense(q, k, v, softmax_scale=softmax_scale, causal=causal))

    def varlen_call(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=True):
        return _first(varlen(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=int(max_q),
                             max_seqlen_k=int(max_k), softmax_scale=softmax_scale, causal=causal))

    return dense_call, varlen_call


def _reference(q, k, v, cu, scale):
    """Plain PyTorch causal attention per packed sequence, fp32: q (N, H, D), k/v (N, Hkv, D) -> (N, H, D)."""
    out = []
    groups = q.shape[1] // k.shape[1]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[s:e].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(out)


@contextlib.contextmanager
def isolated_autograd():
    """A forward + backward of its own, also where the first attention call runs: inside a checkpointed layer (the
    checkpoint's saved-tensor hooks would count the probe's tensors as the layer's and recompute the layer when the
    probe's backward reads them), under no_grad or under autocast."""
    with torch.enable_grad(), torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        yield


def probe_call(varlen_call, device, dtype=torch.bfloat16) -> str | None:
    """None if a tiny packed causal fwd+bwd through `varlen_call` runs on `device` and matches the reference,
    else the reason (the exception, a wrong shape, non-finite values or a wrong result)."""
    with isolated_autograd():
        return _probe_call(varlen_call, device, dtype)


def _probe_call(varlen_call, device, dtype) -> str | None:
    gen = torch.Generator().manual_seed(0)
    shape = lambda h: (PROBE_TOKENS, h, PROBE_DIM)  # noqa: E731
    scale = PROBE_DIM**-0.5
    try:
        q, k, v = (torch.randn(shape(h), generator=gen).to(device, dtype).requires_grad_()
                   for h in (PROBE_HEADS, PROBE_KV_HEADS, PROBE_KV_HEADS))
        cu = torch.tensor([0, 20, 29, PROBE_TOKENS], dtype=torch.int32, device=device)
        out = varlen_call(q, k, v, cu, cu, 20, 20, softmax_scale=scale, causal=True)
        if tuple(out.shape) != tuple(q.shape):
            return f"returned shape {tuple(out.shape)} for {tuple(q.shape)}"
        out.float().square().sum().backward()
    except Exception as err:
        return f"a tiny packed call raised {type(err).__name__}: {str(err)[:200]}"
    if any(t.grad is None for t in (q, k, v)):
        return "a tiny packed call gave no gradient for q, k or v"
    if not (torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))):
        return "a tiny packed call gave non-finite outputs or gradients"
    err = (out.float() - _reference(q.detach(), k.detach(), v.detach(), cu, scale)).abs().max().item()
    if err > 5e-2:
        return f"a tiny packed call is wrong (max error {err:.3g} against PyTorch)"
    return None


@functools.cache
def _probe(name: str, device: str) -> tuple[bool, str]:
    funcs = import_functions(name)
    what = FLASH_BUILDS[name][1]
    if isinstance(funcs, str):
        return False, funcs
    if not device.startswith("cuda"):
        return False, f"{what} imports but needs a CUDA GPU"
    reason = probe_call(wrap_functions(*funcs)[1], torch.device(device))
    if reason:
        return False, f"{what} imports, but {reason}"
    return True, f"{what}: a tiny packed bf16 fwd+bwd call ran and matched PyTorch on {device}"


def _current_device() -> str:
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def flash_build_status(name: str, device: str | None = None) -> tuple[bool, str]:
    """(usable, why) for one build on `device` (default: the current CUDA device, else the CPU); probed once."""
    device = device or _current_device()
    cached = _probe.cache_info().currsize
    usable, reason = _probe(name, device)
    if _probe.cache_info().currsize > cached:
        logger.info("so8t attention: %s %s (%s)", name, "usable" if usable else "not offered", reason)
    return usable, reason


def flash_build_usable(name: str, device: str | None = None) -> bool:
    return flash_build_status(name, device)[0]


def torch_flash_registry() -> str:
    """What PyTorch's flash-attention registry offers (PyTorch >= 2.10), for `so8t-hf env`."""
    try:
        from torch.nn.attention import current_flash_attention_impl, list_flash_attention_impls
    except ImportError:
        return "this PyTorch has no flash-attention registry (torch.nn.attention.activate_flash_attention_impl)"
    impls = list(list_flash_attention_impls())
    return (f"registered: {', '.join(impls) or 'none'}; active: {current_flash_attention_impl() or 'the built-in FA2'}; "
            "its FA3 / FA4 wrap flash_attn_interface / flash_attn.cute, which auto calls directly (flash_attn_3 / flash_attn_4)")


def reset_probes() -> None:
    """Forget the cached imports and probes (tests that install a fake build)."""
    import_functions.cache_clear()
    _probe.cache_clear()
