"""Fixtures of the export tests: a trained-looking tiny run (`out/adapter`, `out/final`) on a stock tiny Phi-3 base
with LongRoPE scaling, the shipped byte-level tiny tokenizer with the thinking tags and chat template, a LoRA on
every linear layer, non-identity SO(8) rotations and trained tag rows; and the trained model's fp32 logits."""

from types import SimpleNamespace

import pytest
import torch
from tiny_models import TINY, tiny_phi3

HEAD_DIM = TINY["hidden_size"] // TINY["num_attention_heads"]  # 16: LongRoPE factors of 8 values
LONGROPE = dict(max_position_embeddings=256, original_max_position_embeddings=64,
                rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
                              "long_factor": [2.0 + 0.5 * i for i in range(HEAD_DIM // 2)]})


def build_run(root):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from so8t_hf.modeling import So8tPhi3ForCausalLM
    from so8t_hf.thinking.chat_template import add_thinking_tokens, apply_thinking_chat_template
    from so8t_hf.thinking.data import tiny_tokenizer_path
    from so8t_hf.training.peft_setup import prepare_peft_config

    tokenizer = apply_thinking_chat_template(AutoTokenizer.from_pretrained(tiny_tokenizer_path()))
    tag_ids = sorted(add_thinking_tokens(tokenizer)["token_ids"].values())
    rows = -(-len(tokenizer) // 64) * 64  # spare rows, as the tiny recipe gives its model
    overrides = dict(vocab_size=rows, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, **LONGROPE)
    tiny_phi3(seed=3, **overrides).save_pretrained(root / "base")
    model = So8tPhi3ForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                        trainable_token_indices={"embed_tokens": tag_ids, "lm_head": tag_ids})
    trained = get_peft_model(model, prepare_peft_config(config, model)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:  # LoRA A and B, SO(8) generators, tag rows: all away from their start
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    out = root / "run"
    trained.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
    ids = torch.tensor([prompt + tag_ids[:2] + tokenizer.encode(" four", add_special_tokens=False)])
    with torch.no_grad():
        logits = trained(ids).logits
    final = trained.merge_and_unload()
    assert any(p.abs().sum() > 0 for n, p in final.named_parameters() if "so8_rotation" in n)
    final.save_pretrained(out / "final")
    tokenizer.save_pretrained(out / "final")
    return SimpleNamespace(root=root, base=root / "base", out=out, final=out / "final", adapter=out / "adapter",
                           ids=ids, logits=logits, tokenizer=tokenizer, tag_ids=tag_ids, rows=rows)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="session")
def plain_fp32(tiny_run, tmp_path_factory):
    """The HF export of the run in float32 (its state dict is what every GGUF tensor must equal)."""
    from transformers import AutoModelForCausalLM

    from so8t_hf.cli import main

    folder = tmp_path_factory.mktemp("plain") / "plain"
    assert main(["export", str(tiny_run.out), "--output", str(folder), "--dtype", "float32"]) == 0
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
