"""What the cards say about the run: the steps and epochs it trained (not the configured num_train_epochs, which
max_steps overrides), the processes and precision it ran in, the base's license read from a local base's own card,
and `--hub_base_model`, which names the Hub base where the run trained on a local folder (cards and
adapter_config.json), with a warning when a local base has no Hub id."""

import json
import logging
import sys
from types import SimpleNamespace

from hub_helpers import BASE_ID, REPO_ID
from huggingface_hub import ModelCard
from paths import REPO

from so8t_hf.cli.main import build_parser
from so8t_hf.hub import stage_output_dir
from so8t_hf.sft.reporting import base_model_license, hub_base_model


def test_the_card_gives_the_steps_and_epochs_trained_and_how_the_run_ran(hub_run):
    log = json.loads((hub_run.out / "training_log.json").read_text())
    epoch = max(e["epoch"] for e in log if "epoch" in e)
    assert 0 < epoch < 3.0  # max_steps 4 ended the run long before the default num_train_epochs (3.0)
    summary = json.loads((hub_run.out / "run_summary.json").read_text())
    assert summary["progress"] == {"steps": 4, "epochs": epoch}
    assert summary["distributed"]["world_size"] == 1 and summary["distributed"]["mixed_precision"] == "no"
    for card in (hub_run.out / "README.md", hub_run.stage / "README.md"):
        text = card.read_text()
        assert f"| steps / epochs | 4 / {epoch:.3g} |" in text and "| steps / epochs | 4 / 3.0 |" not in text
        assert "| processes, precision | 1 x cpu; weights float32, no mixed precision |" in text


def test_a_local_base_gives_its_license_to_the_local_cards(hub_run):
    assert json.loads((hub_run.out / "run_summary.json").read_text())["license"] == "mit"  # the base's README says so
    for card in ("README.md", "adapter/README.md"):
        assert ModelCard.load(hub_run.out / card).data.license == "mit", card


def test_hub_base_model_fills_the_cards_and_the_adapter_config(hub_run, tmp_path):
    sys.path.insert(0, str(REPO / "recipes"))
    import thinking_sft

    out = tmp_path / "run"
    thinking_sft.main([
        "--config", str(REPO / "recipes/configs/phi35_mini_lora.yaml"), "--model_name_or_path", str(hub_run.base),
        "--hub_base_model", BASE_ID, "--dataset_path", str(REPO / "data/sample"), "--output_dir", str(out),
        "--max_steps", "1", "--bf16", "false", "--dtype", "float32", "--use_cpu", "true", "--optim", "adamw_torch",
        "--max_length", "256", "--per_device_train_batch_size", "1", "--eval_strategy", "no", "--save_strategy", "no",
        "--eval_fraction", "0", "--disable_tqdm", "true", "--report_to", "none", "--use_liger_kernel", "false",
    ])
    assert json.loads((out / "adapter/adapter_config.json").read_text())["base_model_name_or_path"] == BASE_ID
    for card in ("README.md", "adapter/README.md"):
        data = ModelCard.load(out / card).data
        assert (data.base_model, data.license) == (BASE_ID, "mit"), card
    stage = tmp_path / "stage"
    stage_output_dir(out, stage, REPO_ID)  # so8t-hf push without --hub_base_model takes the run's
    assert json.loads((stage / "adapter/adapter_config.json").read_text())["base_model_name_or_path"] == BASE_ID
    assert ModelCard.load(stage / "README.md").data.base_model == BASE_ID


def test_a_local_base_without_a_hub_id_or_license_is_warned_about(tmp_path, caplog):
    args = SimpleNamespace(model_name_or_path=str(tmp_path), hub_base_model=None)
    with caplog.at_level(logging.WARNING, logger="so8t_hf"):
        assert hub_base_model(args) is None and base_model_license(args) is None
    text = caplog.text
    assert "is a local folder" in text and "--hub_base_model" in text and "names no license" in text
    assert hub_base_model(SimpleNamespace(model_name_or_path="tiny", hub_base_model=None)) is None
    assert hub_base_model(SimpleNamespace(model_name_or_path=str(tmp_path), hub_base_model="me/base")) == "me/base"


def test_push_takes_hub_base_model():
    for flag in ("--hub_base_model", "--hub-base-model", "--base-model"):
        args = build_parser().parse_args(["push", "out", "--repo-id", REPO_ID, flag, BASE_ID])
        assert args.base_model == BASE_ID, flag
