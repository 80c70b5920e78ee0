"""SO(8) rotation helpers: health metrics and the burn-in merge into `o_proj`.

The rotation module itself lives in the self-contained model code (`modeling/`), the single source of
the model; this file holds what only the library needs.

Merge maths: `o_proj(x @ R) = x @ R @ W_o^T = x @ (W_o @ R^T)^T`, so the merged weight is
`W_o' = W_o @ blockdiag(R)^T` (R per 8-wide block). The result is a plain `Phi3ForCausalLM`.
"""

from __future__ import annotations

import torch
from transformers import Phi3Config, Phi3ForCausalLM

from so8t_hf.modeling.configuration_so8t_phi3 import So8tPhi3Config
from so8t_hf.modeling.modeling_so8t_phi3 import So8Rotation

_SO8T_CONFIG_KEYS = ("so8t_layers", "so8t_attn_backend", "auto_map", "architectures", "model_type")


def so8_rotations(model: torch.nn.Module) -> dict[str, So8Rotation]:
    """Qualified module name -> SO(8) rotation, for any model (plain, PEFT-wrapped, compiled)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, So8Rotation)}


def blockdiag_rotation(rotation: So8Rotation) -> torch.Tensor:
    """The (n*8, n*8) block-diagonal matrix of a rotation, float64."""
    return torch.block_diag(*rotation.rotation_matrices())


@torch.no_grad()
def rotation_health(model: torch.nn.Module) -> dict[str, float]:
    """Max orthogonality error and total generator norm over all SO(8) rotations (logged per step)."""
    rotations = list(so8_rotations(model).values())
    rotations = [r for r in rotations if r.theta.requires_grad] or rotations  # PEFT keeps a frozen original copy
    if not rotations:
        return {}
    if any(_is_dtensor(r.theta) for r in rotations):  # FSDP2-sharded: every rank logs, so all gather the generators
        return _full_health([r.theta.full_tensor() if _is_dtensor(r.theta) else r.theta for r in rotations])
    return {
        "so8_orthogonality_error": max(r.orthogonality_error() for r in rotations),
        "so8_angle_norm": sum(r.angle_norm() ** 2 for r in rotations) ** 0.5,
    }


def _is_dtensor(tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


@torch.no_grad()
def _full_health(thetas: list[torch.Tensor]) -> dict[str, float]:
    """`rotation_health` from the generators themselves (the same formulas as `So8Rotation`'s methods)."""
    errors, norms = [], []
    for theta in thetas:
        a = theta.double() - theta.double().transpose(-1, -2)
        r = torch.linalg.matrix_exp(a).float().double()
        errors.append((r.transpose(-1, -2) @ r - torch.eye(8, dtype=r.dtype, device=r.device)).abs().max().item())
        norms.append(torch.linalg.norm(a.float()).item())
    return {"so8_orthogonality_error": max(errors), "so8_angle_norm": sum(n**2 for n in norms) ** 0.5}


def plain_phi3_config(config: So8tPhi3Config) -> Phi3Config:
    """The stock Phi-3 config of an SO8T-Phi3 config (same architecture, no SO(8) fields)."""
    values = {k: v for k, v in config.to_dict().items() if k not in _SO8T_CONFIG_KEYS}
    plain = Phi3Config(**values)
    plain.architectures = ["Phi3ForCausalLM"]
    return plain


@torch.no_grad()
def merge_so8t_rotations(model) -> Phi3ForCausalLM:
    """Burn every SO(8) rotation into its layer's `o_proj` and return a plain `Phi3ForCausalLM`.

    Accepts an `So8tPhi3ForCausalLM` (merge LoRA adapters first with `merge_and_unload()`). The input
    model is left unchanged; the result has the same device and dtype and equal logits.
    """
    if not hasattr(model, "so8_rotations"):
        raise TypeError(
            f"merge_so8t_rotations expects an So8tPhi3ForCausalLM, got {type(model).__name__}; "
            "for a PEFT model call merge_and_unload() first."
        )
    plain_config = plain_phi3_config(model.config)
    plain_config._attn_implementation = model.config._attn_implementation if model.config._attn_implementation != "so8t" else "sdpa"
    state = {k: v for k, v in model.state_dict().items() if "so8_rotation" not in k}
    for layer_idx, rotation in model.so8_rotations().items():
        key = f"model.layers.{layer_idx}.self_attn.o_proj.weight"
        w_o = state[key]
        state[key] = (w_o.double() @ blockdiag_rotation(rotation).to(w_o.device).T).to(w_o.dtype)  # W_o @ R^T
    with torch.device("meta"):
        plain = Phi3ForCausalLM(plain_config)
    plain.load_state_dict(state, assign=True, strict=True)
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in state_dict
        owner, _, attr = name.rpartition(".")
        if getattr(plain.get_submodule(owner), attr).is_meta:
            plain.get_submodule(owner).register_buffer(attr, buffer.clone(), persistent=False)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.train(model.training)
