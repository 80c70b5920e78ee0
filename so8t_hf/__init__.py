"""so8t_hf: fine-tune Phi-3 / Phi-3.5-mini with SO(8) attention rotations on the Hugging Face Trainer.

Importing the package registers `attn_implementation="so8t"` with transformers.
"""

import logging

from transformers import AutoConfig, AutoModelForCausalLM

from . import attention  # noqa: F401  (registers attn_implementation="so8t")
from .attention import BACKEND_COUNTS, force_attention_backend, last_backend
from .modeling.configuration_so8t_phi3 import So8tPhi3Config
from .modeling.modeling_so8t_phi3 import So8Rotation, So8tPhi3ForCausalLM
from .rotation import merge_so8t_rotations, rotation_health, so8_rotations

__version__ = "0.1.0"

AutoConfig.register(So8tPhi3Config.model_type, So8tPhi3Config, exist_ok=True)
AutoModelForCausalLM.register(So8tPhi3Config, So8tPhi3ForCausalLM, exist_ok=True)

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {  # heavier imports (trl, peft) load on first use, so `import so8t_hf` stays light for remote code
    "SO8TConfig": "trainer",
    "SO8TTrainer": "trainer",
    "LossHasNoGraphError": "trainer",
    "default_lora_config": "peft_utils",
    "extract_final": "thinking",
    "thinking_hash": "thinking",
    "render_thinking": "thinking",
    "parse_thinking": "thinking",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'so8t_hf' has no attribute {name!r}")


__all__ = [*_LAZY, 
    "BACKEND_COUNTS",
    "So8Rotation",
    "So8tPhi3Config",
    "So8tPhi3ForCausalLM",
    "force_attention_backend",
    "last_backend",
    "merge_so8t_rotations",
    "rotation_health",
    "so8_rotations",
]
