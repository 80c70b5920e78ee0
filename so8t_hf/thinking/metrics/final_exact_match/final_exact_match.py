"""final_exact_match: does the user-visible answer of a thinking generation equal the reference?

An `evaluate` metric loaded from this local file (`evaluate.load(<this folder>)`), offline: it
downloads nothing. Scoring is `so8t_hf.thinking.metrics.scoring.final_exact_match` (see its docstring).
"""

import datasets
import evaluate

from so8t_hf.thinking.metrics.scoring import final_exact_match

_DESCRIPTION = (
    "Fraction of generations whose extracted final answer (so8t_hf.thinking.extract_final: never thinking text) "
    "equals the reference final answer, whitespace runs collapsed."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generations decoded with skip_special_tokens=False (tags kept).
    references (list of str): reference final answers, plain or wrapped in <final>...</final>.
    tags (so8t_hf.thinking.ThinkingTags or str, optional): tag set or preset name; default "default".
    normalize (bool, optional): collapse whitespace runs before comparing; default True.
Returns:
    final_exact_match (float): in [0, 1].
Examples:
    >>> metric = evaluate.load("so8t_hf/metrics/final_exact_match")
    >>> metric.compute(predictions=["<think-task>t</think-task><final>4</final>"], references=["4"])
    {'final_exact_match': 1.0}
"""


class FinalExactMatch(evaluate.Metric):
    """Exact match of `extract_final(prediction)` against the reference answer."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, tags=None, normalize=True):
        return final_exact_match(predictions, references, tags=tags, normalize=normalize)
