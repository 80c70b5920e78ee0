"""`so8t-hf` command line: env report, export to a plain Phi-3 (from an SO8T-Phi3, or from a stock Phi-3 base plus
an adapter), chat, and push's arguments."""

import json
import subprocess
import sys

import torch
import pytest
from tiny_models import random_ids, randomize_rotations, tiny_phi3, tiny_so8t
from transformers import AutoModelForCausalLM, Phi3ForCausalLM

from so8t_hf.cli import main


def test_env_json_reports_versions_backends_and_missing(capsys):
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] == torch.__version__
    choices = {case: backend for case, backend, _ in report["auto_backend"]}
    if not torch.cuda.is_available():
        assert report["gpus"] == []
        assert choices == {"dense causal batch": "sdpa", "packed padding-free rows": "chunked", "padded batch (generation)": "sdpa"}
    for name in ("flash-attn", "bitsandbytes"):
        if report["versions"][name] is None:
            assert name in report["missing"]


def test_env_console_script_prints_the_backend_table():
    out = subprocess.run([sys.executable, "-m", "so8t_hf.cli", "env"], capture_output=True, text=True, check=True).stdout
    assert 'attention backend chosen by so8t_attn_backend="auto":' in out
    assert "packed padding-free rows" in out


def test_export_writes_a_plain_phi3_with_equal_logits(tmp_path):
    model = tiny_so8t(seed=9)
    randomize_rotations(model)
    model.save_pretrained(tmp_path / "so8t")
    assert main(["export", "--model", str(tmp_path / "so8t"), "--output", str(tmp_path / "plain"), "--dtype", "float32"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert type(plain) is Phi3ForCausalLM
    ids = random_ids(1, 12)
    with torch.no_grad():
        ref, got = model(ids).logits, plain(ids).logits
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-4


def test_export_merges_an_adapter_onto_a_stock_phi3_base(tmp_path):
    """The adapter of a run (LoRA, SO(8) generators, tag rows) on its stock base: the plain model equals the trained
    model, and equals the export of the merged SO8T-Phi3 (a run's final/), within 1e-5 in fp32."""
    from peft import LoraConfig, get_peft_model

    from so8t_hf.modeling import So8tPhi3ForCausalLM
    from so8t_hf.training.peft_setup import prepare_peft_config

    tiny_phi3(seed=5).save_pretrained(tmp_path / "base")  # stock Phi3ForCausalLM, as a run's base
    model = So8tPhi3ForCausalLM.from_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                        trainable_token_indices={"embed_tokens": [125, 126], "lm_head": [125, 126]})
    trained = get_peft_model(model, prepare_peft_config(config, model)).eval()
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    trained.save_pretrained(tmp_path / "adapter")
    ids = random_ids(1, 12)
    ids[0, 3] = 125
    with torch.no_grad():
        expected = trained(ids).logits
    trained.merge_and_unload().save_pretrained(tmp_path / "final")
    for name, argv in (("from_adapter", ["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]),
                       ("from_final", ["--model", str(tmp_path / "final")])):
        assert main(["export", *argv, "--output", str(tmp_path / name), "--dtype", "float32"]) == 0
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        assert type(plain) is Phi3ForCausalLM
        with torch.no_grad():
            assert (plain(ids).logits - expected).abs().max() <= 1e-5, name
    with pytest.raises(SystemExit, match="not an SO8T-Phi3"):
        main(["export", "--model", str(tmp_path / "base"), "--output", str(tmp_path / "x")])


def test_push_arguments(tmp_path):
    from so8t_hf.cli.main import build_parser

    args = build_parser().parse_args(["push", "out", "--repo-id", "me/x", "--dry-run", "stage"])
    assert (args.output_dir, args.repo_id, args.private, args.dry_run) == ("out", "me/x", True, "stage")
    assert build_parser().parse_args(["push", "out", "--repo-id", "me/x", "--public"]).private is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["push", "out", "--repo-id", "me/x", "--public", "--private"])


def test_chat_prints_only_the_final_unless_show_thinking(tmp_path, capsys, monkeypatch):
    import so8t_hf.inference.generation as generation

    model = tiny_so8t(seed=1)
    model.save_pretrained(tmp_path / "m")
    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(tmp_path / "m")
    raw = "<think-task>SECRET plan</think-task>\n<final>Paris.</final><|end|>"
    seen = {}

    def fake_generate(model, tokenizer, messages, *args):
        seen["messages"] = list(messages)
        return raw, 3, 7

    monkeypatch.setattr(generation, "generate_reply", fake_generate)
    assert main(["chat", "--model", str(tmp_path / "m"), "--prompt", "Capital of France?"]) == 0
    assert capsys.readouterr().out.strip() == "Paris."
    assert seen["messages"] == [{"role": "user", "content": "Capital of France?"}]
    assert main(["chat", "--model", str(tmp_path / "m"), "--prompt", "Capital?", "--show-thinking"]) == 0
    assert "SECRET plan" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("first\nsecond\n\n"))
    assert main(["chat", "--model", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.split() == ["Paris.", "Paris."]
    assert seen["messages"][-1] == {"role": "user", "content": "second"} and seen["messages"][1]["content"] == "Paris."
