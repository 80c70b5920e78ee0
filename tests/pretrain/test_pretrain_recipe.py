"""The from-scratch recipe end to end on the CPU (what `make pretrain-test` runs), its step log and `report_to`
figures, checkpoints loadable with remote code, the best checkpoint, bit-exact resume, streaming, the CLI."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from paths import REPO
from transformers import AutoModelForCausalLM, TrainerCallback

from so8t_hf.pretrain import make_parser, run_pretrain
from so8t_hf.pretrain.checkpoints import find_best_checkpoint
from so8t_hf.pretrain.data import dummy_documents

CONFIG = REPO / "recipes" / "configs" / "pretrain_tiny.yaml"
LINE = re.compile(r"^Step (\d+)/(\d+) \| Loss (\d+\.\d{4}) \| PPL (\d+\.\d\d) \| LR (\S+) \| Grad (\d+\.\d{3}) \| "
                  r"Time (\d+\.\d{3}) s$")


def parse(*flags):
    return make_parser().parse_args_and_config(["--config", str(CONFIG), *flags])


class Capture(TrainerCallback):
    """What a `report_to` integration receives: every `on_log` dict."""

    def __init__(self, stop_at: int | None = None):
        self.logs, self.stop_at = [], stop_at

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_at is not None and state.global_step == self.stop_at:
            control.should_save = True
            control.should_training_stop = True


def test_pretrain_test_recipe_runs_logs_and_saves_loadable_checkpoints(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        import pretrain as recipe
    finally:
        sys.path.pop(0)
    summary = recipe.main(["--config", str(CONFIG), "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Step | Loss | PPL | LR | Grad | Time" in out
    lines = [m for m in (LINE.match(line) for line in out.splitlines()) if m]
    assert [int(m.group(1)) for m in lines] == list(range(1, 13))
    losses = [float(m.group(3)) for m in lines]
    assert losses[-1] < losses[0] - 1.0, losses  # it learns the counting phrases
    for m in lines:  # PPL is exp(loss); the time is a real step's
        assert math.isclose(float(m.group(4)), math.exp(float(m.group(3))), rel_tol=2e-3)
        assert float(m.group(7)) > 0
    assert summary["global_step"] == 12 and summary["params"] == 460096
    assert {p.name for p in tmp_path.iterdir()} >= {"checkpoint-6", "checkpoint-12", "best", "final", "run_summary.json"}
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert find_best_checkpoint(tmp_path) == tmp_path / "best" and best["step"] in (6, 12)
    ids = torch.tensor([[5, 6, 7, 8]])
    for folder in ("checkpoint-6", "best", "final"):
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_so8t_phi3")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / folder, trust_remote_code=True)
        assert (tmp_path / folder / "modeling_so8t_phi3.py").is_file()  # the remote code travels with it
        assert torch.isfinite(model(ids).logits).all()
    rotation = model.model.layers[0].self_attn.so8_rotation.theta
    assert torch.count_nonzero(rotation) > 0  # the SO(8) generators trained from zero


# the tiny config's default (as the 1.5B config's): optimizer in backward, no accumulation, no clipping; and the
# optimizer step after backward, with the accumulation and clipping it allows
OPTIMIZER_STEP = ("--optimizer_in_backward", "false", "--per_device_train_batch_size", "2",
                  "--gradient_accumulation_steps", "2", "--max_grad_norm", "1.0")


@pytest.mark.parametrize("flags", [(), OPTIMIZER_STEP], ids=["optimizer_in_backward", "optimizer_step_accumulation"])
def test_report_to_receives_loss_ppl_lr_grad_and_step_time(tmp_path, flags):
    capture = Capture()
    model, data, args = parse("--output_dir", str(tmp_path), "--max_steps", "3", "--eval_blocks", "0",
                              "--save_strategy", "no", *flags)
    assert args.optimizer_in_backward is not bool(flags)
    run_pretrain(model, data, args, callbacks=[capture])
    logs = [entry for entry in capture.logs if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert {"loss", "perplexity", "learning_rate", "grad_norm", "step_time"} <= set(entry)
        assert entry["step_time"] > 0 and entry["grad_norm"] > 0
        # under gradient accumulation too, the logged perplexity is exp(the logged loss)
        assert math.isclose(entry["perplexity"], math.exp(entry["loss"]), rel_tol=2e-3), entry


def _run(tmp_path, name, stop_at=None, resume=None, flags=()):
    capture = Capture(stop_at)
    model, data, args = parse("--output_dir", str(tmp_path / name), "--max_steps", "4", "--eval_blocks", "0",
                              "--save_strategy", "no", "--warmup_steps", "1", *flags)
    args.resume_from_checkpoint = resume
    run_pretrain(model, data, args, callbacks=[capture])
    losses = {e["step"]: e["loss"] for e in (dict(log, step=i) for i, log in enumerate(capture.logs)) if "loss" in e}
    final = AutoModelForCausalLM.from_pretrained(tmp_path / name / "final", trust_remote_code=True)
    return list(losses.values()), dict(final.named_parameters())


@pytest.mark.parametrize("flags", [(), OPTIMIZER_STEP], ids=["optimizer_in_backward", "optimizer_step"])
def test_resume_is_bit_exact_for_data_order_and_optimizer_state(tmp_path, flags):
    straight, params = _run(tmp_path, "straight", flags=flags)
    first, _ = _run(tmp_path, "interrupted", stop_at=2, flags=flags)
    optimizer = tmp_path / "interrupted" / "checkpoint-2" / "optimizer.pt"
    assert optimizer.is_file()
    saved = torch.load(optimizer, weights_only=True)
    if not flags:  # the default: one state per parameter, every one of them saved
        saved = saved["optimizer_in_backward"]
        assert set(saved) == set(params) and all(s["state"][0]["step"] == 2 for s in saved.values())
    else:
        assert "optimizer_in_backward" not in saved and saved["state"][0]["step"] == 2
    second, resumed = _run(tmp_path, "resumed", resume=str(tmp_path / "interrupted" / "checkpoint-2"), flags=flags)
    assert len(straight) == 4 and first == straight[:2]
    assert second == straight[2:]  # the same blocks in the same order, the same optimizer moments
    for name, value in params.items():
        assert torch.equal(value, resumed[name]), name


def test_streamed_corpus_trains_with_max_steps(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in dummy_documents(200, seed=2)))
    model, data, args = parse("--output_dir", str(tmp_path / "run"), "--dummy_documents", "0", "--dataset_name",
                              "json", "--data_files", str(corpus), "--streaming", "true", "--max_steps", "3",
                              "--eval_blocks", "2", "--eval_steps", "3", "--save_strategy", "no")
    summary = run_pretrain(model, data, args)
    assert summary["global_step"] == 3 and summary["best"]["step"] == 3
    model, data, args = parse("--output_dir", str(tmp_path / "run2"), "--dummy_documents", "0", "--dataset_name",
                              "json", "--data_files", str(corpus), "--streaming", "true", "--max_steps", "-1")
    with pytest.raises(ValueError, match="set max_steps"):
        run_pretrain(model, data, args)


def test_cli_pretrain_uses_the_recipe_parser(capsys):
    from so8t_hf.cli.main import build_parser, main

    assert "pretrain" in build_parser().format_help()
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "so8t-hf pretrain" in out and "--dummy_documents" in out and "--max_memory_gib" in out
    with pytest.raises(ValueError, match="no_such_field"):  # unknown keys fail loudly
        make_parser().parse_args_and_config(["--config", str(CONFIG), "--no_such_field", "1"])


@pytest.mark.skipif(not (REPO / "Makefile").is_file() or not (Path(sys.prefix) / ".installed").is_file(),
                    reason="runs `make pretrain-test` only inside the Makefile's own venv (as `make test` makes it)")
def test_make_pretrain_test_target_trains_saves_and_completes():
    """The Makefile target itself, as a user types it: tiny config, dummy data, CPU; then a completion from best/."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["make", "--no-print-directory", "pretrain-test", f"VENV={sys.prefix}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "Step 12/12 | Loss" in log and "optimizer in backward" in log
    out = REPO / "outputs" / "pretrain_tiny"
    assert {"best", "final", "run_summary.json"} <= {p.name for p in out.iterdir()}
    assert "best checkpoint: outputs/pretrain_tiny/best" in log
