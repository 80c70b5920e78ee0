"""GPU checks (run on the device with `pytest -m gpu`): the whole model on the Triton backend equals SDPA in
bf16, bf16 LoRA training keeps SO(8) in fp32 and trains it, QLoRA (4-bit NF4 / 8-bit) trains LoRA + SO(8)."""

import importlib.util

import pytest
import torch
from tiny_models import (
    random_ids,
    randomize_rotations,
    tiny_so8t,
    tiny_tokenizer,
    token_dataset,
)

from so8t_hf import force_attention_backend, last_backend
from so8t_hf.training.peft_setup import (
    default_lora_config,
    prepare_kbit_model,
    quantization_config,
)
from so8t_hf.training.trainer import SO8TConfig, SO8TTrainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
# Phi-3.5-like head geometry at a small width: head dim 96, GQA off (as Phi-3.5), 2 layers
WIDE = dict(hidden_size=768, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1536, max_position_embeddings=4096)


def test_whole_model_triton_equals_sdpa_in_bf16():
    model = tiny_so8t(seed=1, attn_implementation="so8t", **WIDE)
    randomize_rotations(model)
    model = model.to("cuda", torch.bfloat16)
    ids = random_ids(2, 777, seed=2).cuda()
    with torch.no_grad():
        with force_attention_backend("sdpa"):
            ref = model(ids).logits.float()
        with force_attention_backend("triton"):
            got = model(ids).logits.float()
        assert last_backend() == "triton"
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2


def _args(tmp_path, **overrides):
    return SO8TConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                      so8t_learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], bf16=True,
                      max_length=256, packing=True, disable_tqdm=True, **overrides)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_bf16_lora_training_trains_fp32_so8_and_uses_a_fast_backend(tmp_path):
    model = tiny_so8t(seed=3, attn_implementation="so8t", **WIDE).to("cuda", torch.bfloat16)
    for r in model.so8_rotations().values():
        r.float()
    trainer = SO8TTrainer(model=model, args=_args(tmp_path), train_dataset=token_dataset(rows=64, min_len=40, max_len=200),
                          processing_class=tiny_tokenizer(), peft_config=default_lora_config(r=8))
    before = _snapshot(trainer.model)
    trainer.train()
    after = _snapshot(trainer.model)
    so8 = [n for n in before if "modules_to_save" in n and "so8" in n]
    assert so8 and all(after[n].dtype == torch.float32 and not torch.equal(before[n], after[n]) for n in so8)
    assert last_backend() in ("torch_varlen", "triton")  # packed rows on CUDA take a varlen kernel
    assert trainer.loss_fallback_steps == 0


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_lora_and_so8_on_a_quantized_base(tmp_path, bits):
    from so8t_hf import So8tPhi3ForCausalLM

    source = tiny_so8t(seed=4, **WIDE)
    source.save_pretrained(tmp_path / "base")
    model = So8tPhi3ForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quantization_config(bits), dtype=torch.bfloat16, device_map={"": 0},
        attn_implementation="so8t",
    )
    model = prepare_kbit_model(model)
    trainer = SO8TTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=token_dataset(rows=32, min_len=40, max_len=120),
                          processing_class=tiny_tokenizer(), peft_config=default_lora_config(r=8))
    before = _snapshot(trainer.model)
    trainer.train()
    after = _snapshot(trainer.model)
    moved = [n for n in before if ("lora_B" in n or "modules_to_save" in n) and not torch.equal(before[n], after[n])]
    assert any("so8" in n for n in moved) and any("lora_B" in n for n in moved)
    for name, param in trainer.model.named_parameters():
        if "so8_rotation" in name:
            assert param.dtype == torch.float32, name
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert last_backend() in ("torch_varlen", "triton")  # a bf16 stream: packed rows take a varlen kernel, not fp32
