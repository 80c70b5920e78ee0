"""SO8T-Phi3 model code: the two self-contained remote-code files (torch + transformers only) that
`save_pretrained` copies into every checkpoint, beside `auto_map` in its config."""

from so8t_hf.modeling.configuration_so8t_phi3 import (
           SO8_BLOCK,
           SO8T_ATTN_BACKENDS,
           So8tPhi3Config,
)
from so8t_hf.modeling.modeling_so8t_phi3 import (
           So8Rotation,
           So8tPhi3Attention,
           So8tPhi3ForCausalLM,
           So8tPhi3Model,
)

__all__ = ["SO8T_ATTN_BACKENDS", "SO8_BLOCK", "So8Rotation", "So8tPhi3Attention", "So8tPhi3Config",
           "So8tPhi3ForCausalLM", "So8tPhi3Model"]
