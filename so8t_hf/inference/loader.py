"""One loader for inference (chat, serving, benchmarks): a saved model directory -> (model, tokenizer), a base
with a trained adapter merged in (export, the QLoRA run's `final/`), and the one parser of dtype names."""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["DTYPE_NAMES", "adapter_base", "default_device", "load_for_inference", "load_merged_adapter",
           "resolve_dtype"]

logger = logging.getLogger(__name__)

DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """A torch dtype from a name in `DTYPE_NAMES` (or a dtype). `auto` (or None): bfloat16 on a GPU that
    supports it, else float32."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def load_for_inference(path: str, device: str = "auto", dtype: str | torch.dtype = "auto",
                       merge_rotations: bool = False) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer) from a saved model directory or Hub id (remote code trusted), or
    from a run's `adapter/` folder (its base with the adapter merged in, `load_merged_adapter`).

    The Phi-3 thinking chat template is set when the tokenizer has none. With `merge_rotations`, an SO8T-Phi3
    is returned as the plain Phi-3 of `merge_so8t_rotations` (equal logits, no per-step rotation).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from so8t_hf.thinking.chat_template import apply_thinking_chat_template

    device = default_device() if device == "auto" else device
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # the config names remote code: no prompt
    if not getattr(tokenizer, "chat_template", None):
        apply_thinking_chat_template(tokenizer)
    if adapter_base(path) is not None:  # a run's adapter/ folder: its base, loaded as SO8T-Phi3, with it merged in
        model = load_merged_adapter(adapter_base(path), path, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=resolve_dtype(dtype))
    if merge_rotations and hasattr(model, "so8_rotations"):
        from so8t_hf.rotation import merge_so8t_rotations

        model = merge_so8t_rotations(model)
    logger.info("loaded %s (%s, %s) on %s", path, type(model).__name__, model.dtype, device)
    return model.to(device).eval(), tokenizer


def adapter_base(path: str) -> str | None:
    """The base model of a PEFT adapter folder (`adapter_config.json` and no `config.json`), else None. An adapter
    that names no base (the tiny demo's random base is saved nowhere) is a ValueError that says what to load."""
    import json
    from pathlib import Path

    folder = Path(path)
    if not (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return None
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path} is a LoRA adapter that names no base model (base_model_name_or_path is empty: the "
                         f"tiny demo's random base is saved nowhere); load the run's complete model, "
                         f"{folder.parent / 'final'}, instead")
    return base


def load_merged_adapter(base: str, adapter: str, dtype: str | torch.dtype = "auto"):
    """`base` as SO8T-Phi3 with the PEFT `adapter` (LoRA, SO(8) generators, tag-token rows) merged in."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from so8t_hf.modeling import So8tPhi3ForCausalLM

    try:
        model = So8tPhi3ForCausalLM.from_pretrained(base, dtype=resolve_dtype(dtype))
    except (OSError, ValueError) as err:
        raise ValueError(f"the base model {base!r} of the adapter {adapter} could not be loaded ("
                         f"{' '.join(str(err).split())[:300]}); pass a reachable base, or load the run's complete "
                         "model (its final/ folder)") from err
    try:
        rows = len(AutoTokenizer.from_pretrained(adapter))
    except (OSError, ValueError):
        rows = 0
    if rows > model.get_input_embeddings().num_embeddings:  # the run resized the embeddings (no spare rows)
        model.resize_token_embeddings(rows)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()
