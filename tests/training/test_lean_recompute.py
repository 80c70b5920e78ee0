"""Lean recompute: checkpointing's recompute of a Phi-3 decoder layer skips the fused `mlp.down_proj` matmul (its
output is never read there), and every gradient stays bit-equal to the full recompute."""

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

from so8t_hf.training.fused_lora import enable_fused_lora, lean_recompute
from tiny_models import random_ids, randomize_rotations, tiny_so8t, tiny_tokenizer, token_dataset


def _lora_model(lean: bool, checkpointing: str | None):
    model = tiny_so8t(seed=0)
    randomize_rotations(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
            if "so8_rotation" in name:
                param.requires_grad_(True)  # trained beside the adapters, as the trainer does
    enable_fused_lora(model)
    marked = lean_recompute(model) if lean else 0
    if checkpointing:
        if checkpointing == "reentrant":
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    model.train()
    return model, marked


def _down_matmuls(model) -> list[int]:
    """Count the base-weight reads (one per matmul with W) of every mlp.down_proj."""
    counts = []
    for module in model.modules():
        down = getattr(getattr(module, "mlp", None), "down_proj", None)
        if down is not None and hasattr(down, "_so8t_weight_fn"):
            counts.append(0)
            index, weight_fn = len(counts) - 1, down._so8t_weight_fn

            def counted(index=index, weight_fn=weight_fn):
                counts[index] += 1
                return weight_fn()

            down._so8t_weight_fn = counted
    return counts


def _grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", ["non_reentrant", "reentrant", None])
def test_lean_recompute_skips_the_down_matmul_and_keeps_every_gradient(checkpointing):
    ids = random_ids(2, 12)
    full, _ = _lora_model(lean=False, checkpointing=checkpointing)
    lean, marked = _lora_model(lean=True, checkpointing=checkpointing)
    assert marked == 2  # both decoder layers
    full_calls, lean_calls = _down_matmuls(full), _down_matmuls(lean)
    (loss_full, g_full), (loss_lean, g_lean) = _grads(full, ids), _grads(lean, ids)
    assert torch.equal(loss_full, loss_lean)
    assert g_full.keys() == g_lean.keys()
    assert any("so8_rotation" in n for n in g_full) and any("down_proj.lora_A" in n for n in g_full)
    for name in g_full:
        assert torch.equal(g_full[name], g_lean[name]), name
    if checkpointing:  # forward, recompute and backward (dx = dy @ W) read W; the lean recompute does not
        assert full_calls == [3, 3] and lean_calls == [2, 2]
    else:  # nothing is recomputed: the mark changes nothing
        assert full_calls == lean_calls == [2, 2]


def test_only_phi3_layers_whose_mlp_ends_in_down_proj_are_marked(caplog):
    model, _ = _lora_model(lean=False, checkpointing=None)
    layers = [m for m in model.modules() if hasattr(m, "post_attention_layernorm")]
    layers[1].mlp.forward = lambda x: layers[1].mlp.down_proj(x[..., :128]) * 2  # another MLP: its output is read
    with caplog.at_level(logging.INFO, logger="so8t_hf"):
        assert lean_recompute(model) == 1
    assert "lean recompute: 1 decoder layers" in caplog.text
    downs = [layer.mlp.down_proj for layer in layers]
    assert getattr(downs[0], "_so8t_unused_in_recompute", False) and not hasattr(downs[1], "_so8t_unused_in_recompute")

    plain, _ = _lora_model(lean=False, checkpointing=None)
    from so8t_hf.training.fused_lora import disable_fused_lora

    disable_fused_lora(plain)
    assert lean_recompute(plain) == 0  # on PEFT's own forward: nothing to skip


def test_outside_a_backward_the_marked_layer_computes_its_output():
    model, _ = _lora_model(lean=True, checkpointing="non_reentrant")
    reference, _ = _lora_model(lean=False, checkpointing="non_reentrant")
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


def test_trainer_switch(tmp_path):
    from so8t_hf.training.peft_setup import default_lora_config
    from so8t_hf.training.trainer import SO8TConfig, SO8TTrainer

    def trainer(lean):
        args = SO8TConfig(output_dir=str(tmp_path / lean), max_steps=1, per_device_train_batch_size=4, report_to=[],
                          use_cpu=True, max_length=64, save_strategy="no", disable_tqdm=True, fused_lora="on",
                          lean_recompute=lean)
        return SO8TTrainer(model=tiny_so8t(seed=0), args=args, train_dataset=token_dataset(),
                           processing_class=tiny_tokenizer(), peft_config=default_lora_config(r=4, alpha=8, dropout=0.0))

    assert SO8TConfig(output_dir=str(tmp_path), use_cpu=True).lean_recompute == "auto"
    assert trainer("auto").fused_lora_counts["lean_recompute"] == 2
    assert "lean_recompute" not in trainer("off").fused_lora_counts
    with pytest.raises(ValueError, match="lean_recompute"):
        SO8TConfig(output_dir=str(tmp_path), use_cpu=True, lean_recompute="maybe")
