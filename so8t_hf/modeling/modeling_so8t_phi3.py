"""SO8T-Phi3: Phi-3 with a learned block-diagonal SO(8) rotation of the attention output.

Each chosen decoder layer rotates the concatenated head outputs before `o_proj`: every 8-wide block
`x_b` becomes `x_b @ R_b` with `R_b = matrix_exp(theta_b - theta_b^T)`, exactly orthogonal with det +1
for any generator `theta_b`. Generators start at zero (R = I), so a stock Phi-3 checkpoint loads with
identical logits. Merging (`W_o' = W_o @ blockdiag(R)^T`) gives back a plain Phi-3.

Self-contained remote code: torch and transformers only, never the `so8t_hf` library. When the library is
imported in the process it registers its fast paths: `attn_implementation="so8t"` (attention backends) and
the `torch.library` op `so8t::so8_rotate` (the Triton rotation kernel), which `So8Rotation` uses when it is
registered; without it the rotation runs as torch's einsum and attention on any stock implementation.

Training forwards compute every layer's R once, in `So8tPhi3Model.forward` (outside the checkpointed layers, so the
recompute of gradient checkpointing reuses it), through the op `so8t::so8_exp` when so8t_hf registered it (a fp32
GPU kernel, one launch for all layers), else float64 `torch.linalg.matrix_exp` (one batched call). The rotations
travel to the layers as the forward keyword `so8t_rotations` ({So8Rotation module: R}). RoPE is looked up on
transformers' phi3 module at call time, so kernels patched there (Liger's `apply_liger_kernel_to_phi3`) apply; with
`fused_qkv_rope` set on the attention layers, calls without a KV cache instead take q, k, v from the op
`so8t::qkv_rope` when so8t_hf registered it (one pass that splits `qkv_proj`'s output and applies the same RoPE, and
one for its gradient).
"""

import logging

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.phi3 import modeling_phi3
from transformers.models.phi3.modeling_phi3 import (
    Phi3Attention,
    Phi3DecoderLayer,
    Phi3ForCausalLM,
    Phi3Model,
    Phi3PreTrainedModel,
    Phi3RMSNorm,
    Phi3RotaryEmbedding,
    eager_attention_forward,
)

from .configuration_so8t_phi3 import SO8_BLOCK, So8tPhi3Config

try:  # transformers' init helpers respect the "already loaded" flags of from_pretrained
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older transformers
    from torch.nn import init

logger = logging.getLogger(__name__)


def _registered_op(name: str):
    """`torch.ops.so8t.<name>` when so8t_hf has registered it in this process, else None."""
    try:
        return getattr(torch.ops.so8t, name)
    except (AttributeError, RuntimeError):
        return None


