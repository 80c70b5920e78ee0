"""Configuration of SO8T-Phi3: a Phi-3 whose chosen decoder layers rotate their attention output
with a learned block-diagonal SO(8) rotation before `o_proj`.

Self-contained remote code (torch and transformers only): copied into every saved checkpoint.
"""

from huggingface_hub.dataclasses import strict
from transformers import Phi3Config

SO8T_ATTN_BACKENDS = ("auto", "flash_attn", "flash_attn_3", "flash_attn_4", "torch_varlen", "triton", "sdpa", "chunked", "eager")
SO8_BLOCK = 8


def normalize_so8t_layers(value):
    """The one grammar of `so8t_layers`: "all" (also `["all"]`) or a list of layer indices (ints, or strings of
    ints as command-line flags give them). Returns "all" or a list of ints; anything else raises."""
    if isinstance(value, (list, tuple)) and len(value) == 1 and value[0] == "all":
        return "all"
    if value == "all":
        return value
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            if isinstance(item, str) and item.strip().lstrip("-").isdigit():
                item = int(item)
            if isinstance(item, bool) or not isinstance(item, int):
                break
            out.append(item)
        else:
            return out
    raise ValueError(
        f"so8t_layers={value!r}: give \"all\" or a list of layer indices (YAML: [0, 1]; flags: --so8t_layers 0 1)."
    )


@strict
class So8tPhi3Config(Phi3Config):
    r"""Configuration of SO8T-Phi3: every `Phi3Config` field, plus the SO8T fields below. A stock Phi-3
    `config.json` (`model_type="phi3"`) loads as an SO8T-Phi3 config with the defaults.

    Args:
        so8t_layers (`list[int]` or `"all"`, defaults to `"all"`):
            Indices of the decoder layers whose attention output is rotated by a learned SO(8) block rotation.
            Negative indices count from the end.
        so8t_attn_backend (`str`, defaults to `"auto"`):
            Backend of `attn_implementation="so8t"`: one of `auto`, `flash_attn` (flash-attn 2), `flash_attn_3`,
            `flash_attn_4` (CuTe DSL), `torch_varlen`, `triton`,
            `sdpa`, `chunked`, `eager`.

    Example:
        ```python
        config = So8tPhi3Config.from_pretrained("microsoft/Phi-3.5-mini-instruct", so8t_layers=[0, 8, 16, 24])
        ```
    """

    model_type = "so8t_phi3"

    so8t_layers: list[int] | str = "all"
    so8t_attn_backend: str = "auto"

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        """A stock Phi-3 config is a valid base: read `model_type="phi3"` as SO8T-Phi3 (identity rotations)."""
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == "phi3":
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    def validate_so8t(self):
        """Fail early, naming the field, on settings the SO(8) rotation cannot honour."""
        head_dim = getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads
        if self.hidden_size % SO8_BLOCK:
            raise ValueError(
                f"So8tPhi3Config.hidden_size={self.hidden_size} is not divisible by {SO8_BLOCK}: "
                "the SO(8) rotation acts on 8-wide blocks; choose a multiple of 8."
            )
        if head_dim % SO8_BLOCK:
            raise ValueError(
                f"So8tPhi3Config head dim (hidden_size / num_attention_heads = {head_dim}) is not divisible by "
                f"{SO8_BLOCK}: SO(8) blocks must not straddle heads; change num_attention_heads or hidden_size."
            )
        if self.so8t_attn_backend not in SO8T_ATTN_BACKENDS:
            raise ValueError(
                f"So8tPhi3Config.so8t_attn_backend={self.so8t_attn_backend!r} is unknown; "
                f"choose one of {', '.join(SO8T_ATTN_BACKENDS)}."
            )
        self.so8t_layer_indices()  # raises on a bad so8t_layers

    def so8t_layer_indices(self) -> list[int]:
        """The sorted, non-negative indices of the SO8T layers."""
        n = self.num_hidden_layers
        try:
            layers = normalize_so8t_layers(self.so8t_layers)
        except ValueError as err:
            raise ValueError(f"So8tPhi3Config.{err}") from None
        if layers == "all":
            return list(range(n))
        indices = set()
        for index in layers:
            if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
                raise ValueError(
                    f"So8tPhi3Config.so8t_layers contains {index!r}, out of range for num_hidden_layers={n} "
                    f"(valid: {-n}..{n - 1})."
                )
            indices.add(index % n)
        return sorted(indices)


__all__ = ["SO8T_ATTN_BACKENDS", "SO8_BLOCK", "So8tPhi3Config", "normalize_so8t_layers"]
