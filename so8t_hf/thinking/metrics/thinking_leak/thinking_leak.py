"""thinking_leak: how often does the user-visible answer contain text found only in thinking?

An `evaluate` metric loaded from this local file (`evaluate.load(<this folder>)`), offline: it
downloads nothing. Scoring is `so8t_hf.thinking.metrics.scoring.thinking_leak` (see its docstring for the
definition of thinking-only text). Lower is better; a correct extractor scores 0.
"""

import datasets
import evaluate

from so8t_hf.thinking.metrics.scoring import thinking_leak

_DESCRIPTION = (
    "Fraction of generations whose extracted final answer (so8t_hf.thinking.extract_final, or the finals given) "
    "contains text that appears only inside the generation's thinking sections."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generations decoded with skip_special_tokens=False (tags kept).
    finals (list of str, optional): the answers shown to users, one per prediction, to check another
        extractor (e.g. a server's); default: so8t_hf.thinking.extract_final of each prediction.
    tags (so8t_hf.thinking.ThinkingTags or str, optional): tag set or preset name; default "default".
Returns:
    thinking_leak_rate (float): in [0, 1].
Examples:
    >>> metric = evaluate.load("so8t_hf/metrics/thinking_leak")
    >>> metric.compute(predictions=["<think-task>secret plan</think-task><final>Hi</final>"],
    ...                finals=["secret plan Hi"])
    {'thinking_leak_rate': 1.0}
"""


class ThinkingLeak(evaluate.Metric):
    """Leak rate of thinking-only text into the user-visible answer."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, finals=None, tags=None):
        return thinking_leak(predictions, finals=finals, tags=tags)
