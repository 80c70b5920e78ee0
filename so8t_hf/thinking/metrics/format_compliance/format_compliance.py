"""format_compliance: is a thinking generation in the strict format (every tag present, well formed)?

An `evaluate` metric loaded from this local file (`evaluate.load(<this folder>)`), offline: it
downloads nothing. Scoring is `so8t_hf.thinking.metrics.scoring.format_compliance` (see its docstring).
"""

import datasets
import evaluate

from so8t_hf.thinking.metrics.scoring import format_compliance

_DESCRIPTION = (
    "Fraction of generations (read up to the first turn-ending token) that pass "
    "so8t_hf.thinking.find_thinking_problems: each thinking section once and in order, then one non-empty final."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generations decoded with skip_special_tokens=False (tags kept).
    tags (so8t_hf.thinking.ThinkingTags or str, optional): tag set or preset name; default "default".
Returns:
    format_compliance (float): in [0, 1].
Examples:
    >>> metric = evaluate.load("so8t_hf/metrics/format_compliance")
    >>> metric.compute(predictions=["<final>4</final>"])
    {'format_compliance': 0.0}
"""


class FormatCompliance(evaluate.Metric):
    """Fraction of generations with no thinking-format problem."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, tags=None):
        return format_compliance(predictions, tags=tags)
