"""Callbacks of the pre-training recipe: step timing, the one-line step log, and the best checkpoint.

- `StepTimer`: wall time per optimizer step (between consecutive step ends, data loading included; the GPU is
  synchronised at each step end so the figure is the step's, not its launch's). `PretrainTrainer.log` adds the mean
  since the last log as `step_time` to the logs, so every `report_to` integration sees it with `loss`,
  `perplexity`, `learning_rate` and `grad_norm`.
- `StepLogCallback`: prints `Step | Loss | PPL | LR | Grad | Time` for each training log.
- `BestCheckpointCallback`: after each evaluation whose `eval_loss` is the lowest so far, saves the model and
  tokenizer to `output_dir/best` (`save_pretrained`: remote code + auto_map) with `best.json` (step, eval_loss).
  One process saves (rank 0); under FSDP use the Trainer's own `load_best_model_at_end` instead.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

__all__ = ["BestCheckpointCallback", "StepLogCallback", "StepTimer", "format_step_line"]

logger = logging.getLogger(__name__)

HEADER = "Step | Loss | PPL | LR | Grad | Time"


class StepTimer(TrainerCallback):
    """Wall seconds of each optimizer step; `pop_mean()` returns and clears the mean since the last call."""

    def __init__(self):
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now

    def on_evaluate(self, args, state, control, **kwargs):
        self._last = time.perf_counter()  # evaluation and saving are not a training step's time

    on_save = on_evaluate

    def pop_mean(self) -> float | None:
        if not self.times:
            return None
        mean = sum(self.times) / len(self.times)
        self.times.clear()
        return mean


def format_step_line(step: int, max_steps: int, logs: dict) -> str:
    loss = logs.get("loss", float("nan"))
    ppl = logs.get("perplexity", math.exp(min(loss, 50.0)) if loss == loss else float("nan"))
    grad = logs.get("grad_norm", float("nan"))
    return (f"Step {step}/{max_steps} | Loss {loss:.4f} | PPL {ppl:.2f} | LR {logs.get('learning_rate', 0.0):.3e} | "
            f"Grad {grad:.3f} | Time {logs.get('step_time', float('nan')):.3f} s")


class StepLogCallback(TrainerCallback):
    """`Step | Loss | PPL | LR | Grad | Time` on stdout for every training log (rank 0); `lines` keeps them."""

    def __init__(self, printer=print):
        self.printer, self.lines = printer, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        if not self.lines:
            self.printer(HEADER)
        line = format_step_line(state.global_step, state.max_steps, logs)
        self.lines.append(line)
        self.printer(line, flush=True) if self.printer is print else self.printer(line)


class BestCheckpointCallback(TrainerCallback):
    """Keep `output_dir/best`: the model of the lowest `eval_loss` so far (see the module docstring)."""

    def __init__(self, output_dir: str | Path):
        self.folder = Path(output_dir) / "best"
        self.best: float | None = None
        marker = self.folder / "best.json"
        if marker.is_file():  # a resumed run keeps the best it already had
            self.best = json.loads(marker.read_text())["eval_loss"]

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or not state.is_world_process_zero or (self.best is not None and loss >= self.best):
            return
        self.best = loss
        model = getattr(model, "module", model)
        model.save_pretrained(self.folder)
        if processing_class is not None:
            processing_class.save_pretrained(self.folder)
        (self.folder / "best.json").write_text(json.dumps({"step": state.global_step, "eval_loss": loss}) + "\n")
        logger.info("best checkpoint: step %d, eval_loss %.4f -> %s", state.global_step, loss, self.folder)
