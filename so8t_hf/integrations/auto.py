"""`AutoConfig` / `AutoModelForCausalLM` resolve `model_type="so8t_phi3"` to the library's classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from so8t_hf.modeling import So8tPhi3Config, So8tPhi3ForCausalLM

AutoConfig.register(So8tPhi3Config.model_type, So8tPhi3Config, exist_ok=True)
AutoModelForCausalLM.register(So8tPhi3Config, So8tPhi3ForCausalLM, exist_ok=True)