def _registered_rotation_op():
    return _registered_op("so8_rotate")


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """A DTensor (FSDP2's sharded parameter, outside its module's forward)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def so8_exp(theta: torch.Tensor) -> torch.Tensor:
    """R = exp(theta - theta^T) for generators (..., 8, 8): the registered fp32 kernel op, else float64 matrix_exp."""
    op = _registered_op("so8_exp")
    if op is not None:
        return op(theta)
    theta = theta.double()
    return torch.linalg.matrix_exp(theta - theta.transpose(-1, -2))


class So8Rotation(nn.Module):
    """Block-diagonal SO(8) rotation of the last dimension: (..., n*8) -> (..., n*8).

    `theta` (n, 8, 8) holds unconstrained generators; the rotation is `matrix_exp(theta - theta^T)`, computed in
    float64 here (or, in training forwards, for all layers at once by `So8tPhi3Model.step_rotations`) and cast to the
    activation dtype.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % SO8_BLOCK:
            raise ValueError(f"So8Rotation needs a dimension divisible by {SO8_BLOCK}, got {dim}.")
        self.theta = nn.Parameter(torch.zeros(dim // SO8_BLOCK, SO8_BLOCK, SO8_BLOCK))
        self._cached: tuple | None = None  # (theta copy, dtype, R) for no-grad forwards (generation)

    def rotation_matrices(self) -> torch.Tensor:
        """R = exp(A), A = theta - theta^T: (n, 8, 8) in float64 (tiny; keeps R orthogonal to ~1e-15)."""
        theta = self.theta.double()
        return torch.linalg.matrix_exp(theta - theta.transpose(-1, -2))

    def _rotation(self, dtype: torch.dtype) -> torch.Tensor:
        """R in `dtype`. Without autograd (generation, evaluation) it is computed once per *value* of theta:
        the cache compares values, since in-place optimizer steps (fused AdamW) need not bump `_version`."""
        if torch.is_grad_enabled() and self.theta.requires_grad:
            return self.rotation_matrices().to(dtype)
        theta = self.theta.detach()
        cached = self._cached
        if cached is None or cached[1] != dtype or cached[0].device != theta.device or not torch.equal(cached[0], theta):
            cached = self._cached = (theta.clone(), dtype, self.rotation_matrices().detach().to(dtype))
        return cached[2]

    def forward(self, x: torch.Tensor, rotations: dict | None = None) -> torch.Tensor:
        """x_b @ R_b per 8-wide block; `rotations` ({module: R}, from `So8tPhi3Model.forward`) supplies this
        module's R when it was computed for the whole step, else it is computed here."""
        rotation = rotations.get(self) if rotations else None
        rotation = self._rotation(x.dtype) if rotation is None else rotation.to(x.dtype)  # (n, 8, 8)
        fast = _registered_rotation_op()
        if fast is not None:
            return fast(x, rotation)
        blocks = x.unflatten(-1, (-1, SO8_BLOCK))  # (..., n*8) -> (..., n, 8)
        return torch.einsum("...ni,nij->...nj", blocks, rotation).flatten(-2)  # x_b @ R_b

    @torch.no_grad()
    def orthogonality_error(self) -> float:
        """max |R^T R - I| over all blocks of R as applied in float32 (health metric; ~1e-7 for any theta)."""
        r = self.rotation_matrices().float().double()
        eye = torch.eye(SO8_BLOCK, device=r.device, dtype=r.dtype)
        return (r.transpose(-1, -2) @ r - eye).abs().max().item()

    @torch.no_grad()
    def angle_norm(self) -> float:
        """Frobenius norm of the skew generators A = theta - theta^T (0 at identity)."""
        theta = self.theta.float()
        return torch.linalg.norm(theta - theta.transpose(-1, -2)).item()

    def extra_repr(self) -> str:
        return f"blocks={self.theta.shape[0]}, block={SO8_BLOCK}"


class So8tPhi3Attention(Phi3Attention):
    """Phi-3 attention whose concatenated head outputs are SO(8)-rotated before `o_proj`.

    `fused_qkv_rope` (default False; `SO8TConfig.fused_qkv_rope`, `auto` on CUDA runs, sets it): without a KV cache, split
    `qkv_proj`'s output and apply RoPE through the op `so8t::qkv_rope` when so8t_hf registered it; False keeps
    transformers' slicing and RoPE."""

    fused_qkv_rope = False

    def __init__(self, config: So8tPhi3Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.so8_rotation = So8Rotation(config.num_attention_heads * self.head_dim)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, cache=None,
                so8t_rotations=None, **kwargs):
        cache = cache if cache is not None else past_key_values  # transformers >= 5.24 passes `cache`, older ones `past_key_values`
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        qkv = self.qkv_proj(hidden_states)
        cos, sin = position_embeddings
        fused = _registered_op("qkv_rope") if cache is None and self.fused_qkv_rope else None
        if fused is not None:  # so8t_hf's one-pass split + RoPE: contiguous (B, T, H, D) q, k, v
            q, k, v = fused(qkv, cos, sin, self.config.num_attention_heads, self.num_key_value_heads, self.head_dim)
            query_states, key_states, value_states = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        else:
            query_pos = self.config.num_attention_heads * self.head_dim
            kv_size = self.num_key_value_heads * self.head_dim
            query_states = qkv[..., :query_pos].view(hidden_shape).transpose(1, 2)  # (B, H, T, D)
            key_states = qkv[..., query_pos : query_pos + kv_size].view(hidden_shape).transpose(1, 2)  # (B, Hkv, T, D)
            value_states = qkv[..., query_pos + kv_size :].view(hidden_shape).transpose(1, 2)
            # looked up at call time: kernels patched into transformers' phi3 module (Liger's RoPE) apply here too
            query_states, key_states = modeling_phi3.apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=getattr(self.config, "sliding_window", None),
            **kwargs,
        )  # (B, T, H, D)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, T, H*D)
        attn_output = self.o_proj(self.so8_rotation(attn_output, rotations=so8t_rotations))
        return attn_output, attn_weights


class So8tPhi3DecoderLayer(Phi3DecoderLayer):
    def __init__(self, config: So8tPhi3Config, layer_idx: int):
        super().__init__(config, layer_idx)
        if layer_idx in config.so8t_layer_indices():
            self.self_attn = So8tPhi3Attention(config, layer_idx)


class So8tPhi3PreTrainedModel(Phi3PreTrainedModel):
    config_class = So8tPhi3Config
    config: So8tPhi3Config
    _no_split_modules = ["So8tPhi3DecoderLayer"]
    _keys_to_ignore_on_load_missing = [r"so8_rotation\.theta"]
    _keep_in_fp32_modules_strict = ["so8_rotation"]  # generators stay fp32 under bf16 / fp16 / k-bit loading

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, So8Rotation):
            init.zeros_(module.theta)  # identity rotation: a pretrained Phi-3 keeps its logits

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        new = sorted(k for k in loading_info.missing_keys if "so8_rotation" in k)
        super()._adjust_missing_and_unexpected_keys(loading_info)
        if new:
            layers = [k.split(".layers.")[1].split(".")[0] for k in new]
            logger.info(
                "SO8T: %d new SO(8) rotation generators (%s, layers %s) initialised to identity.",
                len(new),
                new[0].split(".layers.")[1].split(".", 1)[1],
                ", ".join(layers),
            )


