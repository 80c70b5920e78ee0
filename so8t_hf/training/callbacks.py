"""Thinking metrics during training: generate on a few eval rows at each evaluation and log
final-answer exact match, format compliance and the thinking-leak rate of `extract_final`."""

from __future__ import annotations

from transformers import TrainerCallback

from so8t_hf.inference.generation import generate_reply
from so8t_hf.thinking import DEFAULT_TAGS, parse_thinking


def prompt_and_reference(messages, tags=DEFAULT_TAGS):
    """(messages up to the last user turn, the reference final of the last assistant turn)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], parse_thinking(messages[last]["content"], tags).final


def thinking_generation_metrics(model, tokenizer, rows, tags=DEFAULT_TAGS, max_new_tokens: int = 128) -> dict[str, float]:
    from so8t_hf.thinking.metrics import compute_thinking_metrics

    was_training = model.training
    model.eval()
    predictions, references = [], []
    for messages in rows:
        prompt, reference = prompt_and_reference(messages, tags)
        text, _, _ = generate_reply(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
        predictions.append(text)
        references.append(reference)
    model.train(was_training)
    return compute_thinking_metrics(predictions, references, tags=tags)


class ThinkingEvalCallback(TrainerCallback):
    """Adds `eval_final_exact_match`, `eval_format_compliance`, `eval_thinking_leak_rate` at each evaluation."""

    def __init__(self, tokenizer, rows, tags=DEFAULT_TAGS, max_new_tokens: int = 128):
        self.tokenizer, self.rows, self.tags, self.max_new_tokens = tokenizer, list(rows), tags, max_new_tokens
        self.last: dict[str, float] = {}

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if not self.rows or model is None:
            return
        scores = thinking_generation_metrics(model, self.tokenizer, self.rows, self.tags, self.max_new_tokens)
        self.last = {f"eval_{k}": v for k, v in scores.items()}
        if metrics is not None:
            metrics.update(self.last)
        state.log_history.append({**self.last, "step": state.global_step})
