"""Optimizer-in-backward on the tiny pre-training config (CPU): the same training as one torch AdamW after the
backward (losses, gradient norms, learning rates, weights), every trainable parameter moved, no gradient left after
a step, the LR scheduler driving every per-parameter optimizer, and each setting it cannot run with refused."""

import math
from types import SimpleNamespace

import pytest
import torch
from paths import REPO
from transformers import TrainerCallback

from so8t_hf.pretrain import make_parser, run_pretrain
from so8t_hf.pretrain.optimizer_in_backward import (
    STATE_KEY,
    OptimizerInBackward,
    build_optimizer_in_backward,
    check_optimizer_in_backward,
)

CONFIG = REPO / "recipes" / "configs" / "pretrain_tiny.yaml"
OIB = ["--optimizer_in_backward", "true"]  # the tiny config's default, stated
PLAIN_STEP = ["--gradient_accumulation_steps", "1", "--max_grad_norm", "0"]  # what optimizer-in-backward needs
AFTER_BACKWARD = ["--optimizer_in_backward", "false"]  # one optimizer step after the backward


def parse(*flags):
    return make_parser().parse_args_and_config(["--config", str(CONFIG), *flags])


class Probe(TrainerCallback):
    """The initial weights, each step's logs, and, after each step, whether gradients remain and the learning rate of
    every per-parameter optimizer against the scheduler's."""

    def __init__(self):
        self.initial, self.logs, self.grads_left, self.lrs = None, [], [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self.grads_left.append(sum(p.grad is not None for p in model.parameters()))
        inner = getattr(optimizer, "optimizer", optimizer)
        if isinstance(inner, OptimizerInBackward):
            per_parameter = {g["lr"] for o in inner.optimizers.values() for g in o.param_groups}
            self.lrs.append((per_parameter, lr_scheduler.get_last_lr()[0]))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def _train(tmp_path, name, *flags):
    probe = Probe()
    model, data, args = parse("--output_dir", str(tmp_path / name), "--max_steps", "5", "--eval_blocks", "0",
                              "--save_strategy", "no", "--warmup_steps", "2", *PLAIN_STEP, *flags)
    run_pretrain(model, data, args, callbacks=[probe])
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / name / "final", trust_remote_code=True)
    return probe, dict(final.named_parameters())


def test_matches_a_plain_adamw_step_and_moves_every_parameter(tmp_path):
    plain, plain_params = _train(tmp_path, "plain", *AFTER_BACKWARD)
    oib, oib_params = _train(tmp_path, "oib", *OIB)
    assert len(oib.logs) == len(plain.logs) == 5
    for a, b in zip(plain.logs, oib.logs):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (a, b)  # from the hooks, per step
        assert math.isclose(a["learning_rate"], b["learning_rate"], rel_tol=1e-6), (a, b)
    assert len({round(e["learning_rate"], 12) for e in oib.logs}) == 5  # warm-up then cosine: it changes every step
    for name, value in oib_params.items():
        torch.testing.assert_close(value, plain_params[name], rtol=1e-4, atol=1e-6, msg=name)
        assert not torch.equal(value, oib.initial[name]), f"{name} did not train"
    assert oib.grads_left == [0] * 5  # the hooks dropped every gradient: no gradient buffer between steps
    assert plain.grads_left == [0] * 5  # (the Trainer zeroes them too; the point is the oib run never holds them all)
    # the scheduler's rate is every per-parameter optimizer's rate, and it moved
    assert all(rates == {last} for rates, last in oib.lrs), oib.lrs
    assert len({last for _, last in oib.lrs}) == 5


def test_the_hooks_step_during_backward_and_report_the_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    named = [(n, p, {"weight_decay": 0.0}) for n, p in model.named_parameters()]
    reference = [p.detach().clone() for p in model.parameters()]
    wrapper = OptimizerInBackward(named, torch.optim.SGD, {"lr": 0.1})
    x = torch.randn(3, 4)
    model(x).square().sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(p, r) for p, r in zip(model.parameters(), reference))  # stepped without step()
    assert wrapper.hook_calls == 4
    # SGD: w - lr * g, so the gradient norm is |w_before - w_after| / lr
    expected = torch.sqrt(sum(((r - p.detach()) / 0.1).square().sum() for p, r in zip(model.parameters(), reference)))
    torch.testing.assert_close(wrapper.pop_grad_norm(), expected, rtol=1e-5, atol=1e-6)
    assert wrapper.pop_grad_norm().item() == 0.0 and wrapper.hook_calls == 0
    assert len(wrapper.param_groups) == 4 and wrapper.step() is None
    wrapper.remove_hooks()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # hooks gone: gradients stay


