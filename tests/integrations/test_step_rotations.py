"""Training forwards compute every layer's SO(8) rotation once (`So8tPhi3Model.step_rotations`), outside the
checkpointed layers: the same logits and gradients as the per-layer path, one exponential per forward (none in the
recompute), and the PEFT copy of each rotation is the one that trains."""

import copy

import pytest
import torch
from tiny_models import random_ids, randomize_rotations, tiny_so8t

import so8t_hf.modeling.modeling_so8t_phi3 as modeling
from so8t_hf.modeling import So8Rotation
from so8t_hf.training.peft_setup import default_lora_config, prepare_peft_config


def _count(monkeypatch):
    calls = {"step": 0, "per_layer": 0}
    step_exp, per_layer = modeling.so8_exp, So8Rotation.rotation_matrices

    def counting_exp(theta):
        calls["step"] += 1
        return step_exp(theta)

    def counting_per_layer(self):
        calls["per_layer"] += 1
        return per_layer(self)

    monkeypatch.setattr(modeling, "so8_exp", counting_exp)
    monkeypatch.setattr(So8Rotation, "rotation_matrices", counting_per_layer)
    return calls


def _train_pass(model, ids, labels):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("exp_backend", ["torch", "triton"])
def test_step_rotations_equal_the_per_layer_path(monkeypatch, checkpointing, exp_backend):
    pytest.importorskip("triton") if exp_backend == "triton" else None
    monkeypatch.setenv("SO8T_ROTATION_EXP", exp_backend)
    device = "cuda" if exp_backend == "triton" and torch.cuda.is_available() else "cpu"  # else Triton's interpreter
    ref = tiny_so8t(seed=3, num_hidden_layers=3).to(device)
    randomize_rotations(ref, scale=0.5)
    fast = copy.deepcopy(ref)
    ref.model.so8t_step_rotations = False
    for model in (ref, fast):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = random_ids(2, 19, seed=4).to(device)
    calls = _count(monkeypatch)
    logits_r, grads_r = _train_pass(ref, ids, ids)
    assert calls == {"step": 0, "per_layer": 3 * (2 if checkpointing else 1)}  # forward (+ recompute) per layer
    calls.update(step=0, per_layer=0)
    logits_f, grads_f = _train_pass(fast, ids, ids)
    assert calls == {"step": 1, "per_layer": 0}  # one exponential for all layers; the recompute reuses it
    torch.testing.assert_close(logits_f, logits_r, rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_r.keys() and any("so8_rotation" in n for n in grads_f)
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=1e-4, atol=1e-6, msg=name)


def test_evaluation_forwards_keep_the_value_cache(monkeypatch):
    model = tiny_so8t(seed=5)
    randomize_rotations(model)
    calls = _count(monkeypatch)
    with torch.no_grad():
        model.eval()(random_ids(1, 7))
        model(random_ids(1, 7))
    assert calls == {"step": 0, "per_layer": 2}  # once per layer, then cached on theta's values


def test_the_peft_copy_of_each_rotation_gets_the_step_rotation_and_trains(monkeypatch):
    from peft import get_peft_model

    base = tiny_so8t(seed=6)
    randomize_rotations(base)
    config = prepare_peft_config(default_lora_config(r=4, dropout=0.0), base)
    model = get_peft_model(base, config).train()
    used = []
    forward = So8Rotation.forward

    def spy(self, x, rotations=None):
        used.append((self.theta.requires_grad, rotations is not None and self in rotations))
        return forward(self, x, rotations=rotations)

    monkeypatch.setattr(So8Rotation, "forward", spy)
    ids = random_ids(1, 11, seed=7)
    model(input_ids=ids, labels=ids).loss.backward()
    assert used == [(True, True)] * 2  # the trainable copy ran, with its precomputed R
    trained = [n for n, p in model.named_parameters() if "so8_rotation" in n and p.grad is not None]
    assert trained and all("modules_to_save" in n for n in trained)
    assert all(p.grad.abs().max() > 0 for n, p in model.named_parameters() if n in trained)


def test_reentrant_checkpointing_computes_the_rotations_per_layer(monkeypatch):
    # reentrant checkpointing backpropagates each layer on its own: a shared R's graph would run once per layer
    ref = tiny_so8t(seed=8)
    randomize_rotations(ref)
    fast = copy.deepcopy(ref)
    ref.model.so8t_step_rotations = False
    for model in (ref, fast):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    ids = random_ids(1, 9, seed=9)
    calls = _count(monkeypatch)
    _, grads_f = _train_pass(fast, ids, ids)
    assert calls["step"] == 0 and calls["per_layer"] == 4
    _, grads_r = _train_pass(ref, ids, ids)
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], msg=name)
