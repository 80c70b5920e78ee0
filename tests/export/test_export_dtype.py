"""`so8t-hf export` keeps the dtype the model was trained and saved in (it used to write bfloat16 by default:
logits 0.0335 away from the trained fp32 model), and `--dtype` changes it."""

import torch
from transformers import AutoModelForCausalLM, Phi3ForCausalLM

from so8t_hf.cli import main


def test_export_keeps_the_saved_dtype_and_the_trained_logits(tiny_run, tmp_path):
    for name, argv in (("final", ["--model", str(tiny_run.final)]),
                       ("adapter", ["--model", str(tiny_run.base), "--adapter", str(tiny_run.adapter)]),
                       ("run_dir", [str(tiny_run.out)])):
        assert main(["export", *argv, "--output", str(tmp_path / name)]) == 0
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype="auto").eval()
        assert type(plain) is Phi3ForCausalLM and plain.dtype == torch.float32, name
        with torch.no_grad():
            assert (plain(tiny_run.ids).logits - tiny_run.logits).abs().max() <= 1e-5, name


def test_export_dtype_flag_changes_the_dtype(tiny_run, tmp_path):
    assert main(["export", "--model", str(tiny_run.final), "--output", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert plain.dtype == torch.bfloat16
    assert plain.model.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16


def test_an_output_dir_with_only_its_adapter_is_merged_onto_the_base_it_names(tiny_run, tmp_path):
    import shutil

    shutil.copytree(tiny_run.adapter, tmp_path / "run" / "adapter")  # a QLoRA-style run folder without final/
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "plain")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype="auto").eval()
    with torch.no_grad():
        assert (plain(tiny_run.ids).logits - tiny_run.logits).abs().max() <= 1e-5
