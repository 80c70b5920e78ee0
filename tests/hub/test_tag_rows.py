"""The new tag tokens train through PEFT's `trainable_token_indices` on `embed_tokens` and `lm_head`: after the
recipe run, those rows of the merged model moved from their mean initialisation and equal the adapter's trained
rows, every other row equals the base, and the Phi-3.5-shaped adapter holds 2 x 8 rows instead of a full head."""

import torch
from hub_helpers import TAG_IDS
from safetensors.torch import load_file

from so8t_hf.modeling import So8tPhi3Config, So8tPhi3ForCausalLM
from so8t_hf.sft.config import SO8TModelConfig
from so8t_hf.sft.pipeline import lora_config
from so8t_hf.training.peft_setup import prepare_peft_config


def test_new_rows_train_and_merge_others_stay(hub_run):
    base = load_file(str(hub_run.base / "model.safetensors"))
    final = load_file(str(hub_run.out / "final/model.safetensors"))
    adapter = load_file(str(hub_run.out / "adapter/adapter_model.safetensors"))
    others = [i for i in range(32064) if i not in TAG_IDS]
    for name, module in (("model.embed_tokens.weight", "model.embed_tokens"), ("lm_head.weight", "lm_head")):
        assert torch.equal(final[name][others], base[name][others]), name  # untouched rows, bit for bit
        trained = adapter[f"base_model.model.{module}.token_adapter.trainable_tokens_delta"]
        torch.testing.assert_close(final[name][TAG_IDS], trained.to(final[name].dtype), rtol=0, atol=0)  # merged
        mean = base[name][:32011].float().mean(0)  # where make_room_for_tokens started them
        moved = (final[name][TAG_IDS].float() - mean).abs().amax(dim=1)
        assert (moved > 1e-4).all(), (name, moved)


def _trainable_parts(config, peft_config) -> dict[str, int]:
    from peft import get_peft_model

    with torch.device("meta"):
        model = So8tPhi3ForCausalLM(config)
    model = get_peft_model(model, prepare_peft_config(peft_config, model))
    parts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = ("lora" if "lora_" in name else "so8" if "so8_rotation" in name
                    else "tag rows" if "trainable_tokens" in name else name)
            parts[part] = parts.get(part, 0) + param.numel()
    return parts


def test_phi35_shaped_adapter_trains_tag_rows_not_a_head_copy():
    """Counted on the meta device (no memory): Phi-3.5-mini's shape, the recipe's LoRA (r16, all linear)."""
    config = So8tPhi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    now = _trainable_parts(config, lora_config(SO8TModelConfig(), TAG_IDS))
    assert now == {"lora": 32 * 16 * (3072 + 9216 + 3072 + 3072 + 3072 + 16384 + 8192 + 3072),  # 25,165,824
                   "so8": 32 * 384 * 64,  # 786,432
                   "tag rows": 2 * 8 * 3072}  # 49,152: 26,001,408 in all
    before = lora_config(SO8TModelConfig(), TAG_IDS)  # what 0.1 did: a full lm_head copy for 8 new rows
    before.modules_to_save, before.trainable_token_indices = ["lm_head"], {"embed_tokens": TAG_IDS}
    old = _trainable_parts(config, before)
    assert old["base_model.model.lm_head.modules_to_save.default.weight"] == 32064 * 3072  # 98,500,608
    assert sum(old.values()) == 124_477_440 and sum(now.values()) == 26_001_408
