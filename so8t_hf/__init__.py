"""so8t_hf: fine-tune Phi-3 / Phi-3.5-mini with SO(8) attention rotations on the Hugging Face Trainer.

`import so8t_hf` turns on the fast paths for every SO8T-Phi3 model in the process, remote-code ones
included (as `liger_kernel.transformers.apply_liger_kernel` does for stock models): it registers
`attn_implementation="so8t"` with transformers and the Triton SO(8) rotation as the `torch.library`
op `so8t::so8_rotate`, which the model looks up. Everything else loads lazily on first use.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from so8t_hf import integrations  # noqa: F401  (registers the attention, the mask function and the rotation op)

__version__ = "0.2.0"

_import_structure: dict[str, list[str]] = {
    "integrations.attention": ["BACKEND_COUNTS", "force_attention_backend", "last_backend"],
    "modeling": ["So8Rotation", "So8tPhi3Config", "So8tPhi3ForCausalLM"],
    "rotation": ["merge_so8t_rotations", "rotation_health", "so8_rotations"],
    "training": ["LossHasNoGraphError", "SO8TConfig", "SO8TTrainer", "default_lora_config"],
    "thinking": ["extract_final", "parse_thinking", "render_thinking", "thinking_hash"],
}

if TYPE_CHECKING:
    from so8t_hf.integrations.attention import (
        BACKEND_COUNTS,
        force_attention_backend,
        last_backend,
    )
    from so8t_hf.modeling import So8Rotation, So8tPhi3Config, So8tPhi3ForCausalLM
    from so8t_hf.rotation import merge_so8t_rotations, rotation_health, so8_rotations
    from so8t_hf.thinking import (
        extract_final,
        parse_thinking,
        render_thinking,
        thinking_hash,
    )
    from so8t_hf.training import (
        LossHasNoGraphError,
        SO8TConfig,
        SO8TTrainer,
        default_lora_config,
    )

_NAME_TO_MODULE = {name: module for module, names in _import_structure.items() for name in names}
__all__ = [  # the names of _import_structure (tests/test_package.py checks they agree)
    "BACKEND_COUNTS", "LossHasNoGraphError", "SO8TConfig", "SO8TTrainer", "So8Rotation", "So8tPhi3Config",
    "So8tPhi3ForCausalLM", "default_lora_config", "extract_final", "force_attention_backend", "last_backend",
    "merge_so8t_rotations", "parse_thinking", "render_thinking", "rotation_health", "so8_rotations", "thinking_hash",
]


def __getattr__(name: str):
    if name in _NAME_TO_MODULE:
        value = getattr(importlib.import_module(f"so8t_hf.{_NAME_TO_MODULE[name]}"), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'so8t_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


logging.getLogger(__name__).addHandler(logging.NullHandler())
