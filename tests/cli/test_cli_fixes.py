"""The recipe's command line as a TRL user expects it: `so8t-hf train` logs like the recipe (warnings on stderr,
`--log_level` honoured), `--resume_from_checkpoint true` takes the latest checkpoint, `--config` is in `--help`,
`--lora_modules_to_save none` empties the YAML's list, TRL fields the recipe would ignore are refused by name, and
`so8t-hf chat` on an adapter without a base says so in one line."""

import json
import os
import subprocess
import sys

import pytest
from paths import REPO

from so8t_hf.cli import main
from so8t_hf.sft import make_parser
from so8t_hf.sft.pipeline import lora_config

TINY = ["--config", str(REPO / "recipes/configs/tiny.yaml"), "--dataset_path", str(REPO / "data/sample"),
        "--logging_steps", "1", "--eval_strategy", "no", "--eval_fraction", "0", "--max_length", "128",
        "--tiny_hidden_size", "64", "--tiny_intermediate_size", "128", "--lora_r", "4", "--disable_tqdm", "true"]


def test_train_logs_skipped_rows_on_stderr_at_the_chosen_level(tmp_path):
    data = tmp_path / "data.jsonl"
    rows = (REPO / "data/sample/thinking_en.jsonl").read_text().splitlines()[:8]
    data.write_text("\n".join([*rows, '{"instruction": "no answer here"}']) + "\n")
    argv = [*TINY, "--dataset_path", str(data), "--on_bad_rows", "skip", "--max_steps", "1", "--save_strategy", "no",
            "--output_dir", str(tmp_path / "run"), "--log_level", "warning"]
    proc = subprocess.run([sys.executable, "-m", "so8t_hf.cli", "train", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING so8t_hf.thinking.data: skipped 1 of 9 rows" in proc.stderr  # hidden by a NullHandler before
    assert "INFO so8t_hf" not in proc.stderr  # --log_level warning


def test_resume_from_checkpoint_true_takes_the_latest_checkpoint(tmp_path):
    out = tmp_path / "run"
    common = [*TINY, "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "3"]
    assert main(["train", *common, "--max_steps", "4"]) == 0
    full = {e["step"]: e["loss"] for e in json.loads((out / "training_log.json").read_text()) if "loss" in e}
    (out / "checkpoint-4").rename(tmp_path / "moved")  # the latest checkpoint left is checkpoint-2
    assert main(["train", *common, "--max_steps", "4", "--resume_from_checkpoint", "true"]) == 0
    resumed = {e["step"]: e["loss"] for e in json.loads((out / "training_log.json").read_text()) if "loss" in e}
    assert resumed[3] == pytest.approx(full[3], rel=1e-5) and resumed[4] == pytest.approx(full[4], rel=1e-5)
    _, _, args = make_parser().parse_args_and_config([*TINY, "--resume_from_checkpoint", "false"])
    from so8t_hf.sft.config import resume_target

    assert resume_target(args.resume_from_checkpoint) is None and resume_target("TRUE") is True
    assert resume_target(str(out / "checkpoint-2")) == str(out / "checkpoint-2")


def test_train_help_lists_config(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--config YAML" in capsys.readouterr().out
    model_args, _, _ = make_parser().parse_args_and_config([f"--config={REPO / 'recipes/configs/tiny.yaml'}"])
    assert model_args.lora_r == 32  # --config=PATH works too


def test_lora_modules_to_save_none_empties_the_yaml_list():
    model_args, _, _ = make_parser().parse_args_and_config([*TINY, "--lora_modules_to_save", "none"])
    assert model_args.lora_modules_to_save == []  # tiny.yaml says [embed_tokens, lm_head]
    config = lora_config(model_args, [3000, 3001])
    assert config.modules_to_save is None  # the new tag rows train as rows instead
    assert config.trainable_token_indices == {"embed_tokens": [3000, 3001], "lm_head": [3000, 3001]}


@pytest.mark.parametrize("flag,value", [
    ("--dataset_text_field", "prompt"), ("--dataset_kwargs", '{"skip_prepare_dataset": true}'),
    ("--eos_token", "<|end|>"), ("--truncation_mode", "keep_end"), ("--trust_remote_code", "true"),
    ("--model_init_kwargs", '{"dtype": "float16"}'), ("--lora_task_type", "SEQ_CLS"),
    ("--lora_target_parameters", "mlp.experts"),
])
def test_trl_fields_the_recipe_would_ignore_are_refused_by_name(flag, value):
    with pytest.raises(ValueError, match=f"{flag[2:]}=.*not supported by the thinking-SFT recipe"):
        make_parser().parse_args_and_config([*TINY, flag, value])


def test_chat_on_an_adapter_without_a_base_is_one_clear_line(tmp_path, capsys):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (adapter / name).write_bytes((REPO / "so8t_hf/assets/tiny_tokenizer" / name).read_bytes())
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": None}))
    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--model", str(adapter), "--prompt", "hi"])
    message = str(exit_.value.code)
    assert message.startswith("so8t-hf chat: cannot load") and "names no base model" in message
    assert str(tmp_path / "run" / "final") in message and "\n" not in message
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                             "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--model", str(adapter), "--prompt", "hi"])
    assert "could not be loaded" in str(exit_.value.code) and "\n" not in str(exit_.value.code)
