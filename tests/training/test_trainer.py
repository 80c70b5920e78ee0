"""SO8TTrainer + LoRA on tiny models: what trains, what is saved, the loss fallback and its error path,
gradient accumulation, resume, metrics, PET."""

import logging
import math

import pytest
import torch
from peft import LoraConfig, PeftModel
from tiny_models import random_ids, tiny_so8t, tiny_tokenizer, token_dataset
from transformers import Phi3ForCausalLM, TrainerCallback

from so8t_hf import merge_so8t_rotations
from so8t_hf.training.peft_setup import (
    check_lora_targets,
    default_lora_config,
    parameter_groups,
    quantization_config,
)
from so8t_hf.training.pet import pet_lambda_at, pet_penalty
from so8t_hf.training.trainer import LossHasNoGraphError, SO8TConfig, SO8TTrainer


def make_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        so8t_learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=True,
        max_length=64,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return SO8TConfig(**values)


def make_trainer(tmp_path, model=None, peft=True, dataset=None, **overrides):
    model = model if model is not None else tiny_so8t(seed=0)
    return SO8TTrainer(
        model=model,
        args=make_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else token_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=default_lora_config(r=4, alpha=8, dropout=0.0) if peft else None,
    )


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lora_steps_train_lora_and_so8_and_leave_base_bitwise_unchanged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="so8t_hf"):
        trainer = make_trainer(tmp_path)
    assert "SO(8)" in caplog.text and "trainable parameters" in caplog.text
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    lora = [n for n in before if "lora_" in n]
    so8 = [n for n in before if "so8_rotation.modules_to_save" in n]
    base = [n for n in before if "lora_" not in n and "modules_to_save" not in n]
    assert len(lora) == 2 * 4 * 2  # A and B of qkv/o/gate_up/down in 2 layers
    assert len(so8) == 2
    assert all(not torch.equal(before[n], after[n]) for n in so8), "SO(8) generators did not train"
    assert all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n), "LoRA B did not train"
    assert all(torch.equal(before[n], after[n]) for n in base), "a frozen base parameter changed"
    counts = parameter_groups(trainer.model)
    assert counts["so8"] == 2 * 8 * 8 * 8 and counts["lora"] > 0 and counts["other"] == 0


