"""Inference: one loader, one set of stop rules and one generation path, shared by `so8t-hf chat`, the
evaluation callback and the /think service."""

from so8t_hf.inference.generation import (
    generate_replies,
    generate_reply,
    prompt_ids,
    stop_token_ids,
)
from so8t_hf.inference.loader import load_for_inference, resolve_dtype

__all__ = ["generate_replies", "generate_reply", "load_for_inference", "prompt_ids", "resolve_dtype", "stop_token_ids"]
