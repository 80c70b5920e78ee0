"""Publish once, load anywhere: the repo `so8t-hf push --dry-run` stages, checked in a process that cannot import
so8t_hf (stock transformers + PEFT): the root and the card's snippets give the trained logits, the adapter on a
stock Phi-3 warns naming SO8T and the fix, generation stops at <|end|>, decoding shows the tags, the pipeline shows
only the final, the cards parse with the Hub's fields, and the adapter holds no full LM head."""

import json

from hub_helpers import BASE_ID, TAG_IDS
from safetensors.torch import load_file

def test_the_staged_repo_loads_anywhere_and_never_gives_a_different_model_silently(hub_checks):
    r = hub_checks
    assert r["root_class"].startswith("transformers_modules.") and r["root_class"].endswith("So8tPhi3ForCausalLM")
    assert r["root"] <= 1e-4  # the trained rotations and the merged LoRA
    assert r["README.md#0"] <= 1e-4  # the card's full-model snippet
    assert r["README.md#1:answer_type"] == "str"  # the card's pipeline snippet runs
    assert r["README.md#2"] <= 1e-5 and r["adapter/README.md#0"] <= 1e-5  # the adapter snippet: the trained model
    assert r["repo README#0"] <= 1e-4 and r["repo README#1"] <= 1e-5  # the README's Hub section, both routes
    for route in ("PeftModel(stock Phi3ForCausalLM)", "AutoPeftModelForCausalLM", "AutoModelForCausalLM(adapter)"):
        assert r[route]["diff"] > 1e-2, route  # a stock Phi-3 cannot hold the rotations ...
        warning = r[route]["warning"]  # ... and says so, naming SO8T and the fix
        assert warning and "SO8T ADAPTER ON A BASE WITHOUT SO8 ROTATIONS" in warning, route
        assert "trust_remote_code=True" in warning and "So8tPhi3ForCausalLM" in warning, route


def test_generation_stops_at_end_and_decoding_shows_the_tags(hub_checks):
    r = hub_checks
    assert r["eos_token_id"][0] == r["end_id"] == 32007 and r["tokenizer_eos"] in r["eos_token_id"]
    assert r["generated_new_tokens"] == 3  # plain generate() ended at the forced <|end|>
    assert r["decoded"].startswith("<think-task>SECRET plan</think-task>") and r["decoded"].endswith("<final>Four.</final>")
    assert r["tag_ids"] == [32011, 32018]
    assert r["pipeline_class"] == "So8tThinkingPipeline"
    assert r["pipeline_chat"] == {"role": "assistant", "content": "Four."}
    assert r["pipeline_text"] == "Four." and "SECRET plan" in r["pipeline_raw"]
    assert r["pipeline_string"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "Four."}]
    assert r["pipeline_greedy"][0] == r["pipeline_greedy"][1] != ""  # greedy unless asked: two runs agree
    assert r["pipeline_no_final"] == ""  # never the thinking
    assert "trust_remote_code=True" in r["pipeline_without_trust"]
    # transformers' own pipeline (given a model object) shows the thinking marked by its tags, never bare
    assert r["stock_pipeline"] == ["TextGenerationPipeline", "<think-task>no final at all</think-task>"]


def test_cards_parse_with_the_hub_fields(hub_run, hub_checks):
    cards = hub_checks["cards"]
    root, adapter = cards["README.md"], cards["adapter/README.md"]
    assert root["license"] == "mit" and root["base_model"] == BASE_ID  # the license of the base's card
    assert root["pipeline_tag"] == "text-generation" and root["library_name"] == "transformers"
    assert {"so8t", "thinking", "phi3"} <= set(root["tags"]) and root["language"] == ["en", "ja"]
    metrics = {k.removeprefix("eval_"): v for k, v in hub_run.metrics.items()}
    assert set(root["eval"]) >= {"loss", "final_exact_match", "format_compliance", "thinking_leak_rate"}
    assert all(root["eval"][k] == metrics[k] for k in root["eval"])
    assert adapter["library_name"] == "peft" and adapter["base_model"] == BASE_ID and adapter["license"] == "mit"
    text = (hub_run.stage / "README.md").read_text()
    for needle in ("subfolder=\"adapter\"", "trust_remote_code=True", "so8t-hf export", "Do not load the adapter"):
        assert needle in text, needle


def test_adapter_holds_tag_rows_not_a_full_head_and_the_root_is_complete(hub_run):
    stage = hub_run.stage
    adapter = load_file(str(stage / "adapter/adapter_model.safetensors"))
    assert not [k for k in adapter if k.endswith(("lm_head.weight", "embed_tokens.weight"))]
    rows = {k: v.shape for k, v in adapter.items() if "trainable_tokens" in k}
    assert rows == {"base_model.model.lm_head.token_adapter.trainable_tokens_delta": (8, 64),
                    "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": (8, 64)}
    config = json.loads((stage / "adapter/adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": TAG_IDS, "lm_head": TAG_IDS}
    assert config["modules_to_save"] == ["so8_rotation"] and config["base_model_name_or_path"] == BASE_ID
    files = {str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "generation_config.json", "modeling_so8t_phi3.py",
            "configuration_so8t_phi3.py", "pipeline_so8t_thinking.py", "format.py", "lexer.py", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "README.md", "training_log.json", "loss_curve.png",
            "run_summary.json", "adapter/README.md", "adapter/adapter_model.safetensors"} <= files
    assert not [f for f in files if f.startswith("checkpoint") or "data_report" in f or "truncation" in f]
    assert json.loads((stage / "config.json").read_text())["custom_pipelines"]["text-generation"]["impl"] == \
        "pipeline_so8t_thinking.So8tThinkingPipeline"