class So8tPhi3Model(So8tPhi3PreTrainedModel, Phi3Model):
    def __init__(self, config: So8tPhi3Config):
        super(Phi3Model, self).__init__(config)  # PreTrainedModel init; Phi3Model's would build stock layers
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [So8tPhi3DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Phi3RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.so8t_step_rotations = True  # compute every layer's R once per training forward (see the module docstring)
        self.post_init()

    def forward(self, *args, **kwargs):
        if (self.so8t_step_rotations and self.training and torch.is_grad_enabled() and "so8t_rotations" not in kwargs
                and not self._reentrant_checkpointing()):
            rotations = self.step_rotations()
            if rotations:
                kwargs["so8t_rotations"] = rotations
        return super().forward(*args, **kwargs)

    def _reentrant_checkpointing(self) -> bool:
        """Reentrant checkpointing backpropagates each layer on its own, which would run a shared R's graph once per
        layer: the rotations are then computed per layer, as without the step rotations."""
        for layer in self.layers:
            if getattr(layer, "gradient_checkpointing", False):
                return getattr(layer._gradient_checkpointing_func, "keywords", {}).get("use_reentrant", True)
        return False

    def step_rotations(self) -> dict:
        """{So8Rotation module: R} for every rotation in the layers (PEFT copies too), R in the compute dtype:
        one batched exponential per device, differentiable in theta."""
        modules = [
            m for layer in self.layers if isinstance(layer.self_attn, So8tPhi3Attention)
            for m in layer.self_attn.so8_rotation.modules() if isinstance(m, So8Rotation)
        ]
        trainable = [m for m in modules if m.theta.requires_grad]
        modules = trainable or modules  # PEFT keeps a frozen, unused original beside each trainable copy
        if not modules or any(_is_dtensor(m.theta) for m in modules):
            return {}  # FSDP2 shards the generators outside their layer's forward: each layer computes its own R
        dtype = self.embed_tokens.weight.dtype
        if torch.is_autocast_enabled(modules[0].theta.device.type):
            dtype = torch.get_autocast_dtype(modules[0].theta.device.type)
        out = {}
        for device in {m.theta.device for m in modules}:
            group = [m for m in modules if m.theta.device == device]
            rotations = so8_exp(torch.cat([m.theta for m in group])).to(dtype)  # (sum n, 8, 8)
            out.update(zip(group, rotations.split([m.theta.shape[0] for m in group])))
        return out


class So8tPhi3ForCausalLM(So8tPhi3PreTrainedModel, Phi3ForCausalLM):
    r"""Phi-3 causal LM whose chosen layers rotate their attention output with a learned SO(8) block rotation.

    Same weights as `Phi3ForCausalLM` plus one `so8_rotation.theta` (hidden_size/8, 8, 8) per SO8T layer; a stock
    Phi-3 checkpoint loads with identity rotations and identical logits.

    Args:
        config (`So8tPhi3Config`): a Phi-3 config plus `so8t_layers` and `so8t_attn_backend`.

    Example:
        ```python
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained("path/to/so8t-checkpoint", trust_remote_code=True)
        # or, with the library: So8tPhi3ForCausalLM.from_pretrained("microsoft/Phi-3.5-mini-instruct", so8t_layers="all")
        rotations = model.so8_rotations()  # layer index -> So8Rotation
        ```
    """

    def __init__(self, config: So8tPhi3Config):
        super(Phi3ForCausalLM, self).__init__(config)  # skip Phi3ForCausalLM's init, which builds a stock Phi3Model
        self.model = So8tPhi3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def so8_rotations(self) -> dict[int, So8Rotation]:
        """Layer index -> its SO(8) rotation module."""
        return {
            i: layer.self_attn.so8_rotation
            for i, layer in enumerate(self.model.layers)
            if isinstance(layer.self_attn, So8tPhi3Attention)
        }


So8tPhi3Config.register_for_auto_class()
So8tPhi3ForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["So8Rotation", "So8tPhi3Attention", "So8tPhi3ForCausalLM", "So8tPhi3Model", "So8tPhi3PreTrainedModel"]
