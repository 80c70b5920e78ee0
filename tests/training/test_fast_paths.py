"""Convergence of the speed paths (Liger's `test/convergence` style): the same tiny run with every fast path on and off
follows the same loss curve at every step, and logs the same metrics.

Fast paths: SO(8) rotations once per forward (`So8tPhi3Model.so8t_step_rotations`) through the Triton exponential
(`SO8T_ROTATION_EXP=triton`, Triton's interpreter on the CPU), the sync-free loss and metrics (`sync_free_metrics`),
LoRA inputs left in the autocast dtype (`lora_cast_inputs=False`), and the checkpointing memory policy."""

import pytest
import torch
from tiny_models import randomize_rotations, tiny_so8t, tiny_tokenizer, token_dataset

from so8t_hf.training.memory import (
    apply_checkpoint_policy,
    auto_checkpointed_count,
    checkpoint_layers,
    parse_layers_setting,
)
from so8t_hf.training.peft_setup import default_lora_config
from so8t_hf.training.trainer import SO8TConfig, SO8TTrainer

STEPS = 6


def _run(tmp_path, monkeypatch, fast: bool, exp: str = "torch", **overrides):
    # exp="triton" runs the exponential kernel in Triton's interpreter: exact, but ~0.1 s per 8x8 block on the CPU
    monkeypatch.setenv("SO8T_ROTATION_EXP", exp)
    model = tiny_so8t(seed=0)
    randomize_rotations(model, scale=0.2)
    model.model.so8t_step_rotations = fast
    values = dict(output_dir=str(tmp_path / f"fast{fast}"), max_steps=STEPS, per_device_train_batch_size=4,
                  learning_rate=1e-2, so8t_learning_rate=5e-2, logging_steps=1, save_strategy="no", report_to=[],
                  use_cpu=True, max_length=64, seed=0, dataloader_num_workers=0, disable_tqdm=True, packing=True,
                  bf16=False, activation_checkpointing=True, sync_free_metrics=fast, lora_cast_inputs=not fast)
    values.update(overrides)
    trainer = SO8TTrainer(model=model, args=SO8TConfig(**values), train_dataset=token_dataset(rows=40, max_len=30),
                          processing_class=tiny_tokenizer(), peft_config=default_lora_config(r=4, alpha=8, dropout=0.0))
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == STEPS
    return trainer, logs


def test_fast_paths_follow_the_reference_loss_curve_at_every_step(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    _, ref = _run(tmp_path, monkeypatch, fast=False)
    # the trainer runs on the CPU (use_cpu): the exponential kernel runs in Triton's interpreter there; on a CUDA
    # machine the interpreter is off, and the GPU test (tests/training/test_gpu_training.py) covers the kernel
    exp = "torch" if torch.cuda.is_available() else "triton"
    trainer, fast = _run(tmp_path, monkeypatch, fast=True, exp=exp)
    assert trainer._pending == [] and trainer._pending_tokens == []  # every metric reached the logs
    for step, (a, b) in enumerate(zip(fast, ref)):
        # fp32 on both sides; the exponential differs by ~1e-7 (fp32 kernel vs float64), compounding over the steps
        for key in ("loss", "nll", "perplexity", "entropy", "mean_token_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (step, key, a[key], b[key])
        assert a["num_tokens"] == b["num_tokens"] and a["num_tokens"] > 0, step
    assert fast[-1]["loss"] < fast[0]["loss"]  # it learns


def test_lora_inputs_in_the_autocast_dtype_give_the_same_bf16_losses(tmp_path, monkeypatch):
    # under bf16 autocast the adapters' matmuls run in bf16 either way: skipping PEFT's cast to fp32 and back
    # (two full activation copies per LoRA layer) changes no bit of the result
    _, cast = _run(tmp_path / "a", monkeypatch, fast=False, bf16=True, lora_cast_inputs=True)
    trainer, uncast = _run(tmp_path / "b", monkeypatch, fast=False, bf16=True, lora_cast_inputs=False)
    lora = [m for m in trainer.model.modules() if hasattr(m, "lora_A")]
    assert lora and all(m.cast_input_dtype_enabled is False for m in lora)
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in lora)  # the adapters stay fp32
    assert [e["loss"] for e in uncast] == [e["loss"] for e in cast]


def test_checkpoint_policy_settings_and_counts(tmp_path, monkeypatch):
    assert parse_layers_setting("all") == "all" and parse_layers_setting("auto") == "auto"
    assert parse_layers_setting("12") == 12 and parse_layers_setting(0) == 0
    for bad in ("some", -1, True, 1.5):
        with pytest.raises(ValueError, match="activation_checkpointing_layers="):
            parse_layers_setting(bad)
    with pytest.raises(ValueError, match="activation_checkpointing_layers="):
        SO8TConfig(output_dir=str(tmp_path), activation_checkpointing_layers="half", use_cpu=True, report_to=[])
    # Phi-3.5-mini shape at 4 x 2048 tokens: 139 KB per token per layer, ~1.07 GiB per layer
    config = tiny_so8t().config.__class__(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                          num_attention_heads=32, num_key_value_heads=32)
    gib = 2**30
    assert auto_checkpointed_count(config, 32, 8192, 0, 8 * gib, 200 * gib) == 0  # fits: no layer checkpointed
    assert auto_checkpointed_count(config, 32, 8192, 0, 8 * gib, 10 * gib) == 32  # no room: all checkpointed
    some = auto_checkpointed_count(config, 32, 8192, 0, 8 * gib, 24 * gib)
    assert 0 < some < 32


def test_a_layer_count_turns_checkpointing_off_on_the_others_and_the_losses_agree(tmp_path, monkeypatch):
    trainer, partial = _run(tmp_path / "p", monkeypatch, fast=True, activation_checkpointing_layers=1)
    assert trainer.checkpoint_policy.checkpointed == 1
    flags = [m.gradient_checkpointing for m in checkpoint_layers(trainer.model)]
    assert flags == [True, False]
    _, full = _run(tmp_path / "f", monkeypatch, fast=True)
    for a, b in zip(partial, full):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert apply_checkpoint_policy(trainer.model, "all", tokens=64) is None
