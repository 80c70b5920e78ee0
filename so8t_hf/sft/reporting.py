"""Run reports written beside the model: `training_log.json`, `loss_curve.png`, `run_summary.json` (what the
model cards are made from: base, data, tags, metrics, every setting) and the local model card `README.md`.
`so8t-hf push` renders the Hub cards from the same summary (`so8t_hf.hub.cards`)."""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import asdict
from pathlib import Path

logger = logging.getLogger(__name__)


def write_training_log(output_dir: Path, log_history: list[dict]) -> Path:
    path = output_dir / "training_log.json"
    path.write_text(json.dumps(log_history, indent=2))
    return path


def plot_loss_curve(output_dir: Path, log_history: list[dict]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = output_dir / "loss_curve.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def hub_base_model(model_args) -> str | None:
    """The base's Hub id for the cards and `adapter_config.json`: `hub_base_model`, else `model_name_or_path` when it
    is one; a local base without `hub_base_model` is warned about (its path would go into the adapter's config)."""
    from so8t_hf.hub.cards import is_hub_id
    from so8t_hf.sft.config import TINY_MODEL

    base = model_args.model_name_or_path
    if getattr(model_args, "hub_base_model", None):
        return model_args.hub_base_model
    if is_hub_id(base):
        return base
    if base != TINY_MODEL:
        logger.warning("the base model %s is a local folder: adapter/adapter_config.json names that path "
                       "(base_model_name_or_path, which loads nowhere else) and the cards leave base_model out; pass "
                       "--hub_base_model <hub id> (or --hub_base_model to so8t-hf push)", base)
    return None


def base_model_license(model_args) -> str | None:
    """The license of a local base, from the front matter of its README.md (warned when there is none); None for a
    Hub base (`so8t-hf push` reads the Hub card) and the tiny demo."""
    base = Path(model_args.model_name_or_path)
    if not base.is_dir():
        return None
    from so8t_hf.hub.staging import base_license

    found = base_license(str(base))
    if found is None:
        logger.warning("the local base model %s names no license (no README.md with `license:` in its front matter): "
                       "the cards leave license out; pass --license to so8t-hf push", base)
    return found


def training_progress(log_history: list[dict]) -> dict:
    """The steps and epochs the run trained, from its log (`max_steps` overrides `num_train_epochs`)."""
    steps = [e["step"] for e in log_history if "step" in e]
    epochs = [e["epoch"] for e in log_history if "epoch" in e]
    return {"steps": max(steps) if steps else None, "epochs": max(epochs) if epochs else None}


def run_summary(metrics: dict, model_args, data_args, training_args, tags, token_summary: dict | None = None,
                distributed: dict | None = None, log_history: list[dict] | None = None) -> dict:
    """Everything the model cards state, JSON-ready (tokens in the training arguments are masked by
    `TrainingArguments.to_json_string`)."""
    import peft
    import torch
    import transformers

    import so8t_hf

    return {
        "base_model": model_args.model_name_or_path,
        "hub_base_model": hub_base_model(model_args),
        "license": base_model_license(model_args),
        "base_model_revision": model_args.model_revision,
        "use_peft": model_args.use_peft,
        "tags": {"preset": data_args.tag_preset, "sections": list(tags.sections), "final": tags.final},
        "new_token_ids": list((token_summary or {}).get("new_ids", [])),
        "datasets": list(data_args.dataset_path),
        "progress": training_progress(log_history or []),
        "distributed": distributed or {},  # what ran: world size, distributed type, backend, mixed precision, FSDP
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
        "config": {
            "model": asdict(model_args),
            "data": asdict(data_args),
            "training": json.loads(training_args.to_json_string()),
        },
        "versions": {"so8t_hf": so8t_hf.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }


def write_run_reports(output_dir: Path, log_history, metrics, model_args, data_args, training_args, tags=None,
                      token_summary: dict | None = None, distributed: dict | None = None) -> None:
    from so8t_hf.hub.cards import SUMMARY_FILE, adapter_card, local_card
    from so8t_hf.hub.staging import adapter_contents
    from so8t_hf.thinking.format import get_tag_preset

    tags = tags or get_tag_preset(data_args.tag_preset)
    write_training_log(output_dir, log_history)
    plot_loss_curve(output_dir, log_history)
    summary = run_summary(metrics, model_args, data_args, training_args, tags, token_summary, distributed, log_history)
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    local_card(output_dir, summary).save(output_dir / "README.md")
    adapter = output_dir / "adapter"
    if (adapter / "adapter_model.safetensors").is_file():  # replaces PEFT's empty template card
        config = json.loads((adapter / "adapter_config.json").read_text())
        if summary["hub_base_model"] and config.get("base_model_name_or_path") != summary["hub_base_model"]:
            config["base_model_name_or_path"] = summary["hub_base_model"]  # where AutoPeftModel finds the base
            (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        refs = (str(output_dir / "final"), str(output_dir))
        adapter_card(summary, output_dir.name, adapter_contents(adapter / "adapter_model.safetensors"), config,
                     base_model=summary["hub_base_model"], license=summary["license"], refs=refs).save(adapter / "README.md")
