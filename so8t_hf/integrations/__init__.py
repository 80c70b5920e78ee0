"""Registration of the project's fast paths with transformers and torch (run by `import so8t_hf`).

- `attention`: `attn_implementation="so8t"` (AttentionInterface + AttentionMaskInterface) and its per-call
  backend choice.
- `rotation_op`: the Triton SO(8) rotation as the `torch.library` op `so8t::so8_rotate`, which SO8T-Phi3
  models (remote code included) use when it is registered.
- `qkv_rope_op`: the q / k / v split with RoPE as the op `so8t::qkv_rope` (Triton on CUDA, one pass each way),
  which SO8T-Phi3 attention uses with `fused_qkv_rope` on and no KV cache.
- `auto`: `AutoConfig` / `AutoModelForCausalLM` know `model_type="so8t_phi3"` without remote code.
- `vllm_reasoning`: a vLLM reasoning-parser plugin (`--reasoning-parser-plugin`), loaded by vLLM, not on import.
"""

from so8t_hf.integrations import attention, auto, qkv_rope_op, rotation_op  # noqa: F401  (each registers on import)
