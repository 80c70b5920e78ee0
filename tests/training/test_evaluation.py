"""Evaluation you can trust: no-grad forwards see every optimizer step (fused AdamW included), the thinking metrics
go through `Trainer.log` with `eval_loss` (integrations, console), generation is batched, each step is evaluated
once."""

import logging

import pytest
import torch
from tiny_models import random_ids, tiny_so8t, tiny_tokenizer, token_dataset
from transformers import TrainerCallback

import so8t_hf.training.callbacks as callbacks
from so8t_hf.sft.config import SO8TModelConfig, ThinkingDataConfig
from so8t_hf.sft.pipeline import build_datasets, build_model, build_tokenizer
from so8t_hf.thinking import DEFAULT_TAGS
from so8t_hf.thinking.data import sample_data_dir
from so8t_hf.training.callbacks import ThinkingEvalCallback
from so8t_hf.training.peft_setup import default_lora_config
from so8t_hf.training.trainer import SO8TConfig, SO8TTrainer


def make_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                  so8t_learning_rate=5e-2, logging_steps=1, save_strategy="no", report_to=[], bf16=False, use_cpu=True,
                  max_length=256, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    values.update(overrides)
    return SO8TConfig(**values)


# ------------------------------------------------------------------------------ rotations never stale


class _NoGradEqualsGrad(TrainerCallback):
    """After each optimizer step: the no-grad logits (cached R) against the grad-enabled ones (R from theta)."""

    def __init__(self):
        self.ids, self.gaps, self.thetas = random_ids(2, 12), [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            cached = model(input_ids=self.ids).logits
        with torch.enable_grad():
            fresh = model(input_ids=self.ids).logits.detach()
        model.train(was_training)
        self.gaps.append((cached - fresh).abs().max().item())
        self.thetas.append([p.detach().clone() for n, p in model.named_parameters()
                            if "so8_rotation" in n and p.requires_grad])


def test_no_grad_logits_equal_grad_logits_after_every_fused_adamw_step(tmp_path):
    """The fused AdamW kernel updates theta in place without bumping `theta._version`: a cache keyed on the version
    served the first step's rotations to every later evaluation (0.15-0.23 logit gaps on this model)."""
    check = _NoGradEqualsGrad()
    trainer = SO8TTrainer(model=tiny_so8t(seed=0), args=make_args(tmp_path, optim="adamw_torch_fused", max_steps=4),
                          train_dataset=token_dataset(), processing_class=tiny_tokenizer(),
                          peft_config=default_lora_config(r=4, alpha=8, dropout=0.0), callbacks=[check])
    trainer.train()
    assert trainer.optimizer.defaults["fused"] is True  # the kernel that skips the version bump ran
    assert len(check.gaps) == 4 and len(check.thetas[0]) == 2
    for before, after in zip(check.thetas, check.thetas[1:]):
        assert all(not torch.equal(b, a) for b, a in zip(before, after)), "theta did not move in a step"
    assert check.gaps == [0.0] * 4


# ------------------------------------------------------------------------------ thinking metrics through Trainer.log


@pytest.fixture(scope="module")
def thinking_run(tmp_path_factory):
    """The recipe's tiny tokenizer, model and data (hidden 64), built as run_thinking_sft builds them."""
    out = tmp_path_factory.mktemp("eval")
    model_args = SO8TModelConfig(tiny_hidden_size=64, tiny_intermediate_size=128)
    tokenizer, summary = build_tokenizer(model_args, DEFAULT_TAGS)
    data = ThinkingDataConfig(dataset_path=[str(sample_data_dir())], eval_fraction=0.1)
    train, evaluation, messages = build_datasets(data, tokenizer, 256, out, DEFAULT_TAGS, seed=0)
    return out, model_args, tokenizer, summary, train, evaluation.select(range(4)), messages


class _Recorder(TrainerCallback):
    """What every `report_to` integration receives: the `logs` of each `on_log`."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.fixture
def generation_calls(monkeypatch):
    calls = []
    real = callbacks.generate_replies

    def spy(model, tokenizer, conversations, **kwargs):
        calls.append((len(conversations), kwargs))
        return real(model, tokenizer, conversations, **kwargs)

    monkeypatch.setattr(callbacks, "generate_replies", spy)
    return calls


def _trainer(thinking_run, tmp_path, rows=3, **overrides):
    out, model_args, tokenizer, summary, train, evaluation, messages = thinking_run
    torch.manual_seed(0)
    recorder = _Recorder()
    trainer = SO8TTrainer(
        model=build_model(model_args, tokenizer, summary), args=make_args(tmp_path, **overrides), train_dataset=train,
        eval_dataset=evaluation, processing_class=tokenizer, peft_config=default_lora_config(r=4, alpha=8, dropout=0.0),
        callbacks=[ThinkingEvalCallback(tokenizer, messages[:rows], DEFAULT_TAGS, max_new_tokens=6), recorder],
    )
    return trainer, recorder


THINKING_KEYS = ("eval_final_exact_match", "eval_format_compliance", "eval_thinking_leak_rate", "eval_truncated_rate")


def test_thinking_metrics_reach_every_integration_and_the_console_with_eval_loss(
        thinking_run, tmp_path, generation_calls, capsys):
    trainer, recorder = _trainer(thinking_run, tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2,
                                 per_device_train_batch_size=2, per_device_eval_batch_size=2)
    trainer.train()
    evals = [logs for logs in recorder.logs if "eval_loss" in logs]
    assert len(evals) == 1
    for key in THINKING_KEYS:  # in the same on_log call as eval_loss: one eval line, one point per integration
        assert key in evals[0] and 0.0 <= evals[0][key] <= 1.0, key
    assert evals[0]["eval_truncated_rate"] == 1.0  # 6 new tokens cannot hold a thinking answer: reported, not hidden
    console = [line for line in capsys.readouterr().out.splitlines() if "eval_loss" in line]
    assert len(console) == 1 and all(key in console[0] for key in THINKING_KEYS)
    # batched: one call for the 3 rows at the eval batch size, greedy, no bar with disable_tqdm
    assert generation_calls == [(3, dict(max_new_tokens=6, batch_size=2, progress=False))]
    assert [e["step"] for e in trainer.state.log_history if "eval_loss" in e] == [2]
    final = trainer.final_metrics()  # the last step was evaluated: reused, not generated again
    assert len(generation_calls) == 1 and [e["step"] for e in trainer.state.log_history if "eval_loss" in e] == [2]
    assert final == {k: v for k, v in trainer.state.log_history[-2].items() if k != "step"}
    assert all(final[key] == evals[0][key] for key in THINKING_KEYS)


def test_final_metrics_evaluates_once_when_the_last_step_was_not_evaluated(thinking_run, tmp_path, generation_calls):
    trainer, recorder = _trainer(thinking_run, tmp_path, rows=2, max_steps=3, eval_strategy="steps", eval_steps=2,
                                 per_device_train_batch_size=2, disable_tqdm=False)
    trainer.train()
    metrics = trainer.final_metrics()
    assert [e["step"] for e in trainer.state.log_history if "eval_loss" in e] == [2, 3]
    assert len(generation_calls) == 2 and generation_calls[0][1]["progress"] is True  # a bar unless disable_tqdm
    assert all(key in metrics for key in THINKING_KEYS) and metrics["eval_loss"] > 0


def test_final_metrics_of_the_best_checkpoint_chosen_by_a_thinking_metric(thinking_run, tmp_path, generation_calls):
    trainer, _ = _trainer(thinking_run, tmp_path, rows=2, max_steps=4, eval_strategy="steps", eval_steps=2,
                          save_strategy="steps", save_steps=2, per_device_train_batch_size=2,
                          load_best_model_at_end=True, metric_for_best_model="truncated_rate", greater_is_better=False)
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4] and evals[0]["eval_truncated_rate"] == evals[1]["eval_truncated_rate"]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")  # a tie keeps the first
    assert trainer.final_metrics() == {k: v for k, v in evals[0].items() if k != "step"}  # the loaded model's step
    assert len(generation_calls) == 2


def test_thinking_eval_with_another_trainer_warns_instead_of_passing_silently(caplog):
    row = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    callback = ThinkingEvalCallback(tiny_tokenizer(), [row])
    with caplog.at_level(logging.WARNING, logger="so8t_hf"):
        callback.on_evaluate(None, None, None, metrics={"eval_loss": 1.0})
        callback.on_evaluate(None, None, None, metrics={"eval_loss": 1.0, "eval_final_exact_match": 0.0})
    assert caplog.text.count("did not generate the thinking metrics") == 1
