"""Run reports written beside the model: `training_log.json`, `loss_curve.png`, and the model card `README.md`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


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


def model_card(metrics: dict, model_args, data_args, training_args) -> str:
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items()))
    base = model_args.model_name_or_path
    return f"""---
library_name: transformers
tags: [so8t, phi3, thinking, lora, trl]
base_model: {base if base != "tiny" else "none (tiny random SO8T-Phi3)"}
---

# SO8T-Phi3 thinking model

Fine-tuned with `so8t_hf` (SO(8) attention rotations + thinking SFT). Answers carry `<think-*>` sections and a
`<final>` answer; only the `<final>` part is meant for end users (`so8t_hf.thinking.extract_final`).

- `final/`: the full SO8T-Phi3 model; load with
  `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (remote code in the folder).
- `adapter/`: the LoRA adapter with the trained SO(8) rotations (`PeftModel.from_pretrained`).
- `so8t-hf export --model final --output plain` merges the rotations into a plain `Phi3ForCausalLM`.

## Training

base `{base}`, data `{", ".join(data_args.dataset_path)}`, loss mask `{data_args.loss_mask}`, max steps
{training_args.max_steps}, learning rate {training_args.learning_rate}, LoRA {model_args.use_lora} (r={model_args.lora_r}),
SO(8) layers `{model_args.so8t_layers}`.

## Metrics

| metric | value |
| --- | --- |
{rows}

Training log: `training_log.json`; loss curve: `loss_curve.png`.

<details><summary>Full configuration</summary>

```json
{json.dumps({"model": asdict(model_args), "data": asdict(data_args)}, indent=2)}
```
</details>
"""


def write_run_reports(output_dir: Path, log_history, metrics, model_args, data_args, training_args) -> None:
    write_training_log(output_dir, log_history)
    plot_loss_curve(output_dir, log_history)
    (output_dir / "README.md").write_text(model_card(metrics, model_args, data_args, training_args))