def test_so8_param_group_and_logged_metrics(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train()
    groups = [g for g in trainer.optimizer.param_groups if g.get("name") == "so8"]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and len(groups[0]["params"]) == 2
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for key in ("loss", "perplexity", "learning_rate", "learning_rate_so8", "grad_norm", "peak_memory_gib",
                "so8_angle_norm", "so8_orthogonality_error", "loss_fallback_steps", "num_tokens"):
        assert key in logs[-1], key
    assert "tokens_per_second" in logs[-1] and logs[-1]["tokens_per_second"] > 0
    assert logs[-1]["so8_angle_norm"] > 0 and logs[-1]["so8_orthogonality_error"] < 1e-6
    assert logs[-1]["loss_fallback_steps"] == 0
    assert math.isclose(logs[0]["perplexity"], math.exp(logs[0]["loss"]), rel_tol=1e-3)
    assert logs[0]["learning_rate_so8"] / logs[0]["learning_rate"] == pytest.approx(5.0)


def test_adapter_save_reload_gives_identical_logits_and_merge_gives_plain_phi3(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any("so8_rotation" in k for k in saved), sorted(saved)[:10]
    model = trainer.model.eval()
    ids = random_ids(2, 15)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(tiny_so8t(seed=0), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    plain = merge_so8t_rotations(reloaded.merge_and_unload())
    assert type(plain) is Phi3ForCausalLM
    with torch.no_grad():
        merged = plain(input_ids=ids).logits
    assert ((merged - expected).norm() / expected.norm()).item() <= 1e-4




def _detach_backbone_output(model):
    decoder = model.model

    def detach(module, args, output):
        output.last_hidden_state = output.last_hidden_state.detach()
        return output

    decoder.register_forward_hook(detach)
    return model


def test_fallback_recovers_a_graph_less_loss_and_params_move(tmp_path):
    model = _detach_backbone_output(tiny_so8t(seed=0))
    trainer = make_trainer(tmp_path, model=model)
    before = snapshot(trainer.model)
    with pytest.warns(UserWarning, match="recomputing it from the last hidden state"):
        trainer.train()
    after = snapshot(trainer.model)
    assert trainer.loss_fallback_steps == 3
    assert trainer.state.log_history[-2]["loss_fallback_steps"] == 3
    moved = [n for n in before if ("lora_B" in n or "modules_to_save" in n) and not torch.equal(before[n], after[n])]
    assert len(moved) == 2 * 4 + 2


def test_fallback_error_policy_raises(tmp_path):
    trainer = make_trainer(tmp_path, model=_detach_backbone_output(tiny_so8t(seed=0)), loss_fallback="error")
    with pytest.raises(LossHasNoGraphError, match="last hidden state has one"):
        trainer.train()


class _UndoInputGrads(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.get_input_embeddings()._forward_hooks.clear()  # every enable_input_require_grads hook


def test_reentrant_checkpointing_with_frozen_inputs_raises_a_clear_error(tmp_path):
    trainer = make_trainer(
        tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True}
    )
    trainer.add_callback(_UndoInputGrads())  # undo transformers' and our prevention to reach the error path
    before = snapshot(trainer.model)
    with pytest.raises(LossHasNoGraphError, match="reentrant gradient checkpointing with frozen input embeddings"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())  # never stepped


def test_checkpointing_defaults_to_non_reentrant_and_reentrant_request_still_trains(tmp_path):
    assert make_args(tmp_path, activation_checkpointing=True).activation_checkpointing_kwargs["use_reentrant"] is False
    trainer = make_trainer(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    before = snapshot(trainer.model)
    trainer.train()
    assert trainer.loss_fallback_steps == 0
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_checkpointing_names_and_aliases_agree_on_any_transformers(tmp_path):
    """activation_checkpointing(_kwargs) win, gradient_checkpointing(_kwargs) fill them when unset; both mirror."""
    cases = [
        ({}, True, False),
        ({"activation_checkpointing": False}, False, False),
        ({"gradient_checkpointing": False}, False, False),
        ({"activation_checkpointing": True, "gradient_checkpointing": False}, True, False),
        ({"gradient_checkpointing_kwargs": {"use_reentrant": True}}, True, True),
        ({"activation_checkpointing_kwargs": '{"use_reentrant": true}'}, True, True),  # the CLI's JSON string
    ]
    for overrides, enabled, reentrant in cases:
        args = make_args(tmp_path, **overrides)
        assert args.activation_checkpointing is args.gradient_checkpointing is enabled, overrides
        assert args.activation_checkpointing_kwargs == args.gradient_checkpointing_kwargs == {"use_reentrant": reentrant}


def _first_update(tmp_path, batch, accumulation):
    trainer = make_trainer(
        tmp_path / f"b{batch}", peft=False, max_steps=1, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5, so8t_learning_rate=0.5,
        dataset=token_dataset(rows=4, seed=3), lr_scheduler_type="constant",
    )
    trainer.train()
    return snapshot(trainer.model)


def test_batch4_acc1_equals_batch2_acc2_on_first_update(tmp_path):
    start = snapshot(tiny_so8t(seed=0))
    a = _first_update(tmp_path, 4, 1)
    b = _first_update(tmp_path, 2, 2)
    changed = [n for n in a if not torch.equal(a[n], start[n])]
    assert len(changed) > 10 and any("so8" in n for n in changed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_resume_from_checkpoint_continues_the_same_loss_curve(tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=2, dataset=token_dataset(rows=12, seed=5))
    full = make_trainer(tmp_path / "full", **common)
    full.train()
    full_losses = [e["loss"] for e in full.state.log_history if "loss" in e]
    resumed = make_trainer(tmp_path / "full", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-3"))
    resumed_losses = [e["loss"] for e in resumed.state.log_history if "loss" in e and e["step"] > 3]
    assert len(full_losses) == 6 and len(resumed_losses) == 3
    assert resumed_losses == pytest.approx(full_losses[3:], rel=1e-5)


def test_bad_lora_targets_raise_with_the_names_that_exist(tmp_path):
    with pytest.raises(ValueError, match=r"\['q_proj', 'v_proj'\] match no module.*qkv_proj"):
        SO8TTrainer(
            model=tiny_so8t(),
            args=make_args(tmp_path),
            train_dataset=token_dataset(),
            processing_class=tiny_tokenizer(),
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]),
        )
    check_lora_targets(tiny_so8t(), ["qkv_proj", "gate_up_proj"])  # the real names pass


def test_so8t_trainable_false_keeps_rotations_frozen_and_unsaved(tmp_path):
    trainer = make_trainer(tmp_path, so8t_trainable=False)
    trainer.train()
    assert parameter_groups(trainer.model)["so8"] == 0
    assert not any("modules_to_save" in n for n, _ in trainer.model.named_parameters())


def test_qlora_on_cpu_is_a_clear_error():
    from so8t_hf.sft import SO8TModelConfig

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(RuntimeError, match="QLoRA needs bitsandbytes on a CUDA GPU"):
        quantization_config(SO8TModelConfig(load_in_4bit=True))


# ----------------------------------------------------------------------------------------- PET


def test_pet_penalty_never_crosses_padding_or_packed_boundaries():
    hidden = torch.zeros(1, 8, 4)
    hidden[0, :4] = torch.arange(4.0)[:, None]  # linear ramp: zero second difference
    hidden[0, 4:] = 100 + torch.arange(4.0)[:, None]  # second sequence, another ramp
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    assert pet_penalty(hidden, position_ids=position_ids).item() == 0.0
    assert pet_penalty(hidden).item() > 1000  # crossing the boundary would be huge
    padded = hidden.clone()
    padded[0, 6:] = 1e4  # padding garbage
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    assert pet_penalty(padded, attention_mask=mask, position_ids=position_ids).item() == 0.0
    curved = hidden.clone()
    curved[0, 2] += 1.0  # one bump inside the first sequence
    # triples (0,1,2) and (1,2,3) see the bump: second differences 1 and -2 per channel, 4 channels
    expected = (4 * 1 + 4 * 4) / 4  # 4 valid triples in total (2 per sequence)
    assert pet_penalty(curved, position_ids=position_ids).item() == pytest.approx(expected)


def test_pet_schedule_and_trainer_term(tmp_path):
    assert [pet_lambda_at(p, 2.0) for p in (0.0, 0.29, 0.3, 0.69, 0.7, 1.0)] == [0.2, 0.2, 1.0, 1.0, 2.0, 2.0]
    trainer = make_trainer(tmp_path, pet_lambda=0.5, max_steps=2)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["pet_lambda"] for e in logs] == pytest.approx([0.05, 0.25])  # progress 0 and 0.5: phases 1 and 2
    assert all(e["pet_loss"] > 0 for e in logs)
    assert all(e["loss"] > e["nll"] for e in logs)


def test_public_api_names_load_lazily():
    import so8t_hf

    assert so8t_hf.SO8TTrainer is SO8TTrainer and so8t_hf.SO8TConfig is SO8TConfig
    assert issubclass(so8t_hf.SO8TConfig, __import__("trl").SFTConfig)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        so8t_hf.nope  # noqa: B018


def test_kbit_preparation_keeps_a_bf16_stream_and_fp32_so8_through_sftrainers_qlora_cast(tmp_path):
    """A quantised base (flagged as such: bitsandbytes needs a GPU) with a trainable lm_head copy, as the
    recipe makes for new tag-token rows: SFTTrainer casts the trainable parameters to bf16, the SO(8)
    generators come back to fp32, and the steps run (an fp32 residual stream would hit a dtype mismatch)."""
    from so8t_hf.training.peft_setup import prepare_kbit_model

    model = prepare_kbit_model(tiny_so8t(seed=0).to(torch.bfloat16), gradient_checkpointing=False)
    assert {p.dtype for n, p in model.named_parameters() if "so8_rotation" not in n} == {torch.bfloat16}
    model.is_loaded_in_8bit = True  # what from_pretrained(quantization_config=8-bit) sets
    config = default_lora_config(r=4, alpha=8, dropout=0.0)
    config.modules_to_save = [*(config.modules_to_save or []), "lm_head"]
    trainer = SO8TTrainer(model=model, args=make_args(tmp_path, max_steps=2), train_dataset=token_dataset(),
                          processing_class=tiny_tokenizer(), peft_config=config)
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    so8 = [n for n in after if "so8_rotation" in n and "modules_to_save" in n]
    assert so8 and all(after[n].dtype == torch.float32 and not torch.equal(before[n], after[n]) for n in so8)
    head = [n for n in after if "lm_head.modules_to_save" in n]
    assert head and all(after[n].dtype == torch.bfloat16 and not torch.equal(before[n], after[n]) for n in head)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
