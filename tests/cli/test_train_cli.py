"""`so8t-hf train` runs the recipe with the recipe's own parser: the YAML plus any field as a flag."""

import json

import pytest

from paths import REPO

from so8t_hf.cli import main


def test_train_takes_the_yaml_and_single_flag_overrides(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--config", str(REPO / "recipes/configs/tiny.yaml"), "--max_steps", "2",
            "--dataset_path", str(REPO / "data/sample"), "--output_dir", str(out), "--logging_steps", "1",
            "--eval_strategy", "no", "--save_strategy", "no", "--eval_fraction", "0", "--max_length", "128",
            "--tiny_hidden_size", "64", "--tiny_intermediate_size", "128", "--lora_r", "4", "--disable_tqdm", "true"]
    assert main(argv) == 0
    log = json.loads((out / "training_log.json").read_text())
    assert [e["step"] for e in log if "loss" in e] == [1, 2]  # --max_steps 2 beat the YAML's 160
    adapter = json.loads((out / "adapter/adapter_config.json").read_text())
    assert adapter["r"] == 4  # --lora_r beat the YAML's 32


def test_train_help_lists_the_recipe_fields(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--use_peft" in out and "--load_in_4bit" in out and "so8t-hf train" in out
