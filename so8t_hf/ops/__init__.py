"""Kernels of so8t_hf and their pure-torch references. Imports only torch and (optionally) triton.

``flash_attn_func`` / ``flash_attn_varlen_func`` follow the flash-attn package's calling
conventions and run the Triton kernel of ``flash_attention.py``; ``so8_rotate`` is the SO(8)
output rotation of ``so8_rotation.py``. They raise a RuntimeError when triton is missing.
``triton_available()`` says whether they can run here: triton imports and a CUDA GPU is present,
or TRITON_INTERPRET=1 (the CPU interpreter, for tests).
"""

from __future__ import annotations

import importlib
import os

import torch

from .reference import (
    attention_reference,
    so8_rotate_reference,
    varlen_attention_reference,
)

__all__ = [
    "attention_reference",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "so8_rotate",
    "so8_rotate_reference",
    "triton_available",
    "varlen_attention_reference",
]


def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install failing on import
        return False
    return True


def triton_available() -> bool:
    """True if the Triton kernels can run: triton imports and (CUDA is present or TRITON_INTERPRET=1)."""
    if not _triton_importable():
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels(module: str = ".flash_attention"):
    # imported lazily: `import so8t_hf.ops` must work without triton, and the interpreter mode
    # (TRITON_INTERPRET) is fixed when the kernels are first defined
    if not _triton_importable():
        raise RuntimeError(
            "so8t_hf's Triton kernels need the `triton` package (pip install 'so8t-hf[triton]' or "
            "pip install triton); use attn backend 'sdpa' otherwise"
        )
    return importlib.import_module(module, __name__)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """Triton flash attention on q (B, T, H, D), k/v (B, S, Hkv, D); returns (B, T, H, D).
    Same arguments as ``flash_attn.flash_attn_func`` (dropout_p must be 0)."""
    return _kernels().flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal)


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False
):
    """Triton flash attention on packed q (total_q, H, D), k/v (total_k, Hkv, D) with int32
    cu_seqlens (n+1,). Same arguments as ``flash_attn.flash_attn_varlen_func`` (dropout_p = 0)."""
    return _kernels().flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
    )


def so8_rotate(x, rotation):
    """Triton block-diagonal SO(8) rotation: x (..., n*8), rotation (n, 8, 8) -> x_b @ R_b per block,
    differentiable in both. Same result as ``so8_rotate_reference`` (torch's einsum) in one memory pass."""
    return _kernels(".so8_rotation").so8_rotate(x, rotation)
