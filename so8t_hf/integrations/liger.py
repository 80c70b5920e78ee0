"""Liger-Kernel for SO8T-Phi3: `use_liger_kernel=True` (transformers' Trainer, TRL) applies Liger's Phi-3 kernels.

Liger picks its patch function by `config.model_type`; `so8t_phi3` is not in its table, so the flag was a no-op
("no Liger kernels supported for model type"). SO8T-Phi3 shares Phi-3's RMSNorm, MLP (fused gate_up) and RoPE, so
`register_liger()` maps `so8t_phi3` to `apply_liger_kernel_to_phi3`: RMSNorm and SwiGLU are patched per module
instance, RoPE on transformers' phi3 module (which SO8T-Phi3's attention looks up at call time). The SO(8) rotation
and the attention are ours and untouched. Liger is optional (`pip install 'so8t-hf[liger]'`).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

MODEL_TYPE = "so8t_phi3"


def liger_unusable_reason() -> str | None:
    """Why Liger's kernels cannot run here (not installed, no CUDA GPU), or None."""
    import importlib.util

    import torch

    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'so8t-hf[liger]')"
    if not torch.cuda.is_available():
        return "Liger's Triton kernels need a CUDA GPU"
    return None


def register_liger() -> bool:
    """Add `so8t_phi3` to Liger's model-type table (idempotent). False, logged, when Liger is not installed."""
    try:
        from liger_kernel.transformers import monkey_patch
    except ImportError:
        logger.warning("use_liger_kernel: liger-kernel is not installed (pip install 'so8t-hf[liger]').")
        return False
    table = monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN
    if MODEL_TYPE not in table:
        table[MODEL_TYPE] = monkey_patch.apply_liger_kernel_to_phi3
        logger.info("Liger-Kernel: so8t_phi3 uses Liger's Phi-3 kernels (RMSNorm, SwiGLU, RoPE).")
    return True