def test_state_dict_round_trips_every_per_parameter_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    wrapper = OptimizerInBackward([(n, p, {"weight_decay": 0.1}) for n, p in model.named_parameters()],
                                  torch.optim.AdamW, {"lr": 1e-2})
    model(torch.randn(2, 4)).sum().backward()
    saved = wrapper.state_dict()
    assert set(saved[STATE_KEY]) == {"weight", "bias"}
    assert saved[STATE_KEY]["weight"]["state"][0]["exp_avg"].shape == (3, 4)
    other = torch.nn.Linear(4, 3)
    restored = OptimizerInBackward([(n, p, {"weight_decay": 0.1}) for n, p in other.named_parameters()],
                                   torch.optim.AdamW, {"lr": 1e-2})
    restored.load_state_dict(saved)
    torch.testing.assert_close(restored.optimizers["weight"].state[other.weight]["exp_avg"],
                               wrapper.optimizers["weight"].state[model.weight]["exp_avg"])
    assert restored.param_groups[0] is restored.optimizers["weight"].param_groups[0]  # the scheduler's dicts, again
    assert restored.state[other.bias]["step"] == 1
    with pytest.raises(ValueError, match="saved without optimizer_in_backward"):
        restored.load_state_dict(torch.optim.AdamW(other.parameters()).state_dict())
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({STATE_KEY: {"weight": saved[STATE_KEY]["weight"]}})


@pytest.mark.parametrize("flags, match", [
    (["--gradient_accumulation_steps", "2", "--max_grad_norm", "0"], "gradient_accumulation_steps=2"),
    (["--gradient_accumulation_steps", "1", "--max_grad_norm", "1.0"], "max_grad_norm=1.0"),
])
def test_settings_it_cannot_run_with_are_refused_at_parse_time(flags, match):
    with pytest.raises(ValueError, match=match):
        parse(*OIB, *flags)


def test_several_processes_and_fp16_are_refused():
    args = SimpleNamespace(gradient_accumulation_steps=1, max_grad_norm=0.0, fp16=False, deepspeed=None, fsdp=None)
    check_optimizer_in_backward(args, world_size=1)
    with pytest.raises(ValueError, match="2 processes.*one process"):
        check_optimizer_in_backward(args, world_size=2)
    with pytest.raises(ValueError, match="fp16=true.*bf16"):
        check_optimizer_in_backward(SimpleNamespace(**{**vars(args), "fp16": True}))


def test_an_optimizer_not_built_from_param_groups_is_refused(monkeypatch):
    from transformers import Trainer

    model = torch.nn.Linear(4, 3)
    args = SimpleNamespace(gradient_accumulation_steps=1, max_grad_norm=0.0, fp16=False, deepspeed=None, fsdp=None,
                           world_size=1, optim="lomo", learning_rate=1e-3, weight_decay=0.0)
    trainer = SimpleNamespace(args=args, optimizer_cls_and_kwargs=None, get_decay_parameter_names=lambda m: [])
    monkeypatch.setattr(Trainer, "get_optimizer_cls_and_kwargs",
                        staticmethod(lambda a, m: (torch.optim.SGD, {"model": m, "lr": 1e-3})))
    with pytest.raises(ValueError, match="optim='lomo'.*replaces model"):
        build_optimizer_in_backward(trainer, model)
    monkeypatch.setattr(Trainer, "get_optimizer_cls_and_kwargs", staticmethod(lambda a, m: (torch.optim.SGD, {"lr": 1})))
    assert isinstance(build_optimizer_in_backward(trainer, model), OptimizerInBackward)


def test_a_passed_optimizer_is_refused(tmp_path):
    from so8t_hf.pretrain.pipeline import PretrainTrainer, build_data, build_model, build_tokenizer, prepare_training_args

    model_args, data_args, args = parse("--output_dir", str(tmp_path), "--eval_blocks", "0", *PLAIN_STEP, *OIB)
    tokenizer = build_tokenizer(model_args)
    train, _ = build_data(data_args, tokenizer, prepare_training_args(args, False, False), args.seed)
    model = build_model(model_args, tokenizer, device="cpu")
    with pytest.raises(ValueError, match="optimizers=..."):
        PretrainTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                        optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


def test_bitsandbytes_8bit_adamw_per_parameter_keeps_embeddings_32bit_and_matches(tmp_path):
    pytest.importorskip("bitsandbytes")
    plain, plain_params = _train(tmp_path, "plain", "--optim", "adamw_bnb_8bit", *AFTER_BACKWARD)
    states = {}

    class States(TrainerCallback):
        def on_train_end(self, args, state, control, optimizer=None, **kwargs):
            inner = optimizer.optimizer
            states.update({n: o.state[next(iter(o.state))]["state1"].dtype for n, o in inner.optimizers.items()})

    oib, oib_params = _train(tmp_path, "oib", "--optim", "adamw_bnb_8bit", *OIB)
    model, data, args = parse("--output_dir", str(tmp_path / "states"), "--max_steps", "1", "--eval_blocks", "0",
                              "--save_strategy", "no", "--optim", "adamw_bnb_8bit", *PLAIN_STEP, *OIB)
    run_pretrain(model, data, args, callbacks=[States()])
    assert states["model.embed_tokens.weight"] == torch.float32  # the Trainer's rule: embeddings in 32 bits
    assert states["model.layers.0.self_attn.qkv_proj.weight"] == torch.uint8  # the rest in 8 bits
    for a, b in zip(plain.logs, oib.logs):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
    for name, value in oib_params.items():
        torch.testing.assert_close(value, plain_params[name], rtol=1e-3, atol=1e-5, msg=name)
        assert not torch.equal(value, oib.initial[name]), f"{name} did not train"
