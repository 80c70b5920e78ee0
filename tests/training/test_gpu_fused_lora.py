"""GPU checks (`pytest -m gpu`) of the fused LoRA path on real bitsandbytes NF4 layers with PEFT LoRA: outputs and
gradients against an fp32 reference within the tolerance rule (at most 2x the error of PEFT's own bf16 path), and
the QLoRA trainer on the fused path by default, following the unfused loss curve."""

import importlib.util

import pytest
import torch
from tiny_models import tiny_so8t, tiny_tokenizer, token_dataset

from so8t_hf.training.fused_lora import disable_fused_lora, enable_fused_lora

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed"),
]


def _nf4_block():
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            kw = dict(bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
            self.up, self.down = bnb.nn.Linear4bit(256, 384, **kw), bnb.nn.Linear4bit(384, 256, **kw)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    block = Block().cuda()  # quantises here
    model = get_peft_model(block, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["up", "down"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _fp32_reference(model, x):
    """The same block in fp32 from the dequantised weights: output and grads of x, every lora_A / lora_B."""
    import bitsandbytes.functional as F

    x = x.detach().float().requires_grad_()
    h = x
    grads = {}
    params = {}
    for name in ("up", "down"):
        layer = getattr(model.base_model.model, name)
        w = F.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
        a = layer.lora_A["default"].weight.detach().float().requires_grad_()
        b = layer.lora_B["default"].weight.detach().float().requires_grad_()
        params[name] = (a, b)
        h = h @ w.t() + layer.scaling["default"] * (h @ a.t()) @ b.t()
        if name == "up":
            h = torch.relu(h)
    h.float().square().mean().backward()
    for name, (a, b) in params.items():
        grads[f"{name}.lora_A"], grads[f"{name}.lora_B"] = a.grad, b.grad
    grads["x"] = x.grad
    return h.detach(), grads


def _bf16_run(model, x):
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    grads = {"x": x.grad}
    for name in ("up", "down"):
        layer = getattr(model.base_model.model, name)
        grads[f"{name}.lora_A"] = layer.lora_A["default"].weight.grad.clone()
        grads[f"{name}.lora_B"] = layer.lora_B["default"].weight.grad.clone()
    return out.detach(), grads


def test_fused_nf4_lora_meets_the_tolerance_rule_against_peft():
    model = _nf4_block()
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    ref_out, ref_grads = _fp32_reference(model, x)
    peft_out, peft_grads = _bf16_run(model, x)
    assert enable_fused_lora(model) == {"nf4": 2, "dense": 0, "unsupported": 0, "off": 0}
    fused_out, fused_grads = _bf16_run(model, x)
    assert disable_fused_lora(model) == 2

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()

    assert err(fused_out, ref_out) <= 2 * err(peft_out, ref_out) + 1e-6, (err(fused_out, ref_out), err(peft_out, ref_out))
    for name, ref in ref_grads.items():
        assert fused_grads[name].dtype == peft_grads[name].dtype, name
        e_fused, e_peft = err(fused_grads[name], ref), err(peft_grads[name], ref)
        assert e_fused <= 2 * e_peft + 1e-3 * ref.abs().max().item(), (name, e_fused, e_peft)


def test_qlora_trainer_runs_fused_by_default_and_follows_the_unfused_curve(tmp_path):
    from so8t_hf import So8tPhi3ForCausalLM
    from so8t_hf.sft import SO8TModelConfig
    from so8t_hf.training.peft_setup import default_lora_config, prepare_kbit_model, quantization_config
    from so8t_hf.training.trainer import SO8TConfig, SO8TTrainer

    source = tiny_so8t(seed=4, hidden_size=768, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1536)
    source.save_pretrained(tmp_path / "base")

    def run(fused_lora):
        model = So8tPhi3ForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=quantization_config(SO8TModelConfig(
                load_in_4bit=True, use_bnb_nested_quant=True)), dtype=torch.bfloat16, device_map={"": 0},
            attn_implementation="so8t")
        model = prepare_kbit_model(model)
        args = SO8TConfig(output_dir=str(tmp_path / fused_lora), max_steps=4, per_device_train_batch_size=4,
                          learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], bf16=True,
                          max_length=128, seed=0, dataloader_num_workers=0, disable_tqdm=True, packing=True,
                          fused_lora=fused_lora)
        trainer = SO8TTrainer(model=model, args=args, train_dataset=token_dataset(rows=32, min_len=40, max_len=120),
                              processing_class=tiny_tokenizer(), peft_config=default_lora_config(r=8, dropout=0.0))
        trainer.train()
        return trainer, [e["loss"] for e in trainer.state.log_history if "loss" in e]

    fused, fused_curve = run("auto")
    assert fused.fused_lora_counts["nf4"] == 8  # 2 layers x qkv / o / gate_up / down
    _, curve = run("off")
    assert len(fused_curve) == len(curve) == 4
    for got, want in zip(fused_curve, curve):
        assert abs(got - want) <= 0.02 * abs(want), (fused_curve, curve)
