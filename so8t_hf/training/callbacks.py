"""Thinking metrics at each evaluation: replies generated for a few held-out rows, scored for final-answer exact
match, format compliance and the thinking-leak rate of `extract_final`, plus the share cut off by the length limit.

How: `ThinkingEvalCallback` holds the rows; `SO8TTrainer.evaluation_loop` calls its `generation_metrics`, so the
scores join `eval_loss` in the evaluation's one `Trainer.log` call: every `report_to` integration, the console eval
line, `state.log_history`, `metric_for_best_model` and the dict `evaluate()` returns see them. Generation is
`so8t_hf.inference.generation.generate_replies`, the path and stop rules of `so8t-hf chat` (batched, left-padded,
greedy, a progress bar over the rows).

Limits: every process generates all the rows (keep `eval_generation_rows` small); with a trainer other than
`SO8TTrainer` nothing is generated and a warning says so; `eval_truncated_rate` > 0 means `max_new_tokens` cut
replies short, and the other scores then undercount.
"""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

from so8t_hf.inference.generation import generate_replies
from so8t_hf.thinking import DEFAULT_TAGS, parse_thinking
from so8t_hf.thinking.metrics.scoring import until_turn_end

logger = logging.getLogger(__name__)


def prompt_and_reference(messages, tags=DEFAULT_TAGS):
    """(messages up to the last user turn, the reference final of the last assistant turn)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], parse_thinking(messages[last]["content"], tags).final


def thinking_generation_metrics(model, tokenizer, rows, tags=DEFAULT_TAGS, max_new_tokens: int = 128,
                                batch_size: int = 8, progress: bool = False) -> dict[str, float]:
    """Generate a reply to each row's prompt (greedy, `generate_replies`) and score it against the row's final:
    `final_exact_match`, `format_compliance`, `thinking_leak_rate` and `truncated_rate` (the share of replies
    that reached `max_new_tokens` without a turn-ending token)."""
    from so8t_hf.thinking.metrics import compute_thinking_metrics

    prompts, references = zip(*(prompt_and_reference(messages, tags) for messages in rows), strict=True)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        replies = generate_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   progress=progress)
    finally:
        model.train(was_training)
    texts = [text for text, _, _ in replies]
    truncated = sum(n >= max_new_tokens and until_turn_end(text) == text for text, _, n in replies)
    logger.info("thinking metrics: %d replies generated in %.1f s (batch %d, max_new_tokens %d, %d cut by the limit)",
                len(texts), time.perf_counter() - start, batch_size, max_new_tokens, truncated)
    scores = compute_thinking_metrics(texts, list(references), tags=tags)
    scores["truncated_rate"] = truncated / len(texts)
    return scores


class ThinkingEvalCallback(TrainerCallback):
    """The rows and settings of the thinking metrics; `SO8TTrainer` evaluates them at each evaluation as
    `eval_final_exact_match`, `eval_format_compliance`, `eval_thinking_leak_rate`, `eval_truncated_rate`."""

    def __init__(self, tokenizer, rows, tags=DEFAULT_TAGS, max_new_tokens: int = 128, batch_size: int | None = None):
        self.tokenizer, self.rows, self.tags, self.max_new_tokens = tokenizer, list(rows), tags, max_new_tokens
        self.batch_size = batch_size  # None: the trainer's per_device_eval_batch_size
        self.last: dict[str, float] = {}
        self._warned = False

    def generation_metrics(self, model, batch_size: int = 8, progress: bool = False,
                           prefix: str = "eval") -> dict[str, float]:
        """The prefixed scores of `thinking_generation_metrics` on this callback's rows ({} without rows)."""
        if not self.rows:
            return {}
        scores = thinking_generation_metrics(model, self.tokenizer, self.rows, self.tags, self.max_new_tokens,
                                             batch_size=self.batch_size or batch_size, progress=progress)
        self.last = {f"{prefix}_{k}": v for k, v in scores.items()}
        return self.last

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.rows and metrics is not None and not any(k.endswith("_final_exact_match") for k in metrics):
            if not self._warned:
                logger.warning("ThinkingEvalCallback: this trainer did not generate the thinking metrics; they are "
                               "computed inside SO8TTrainer's evaluation (use so8t_hf.SO8TTrainer).")
                self._warned = True
