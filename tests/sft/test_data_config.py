"""The recipe's data settings: enumerated fields fail when the config is parsed (before any model is built), TRL
settings the recipe cannot honour are refused there with the reason, `max_length: null` trains, and a recipe
run from another directory trains on the bundled sample plus a folder mixing every row shape (U+2028 rows,
.jsonl.gz in a subfolder, Parquet)."""

import json
import logging
import math
import re
import sys

import pytest
from mixed_shapes import write_mixed_dataset
from paths import REPO
from safetensors.torch import load_file

sys.path.insert(0, str(REPO / "recipes"))
import thinking_sft  # noqa: E402

from so8t_hf.sft import ThinkingDataConfig, make_parser  # noqa: E402

TINY = str(REPO / "recipes/configs/tiny.yaml")


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test if the recipe gets as far as building a tokenizer or a model."""
    from so8t_hf.sft import pipeline

    def built(*args, **kwargs):
        raise AssertionError("the recipe built a tokenizer or model before refusing the config")

    monkeypatch.setattr(pipeline, "build_tokenizer", built)
    monkeypatch.setattr(pipeline, "build_model", built)


def _yaml(tmp_path, **changes) -> str:
    lines = [line for line in (REPO / "recipes/configs/tiny.yaml").read_text().splitlines()
             if line.split(":")[0] not in changes]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines + [f"{k}: {json.dumps(v)}" for k, v in changes.items()]) + "\n")
    return str(path)


ENUMS = [  # (field, a bad value, the message)
    ("loss_mask", "everything", "ThinkingDataConfig.loss_mask='everything' is not valid; choose one of assistant, "
                                "final_only, all."),
    ("on_bad_rows", "drop", "ThinkingDataConfig.on_bad_rows='drop' is not valid; choose one of error, skip."),
    ("on_truncated", "keep", "ThinkingDataConfig.on_truncated='keep' is not valid; choose one of drop, error."),
    ("tag_preset", "reasoning3", "ThinkingDataConfig.tag_preset='reasoning3' is not valid; choose one of default, "
                                 "reasoning4."),
    ("so8t_attn_backend", "fast", "SO8TModelConfig.so8t_attn_backend='fast' is not valid; choose one of "),
    ("dtype", "fp8", "SO8TModelConfig.dtype='fp8' is not valid; choose one of "),
    ("reasoning_section", "plan", "ThinkingDataConfig.reasoning_section='plan' is not valid; choose one of task, "
                                  "safety, policy."),
]


@pytest.mark.parametrize("field, value, message", ENUMS, ids=[e[0] for e in ENUMS])
def test_enumerated_fields_fail_when_the_config_is_parsed(tmp_path, nothing_built, capsys, field, value, message):
    with pytest.raises(ValueError) as err:  # from the YAML: the dataclass checks it
        thinking_sft.main(["--config", _yaml(tmp_path, **{field: value}), "--output_dir", str(tmp_path)])
    assert message in str(err.value)
    if field != "reasoning_section":  # from a flag: argparse checks the choices
        with pytest.raises(SystemExit):
            thinking_sft.main(["--config", TINY, f"--{field}", value, "--output_dir", str(tmp_path)])
        err = capsys.readouterr().err
        assert re.search(rf"argument --{field}(/--[\w-]+)?: invalid choice: '{value}'", err)


def test_reasoning_section_is_checked_against_the_chosen_tag_set():
    assert ThinkingDataConfig(tag_preset="reasoning4", reasoning_section="ethics").reasoning_section == "ethics"
    with pytest.raises(ValueError, match="reasoning_section='task' is not valid; choose one of logic, ethics"):
        ThinkingDataConfig(tag_preset="reasoning4", reasoning_section="task")


REFUSED = [("--assistant_only_loss", "true", "loss_mask: assistant \\(the default\\) trains what assistant_only_loss"),
           ("--completion_only_loss", "true", "sets the labels from loss_mask"),
           ("--chat_template_path", "my_template.jinja", "would train one format and ship another")]


@pytest.mark.parametrize("flag, value, reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_trl_settings_the_recipe_ignores_are_refused_at_parse_time(tmp_path, nothing_built, flag, value, reason):
    name = flag.removeprefix("--")
    with pytest.raises(ValueError) as err:
        make_parser().parse_args_and_config(["--config", TINY, flag, value, "--output_dir", str(tmp_path)])
    shown = repr(True if value == "true" else value)
    assert str(err.value).startswith(f"{name}={shown} is not supported by the thinking-SFT recipe: ")
    assert re.search(reason, str(err.value))
    model_args, data_args, training_args = make_parser().parse_args_and_config(
        ["--config", TINY, "--output_dir", str(tmp_path)])
    setattr(training_args, name, True if value == "true" else value)
    from so8t_hf.sft import run_thinking_sft

    with pytest.raises(ValueError, match="is not supported by the thinking-SFT recipe"):  # configs built in code
        run_thinking_sft(model_args, data_args, training_args)


def test_max_length_null_parses_as_no_limit(tmp_path):
    _, _, training_args = make_parser().parse_args_and_config(["--config", _yaml(tmp_path, max_length=None),
                                                               "--output_dir", str(tmp_path)])
    assert training_args.max_length is None


@pytest.mark.parametrize("packing", [True, False])
def test_recipe_trains_on_every_shape_from_another_directory_without_a_length_limit(tmp_path, monkeypatch, caplog,
                                                                                     packing):
    expected = write_mixed_dataset(tmp_path / "mixed")
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)  # `data/sample` of the YAML resolves to the bundled sample from here
    config = _yaml(tmp_path, max_length=None, packing=packing, dataset_path=["data/sample", str(tmp_path / "mixed")])
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="so8t_hf"):
        thinking_sft.main([
            "--config", config, "--output_dir", str(out), "--max_steps", "3", "--logging_steps", "1",
            "--eval_strategy", "no", "--save_strategy", "no", "--per_device_train_batch_size", "2",
            "--eval_generation_rows", "1", "--eval_max_new_tokens", "4", "--tiny_hidden_size", "64",
            "--tiny_intermediate_size", "128", "--disable_tqdm", "true",
        ])
    assert "using the sample bundled with so8t_hf" in caplog.text
    packed = "max_length is None with packing: packing into sequences of the longest row"
    assert (packed in caplog.text) == packing
    report = json.loads((out / "data_report.json").read_text())
    assert report["kept_rows"] == 80 + expected["rows"] and report["bad_rows"] == 0
    sample = {"chat": 28, "output": 26, "structured": 26}
    assert report["kept_shapes"] == {k: sample.get(k, 0) + expected["shapes"].get(k, 0)
                                     for k in sorted({*sample, *expected["shapes"]})}
    assert report["skipped_files"] == [{"path": expected["skipped"][0], "reason": report["skipped_files"][0]["reason"]}]
    assert json.loads((out / "truncation_report.json").read_text())["max_length"] is None
    losses = [e["loss"] for e in json.loads((out / "training_log.json").read_text()) if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    adapter = load_file(str(out / "adapter/adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # LoRA B starts at zero: it trained
