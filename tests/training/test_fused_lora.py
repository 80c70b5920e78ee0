"""PEFT LoRA layers on the fused LoRA linear: equal to PEFT's layer (outputs and gradients), PEFT's own forward
wherever the fused path does not apply, and the trainer's `fused_lora` switch keeps the loss curve."""

import copy
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

from so8t_hf.ops.fast_lora import lora_linear
from so8t_hf.training.fused_lora import disable_fused_lora, enable_fused_lora, fused_lora_kinds


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 24, bias=True), torch.nn.Linear(24, 16, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _peft_pair(dropout=0.0):
    torch.manual_seed(0)
    model = get_peft_model(_Block(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["up", "down"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)  # PEFT starts B at zero: make the adapter count
    return model, copy.deepcopy(model)


def _run(model, x):
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_peft_layers_on_the_fused_path_equal_peft(caplog):
    peft, fused = _peft_pair()
    with caplog.at_level(logging.INFO, logger="so8t_hf"):
        assert enable_fused_lora(fused) == {"nf4": 0, "dense": 2, "unsupported": 0, "off": 0}
    assert "fused LoRA: 0 4-bit" in caplog.text and "2 float-base LoRA layers" in caplog.text
    x = torch.randn(3, 5, 16)
    (o1, g1), (o2, g2) = _run(peft, x), _run(fused, x)
    torch.testing.assert_close(o2, o1, atol=1e-6, rtol=1e-5)
    assert g1.keys() == g2.keys() and any("lora_A" in n for n in g1)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=2e-5, rtol=1e-5, msg=n)  # fp32 sums in another order
    assert disable_fused_lora(fused) == 2 and "forward" not in fused.base_model.model.up.__dict__
    assert enable_fused_lora(fused, kinds=("nf4",)) == {"nf4": 0, "dense": 0, "unsupported": 0, "off": 2}


def test_cases_the_fused_path_does_not_cover_take_peft_forward(monkeypatch):
    import so8t_hf.training.fused_lora as fl

    calls = []
    monkeypatch.setattr(fl, "lora_linear", lambda *a, **k: calls.append(1) or lora_linear(*a, **k))
    peft, fused = _peft_pair(dropout=0.5)
    enable_fused_lora(fused)
    x = torch.randn(2, 3, 16)
    fused.train()
    fused(x)
    assert calls == []  # dropout in training: PEFT's forward
    fused.eval()
    peft.eval()
    torch.testing.assert_close(fused(x), peft(x))
    assert len(calls) == 2  # eval: dropout is identity, fused
    calls.clear()
    with fused.disable_adapter():
        fused(x)
    assert calls == []


@pytest.mark.parametrize("switch", ["on", "off"])
def test_trainer_switch_keeps_the_loss_curve(tmp_path, switch):
    from tiny_models import tiny_so8t, tiny_tokenizer, token_dataset

    from so8t_hf.training.peft_setup import default_lora_config
    from so8t_hf.training.trainer import SO8TConfig, SO8TTrainer

    def losses(fused_lora):
        args = SO8TConfig(output_dir=str(tmp_path / fused_lora), max_steps=3, per_device_train_batch_size=4,
                          learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                          max_length=64, seed=0, dataloader_num_workers=0, disable_tqdm=True, fused_lora=fused_lora)
        trainer = SO8TTrainer(model=tiny_so8t(seed=0), args=args, train_dataset=token_dataset(),
                              processing_class=tiny_tokenizer(), peft_config=default_lora_config(r=4, alpha=8, dropout=0.0))
        trainer.train()
        return trainer, [e["loss"] for e in trainer.state.log_history if "loss" in e]

    trainer, curve = losses(switch)
    if switch == "on":
        assert trainer.fused_lora_counts == {"nf4": 0, "dense": 8, "unsupported": 0, "off": 0,
                                           "lean_recompute": 2}  # 2 layers x 4 targets; 2 down_proj
        _, reference = losses("off")
        assert len(curve) == 3
        for got, want in zip(curve, reference):
            assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (curve, reference)
    else:
        assert trainer.fused_lora_counts is None  # 'off', and 'auto' on a CPU run


def test_auto_fuses_float_and_4bit_bases_on_cuda_only():
    assert fused_lora_kinds("auto", on_cuda=True) == ("nf4", "dense")
    assert fused_lora_kinds("auto", on_cuda=False) is None
    assert fused_lora_kinds("on", on_cuda=False) == ("nf4", "dense")
    assert fused_lora_kinds("off", on_cuda=True) is None
