"""The adapter's SO8T guard (`exclude_modules` = `SO8T_BASE_GUARD`): silent and exact on SO8T-Phi3, a warning naming
SO8T and the fix on a stock Phi-3 (in-process here; `test_round_trip` checks it where so8t_hf cannot be imported),
combined with a user's own `exclude_modules`; and the LM-head wrapper of trainable tag rows that TRL's fused head
can read."""

import re
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import random_ids, tiny_phi3
from transformers import Phi3ForCausalLM

from so8t_hf.modeling import So8tPhi3ForCausalLM
from so8t_hf.training.peft_setup import SO8T_BASE_GUARD, expose_head_bias, prepare_peft_config, with_so8t_base_guard


def _adapter(tmp_path, exclude=None):
    tiny_phi3(seed=4).save_pretrained(tmp_path / "base")
    model = So8tPhi3ForCausalLM.from_pretrained(tmp_path / "base").eval()
    config = LoraConfig(r=4, target_modules=["qkv_proj", "o_proj", "down_proj"], exclude_modules=exclude,
                        trainable_token_indices={"embed_tokens": [120, 121], "lm_head": [120, 121]})
    peft_model = get_peft_model(model, prepare_peft_config(config, model))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = random_ids(1, 12)
    with torch.no_grad():
        return peft_model, ids, peft_model(ids).logits


def _load(base_cls, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base_cls.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    return model, [str(w.message) for w in caught if "exclude_modules" in str(w.message)]


def test_silent_and_exact_on_so8t_loud_on_stock_phi3(tmp_path):
    _, ids, expected = _adapter(tmp_path)
    so8t, warned = _load(So8tPhi3ForCausalLM, tmp_path)
    assert warned == []
    with torch.no_grad():
        assert torch.equal(so8t(ids).logits, expected)
    stock, warned = _load(Phi3ForCausalLM, tmp_path)
    with torch.no_grad():
        assert (stock(ids).logits - expected).abs().max() > 1e-2  # the rotations are gone ...
    assert len(warned) == 1 and "SO8T ADAPTER ON A BASE WITHOUT SO8 ROTATIONS" in warned[0]  # ... and it says so
    assert "trust_remote_code=True" in warned[0] and "So8tPhi3ForCausalLM" in warned[0]


def test_a_users_exclude_modules_still_excludes(tmp_path):
    model, _, _ = _adapter(tmp_path, exclude=["down_proj"])
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert lora == {"qkv_proj", "o_proj"}  # down_proj excluded by the user, still
    guard = model.peft_config["default"].exclude_modules
    assert guard.endswith(SO8T_BASE_GUARD) and re.fullmatch(guard, "model.layers.0.self_attn.so8_rotation")
    assert with_so8t_base_guard(".*mlp.*") == f"(?:.*mlp.*)|{SO8T_BASE_GUARD}"
    assert with_so8t_base_guard(guard) == guard
    stock = prepare_peft_config(LoraConfig(target_modules=["qkv_proj"]), tiny_phi3())
    assert stock.exclude_modules is None and stock.modules_to_save is None  # a stock model: nothing to guard


def test_the_tag_row_head_exposes_what_trls_fused_head_reads(tmp_path):
    model, ids, _ = _adapter(tmp_path)
    head = model.get_output_embeddings()
    with pytest.raises(AttributeError):
        head.bias  # noqa: B018  PEFT's wrapper forwards `weight` only
    expose_head_bias(model)
    assert head.bias is None
    hidden = torch.randn(3, 64)
    torch.testing.assert_close(torch.nn.functional.linear(hidden, head.weight, head.bias), head(hidden))
