"""Thinking-SFT metrics as local `evaluate` modules, loaded offline from this package.

What: `final_exact_match`, `format_compliance` and `thinking_leak` (one folder each, loadable
with `evaluate.load(metric_path(name))`); `load_thinking_metrics()` loads all three and
`compute_thinking_metrics(predictions, references)` returns their scores in one dict. The
scoring itself is in `scoring` (plain functions, usable without `evaluate`).

Limits: loading a local module never touches the network (evaluate resolves a path that exists
as a local script before any Hub lookup); it copies the script into evaluate's modules cache
(`HF_MODULES_CACHE`, default ~/.cache/huggingface/modules). Modules are loaded with
`keep_in_memory=True` (no Arrow cache files; single process, which is how the generation
callback runs them).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from so8t_hf.thinking.format import ThinkingTags

__all__ = ["METRIC_NAMES", "compute_thinking_metrics", "load_thinking_metrics", "metric_path"]

METRIC_NAMES = ("final_exact_match", "format_compliance", "thinking_leak")


def metric_path(name: str) -> str:
    """Local folder of the metric `name` (one of `METRIC_NAMES`), for `evaluate.load`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown thinking metric {name!r}; choose one of {METRIC_NAMES}")
    return str(Path(__file__).resolve().parent / name)


def load_thinking_metrics(**load_kwargs: Any) -> dict[str, Any]:
    """`{name: evaluate.EvaluationModule}` for the three metrics; kwargs go to `evaluate.load`."""
    import evaluate

    kwargs = {"keep_in_memory": True, **load_kwargs}
    return {name: evaluate.load(metric_path(name), **kwargs) for name in METRIC_NAMES}


@lru_cache(maxsize=1)
def _cached_metrics() -> dict[str, Any]:
    return load_thinking_metrics()


def compute_thinking_metrics(
    predictions: Sequence[str], references: Sequence[str], tags: ThinkingTags | str | None = None
) -> dict[str, float]:
    """`{"final_exact_match", "format_compliance", "thinking_leak_rate"}` for generations and reference finals."""
    metrics = _cached_metrics()
    predictions, references = list(predictions), list(references)
    out: dict[str, float] = {}
    out.update(metrics["final_exact_match"].compute(predictions=predictions, references=references, tags=tags))
    out.update(metrics["format_compliance"].compute(predictions=predictions, tags=tags))
    out.update(metrics["thinking_leak"].compute(predictions=predictions, tags=tags))
    return out
