"""Model cards of a thinking-SFT run, made with `huggingface_hub.ModelCard` / `ModelCardData` from the run's
`run_summary.json`.

- `root_card`: the complete model at the repo root. Metadata: `license` (the base's), `base_model`,
  `pipeline_tag: text-generation`, `library_name: transformers`, `tags` (so8t, thinking, phi3, ...), `datasets`
  and `language` where known, eval results as `model-index`. Body: loading snippets for both routes (the full
  model; the adapter on the SO8T-Phi3 form of the base), final-only use, what stock PEFT does with the adapter on a
  stock Phi-3, the training settings and metrics.
- `adapter_card`: the adapter in `adapter/` (`library_name: peft`), its contents and sizes, its loading snippet.
- `local_card`: the output directory's README, with local paths in the snippets.

The snippets are tested as written (`tests/hub`): run in a process that cannot import so8t_hf, with the repo id
replaced by the staged folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = ["SUMMARY_FILE", "adapter_card", "eval_results", "local_card", "root_card"]

SUMMARY_FILE = "run_summary.json"
TAGS = ["so8t", "thinking", "phi3", "custom_code"]
SKIP_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "num_tokens")


def is_hub_id(name: str | None) -> bool:
    """A Hub repo id (`owner/name` or `name`) rather than a local folder."""
    return bool(name) and name != "tiny" and not Path(name).exists() and not name.startswith((".", "/", "~"))


def _data_names(summary: dict) -> str:
    """The training data as the card names it: Hub ids as they are, local files by their name only."""
    return ", ".join(d if is_hub_id(d) else Path(d).name for d in summary["datasets"]) or "unknown"


def shown_metrics(summary: dict) -> dict[str, float]:
    """The eval metrics worth a card (no timings, counts or epochs)."""
    return {k: v for k, v in sorted(summary["metrics"].items())
            if k.startswith("eval_") and isinstance(v, (int, float)) and not k.endswith(SKIP_METRICS)}


def eval_results(summary: dict, dataset_ids: list[str] | None = None) -> list[EvalResult]:
    """The run's eval metrics in the Hub's form (`model-index`), on the held-out split of the training data."""
    share = summary["config"]["data"].get("eval_fraction") or 0
    return [
        EvalResult(task_type="text-generation", dataset_type=dataset_ids[0] if dataset_ids else "local",
                   dataset_name=f"held-out {share:.0%} of {_data_names(summary)}", dataset_split="eval",
                   metric_type=key.removeprefix("eval_"), metric_name=key.removeprefix("eval_").replace("_", " "),
                   metric_value=value)
        for key, value in shown_metrics(summary).items()
    ]


def _metrics_table(summary: dict) -> str:
    rows = [f"| {k} | {v:.4g} |" for k, v in shown_metrics(summary).items()]
    return "\n".join(["| metric | value |", "| --- | --- |", *rows]) if rows else "No evaluation was run."


def _training_table(summary: dict, base_ref: str) -> str:
    model, data, train = (summary["config"][k] for k in ("model", "data", "training"))
    rows = [
        ("base model", f"`{base_ref}`"),
        ("data", _data_names(summary)),
        ("thinking tags", f"{summary['tags']['preset']}: " + ", ".join(f"`<{s}>`" for s in
                                                                     [*summary["tags"]["sections"], summary["tags"]["final"]])),
        ("loss on", data.get("loss_mask")),
        ("SO(8) layers", model.get("so8t_layers")),
        ("LoRA", f"r={model.get('lora_r')}, alpha={model.get('lora_alpha')}, targets {model.get('lora_target_modules')}"
         if summary["use_peft"] else "none (full fine-tuning)"),
        ("new tag-token rows", summary["new_token_ids"] or "none (the tokenizer had the tags)"),
        ("steps / epochs", _progress(summary)),
        ("processes, precision", _processes(summary)),
        ("learning rate (SO(8))", f"{train.get('learning_rate')} ({train.get('so8t_learning_rate')})"),
        ("batch x accumulation, max length", f"{train.get('per_device_train_batch_size')} x "
                                             f"{train.get('gradient_accumulation_steps')}, {train.get('max_length')}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items())),
    ]
    return "\n".join(["| setting | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])


def _progress(summary: dict) -> str:
    """The steps and epochs the run trained (`progress` of the summary), not the configured `num_train_epochs`,
    which `max_steps` overrides."""
    progress = summary.get("progress") or {}
    if progress.get("steps") is None:  # a summary of an older run: the configured step count only
        return f"{summary['config']['training'].get('max_steps')} / unknown"
    return f"{progress['steps']} / {progress['epochs']:.3g}"


def _processes(summary: dict) -> str:
    """How many processes trained and in which precision, as they ran (`distributed` of the summary)."""
    ran = summary.get("distributed") or {}
    if not ran:
        return "unknown"
    kind = ran.get("distributed_type", "NO")
    if ran.get("fsdp_version"):
        kind = f"FSDP{ran['fsdp_version']}" + (", sharded" if ran.get("sharded") else "")
    where = f"{ran.get('world_size', 1)} x {ran.get('device', '?').split(':')[0]}"
    where += f" ({kind}, {ran['backend']})" if ran.get("backend") else ""
    mixed = ran.get("mixed_precision", "no")
    return f"{where}; weights {ran.get('weights_dtype')}, " + ("no mixed precision" if mixed == "no" else f"{mixed} autocast")


def _snippets(model_ref: str, adapter_ref: str | None, base_ref: str) -> dict[str, str]:
    full = f'''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{model_ref}", trust_remote_code=True, dtype="auto")
tokenizer = AutoTokenizer.from_pretrained("{model_ref}", trust_remote_code=True)
```'''
    final = f'''```python
from transformers import pipeline

chat = pipeline("text-generation", model="{model_ref}", trust_remote_code=True)
reply = chat([{{"role": "user", "content": "What is the boiling point of water at sea level?"}}], max_new_tokens=256)
answer = reply[0]["generated_text"][-1]["content"]  # the final answer only, never the thinking ("" without one)
```'''
    adapter = None
    if adapter_ref is not None:
        adapter = f'''```python
from peft import PeftModel
from transformers import AutoTokenizer, GenerationConfig
from transformers.dynamic_module_utils import get_class_from_dynamic_module

# The adapter needs the SO8T-Phi3 form of its base: the base's weights with identity SO(8) rotations,
# built by the SO8T-Phi3 code of this repo (a stock Phi3ForCausalLM would drop the trained rotations).
So8tPhi3ForCausalLM = get_class_from_dynamic_module("modeling_so8t_phi3.So8tPhi3ForCausalLM", "{model_ref}")
base = So8tPhi3ForCausalLM.from_pretrained("{base_ref}", dtype="auto")
model = PeftModel.from_pretrained(base, "{adapter_ref}", subfolder="adapter")
model.generation_config = GenerationConfig.from_pretrained("{model_ref}")  # stops at <|end|>
tokenizer = AutoTokenizer.from_pretrained("{model_ref}", trust_remote_code=True)
```'''
    return {"full": full, "final": final, "adapter": adapter}


STOCK_WARNING = """**Do not load the adapter onto a stock `Phi3ForCausalLM`** (`PeftModel.from_pretrained(<stock Phi-3>, ...)`,
`AutoPeftModelForCausalLM`, or `from_pretrained` on the adapter folder): a stock Phi-3 has no SO(8) rotations,
so the trained rotations would be dropped and the model would not be the trained one. Stock PEFT then warns
`You have passed exclude_modules=.*\\.so8_rotation(?# <- SO8T ADAPTER ON A BASE WITHOUT SO8 ROTATIONS ...)`:
the adapter's `exclude_modules` carries that text for this case (on SO8T-Phi3 it matches the rotation modules
and changes nothing)."""


def _body(title: str, summary: dict, model_ref: str, adapter_ref: str | None, base_ref: str, where: dict) -> str:
    s = _snippets(model_ref, adapter_ref, base_ref)
    final_tag = summary["tags"]["final"]
    parts = [
        f"# {title}",
        f"SO8T-Phi3 fine-tuned from `{base_ref}` with so8t_hf thinking SFT: "
        "a Phi-3 whose attention outputs pass a learned block-diagonal SO(8) rotation before `o_proj`, trained to "
        "answer with thinking sections (" + ", ".join(f"`<{t}>`" for t in summary["tags"]["sections"]) +
        f") and then a `<{final_tag}>` answer. **Only the `<{final_tag}>` text is meant for users.**",
        "## Files",
        where["files"],
        "## The full model (no so8t_hf needed)",
        s["full"],
        "Plain `model.generate()` stops at `<|end|>` (`generation_config.eos_token_id`). The tags are ordinary "
        "tokens, so `tokenizer.decode(..., skip_special_tokens=True)` keeps them: decoded text holds the thinking, "
        "marked by its tags. Never show it as it is; take the final answer as below.",
        "## Final answers only",
        s["final"],
        "This repo's `text-generation` pipeline (`pipeline_so8t_thinking.py`, named in `config.json` under "
        "`custom_pipelines`) returns the `<final>` text only: \"\" when the model wrote none, never the thinking. "
        "`return_raw_text=True` adds the raw generation with its tags. Without `trust_remote_code=True`, "
        "transformers refuses to build the pipeline. With so8t_hf installed, "
        "`so8t_hf.thinking.extract_final(text)` does the same on any decoded text.",
    ]
    if s["adapter"] and base_ref == "tiny":
        parts += ["## The adapter", where["adapter"] + " Its base is the tiny demo's random model, which is not "
                  "saved anywhere: use the full model above."]
    elif s["adapter"]:
        parts += ["## The adapter", where["adapter"], s["adapter"], STOCK_WARNING]
    parts += [
        "## A plain Phi-3",
        "With so8t_hf: `so8t-hf export --model <this model's folder> --output plain` burns the rotations into "
        "`o_proj` (`W_o' = W_o @ blockdiag(R)^T`) and writes a stock `Phi3ForCausalLM` (equal logits, no remote "
        "code), for tools that only know Phi-3.",
        "## Training",
        _training_table(summary, base_ref),
        "## Evaluation",
        _metrics_table(summary),
        where["reports"],
        "<details><summary>Full configuration</summary>\n\n```json\n"
        + json.dumps(summary["config"], indent=2, default=str) + "\n```\n</details>",
    ]
    return "\n\n".join(parts) + "\n"


def _card_data(summary: dict, base_model: str | None, license: str | None, language, datasets, name: str,
               library: str, extra_tags: list[str]) -> ModelCardData:
    return ModelCardData(
        license=license, base_model=base_model, pipeline_tag="text-generation", library_name=library,
        tags=[*TAGS, *extra_tags], datasets=list(datasets) or None, language=list(language) or None,
        model_name=name, eval_results=eval_results(summary, list(datasets)) or None,
    )


def root_card(summary: dict, repo_id: str, *, base_model: str | None, license: str | None, language=(),
              datasets=(), has_adapter: bool = True) -> ModelCard:
    """The card of the repo root: the complete model (see the module docstring)."""
    name = repo_id.split("/")[-1]
    where = {
        "files": "- the repo root: the complete model: trained SO(8) rotations and merged LoRA, the SO8T-Phi3 "
                 "remote code (`modeling_so8t_phi3.py`, `configuration_so8t_phi3.py`), the tokenizer with the "
                 "thinking chat template, `generation_config.json` (stops at `<|end|>`), the final-only pipeline "
                 "(`pipeline_so8t_thinking.py`, `format.py`, `grammar.py`, `screen.py`, `lexer.py`; needs `pip install "
                 "confusable-homoglyphs`)."
                 + ("\n- `adapter/`: the LoRA adapter with the trained SO(8) rotations, for the base "
                    f"`{base_model or summary['base_model']}` (its own card: `adapter/README.md`)." if has_adapter else "")
                 + "\n- `training_log.json`, `loss_curve.png`, `run_summary.json` (every setting and metric).",
        "adapter": "`adapter/` holds the LoRA weights, the trained SO(8) generators and the trained rows of the "
                   "new tag tokens, for the base model below.",
        "reports": "Training log: `training_log.json`; loss curve: `loss_curve.png`.",
    }
    data = _card_data(summary, base_model, license, language, datasets, name, "transformers", [])
    body = _body(name, summary, repo_id, repo_id if has_adapter else None, base_model or summary["base_model"], where)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def adapter_card(summary: dict, repo_id: str, contents: dict[str, tuple[int, int]], adapter_config: dict, *,
                 base_model: str | None, license: str | None, language=(), datasets=(),
                 refs: tuple[str, str] | None = None) -> ModelCard:
    """The card of `adapter/`. `contents`: part -> (parameters, bytes) of `adapter_model.safetensors`; `refs`:
    (the full model's folder, the folder holding `adapter/`) for a local card (default: `repo_id` for both)."""
    base_ref = base_model or summary["base_model"]
    model_ref, adapter_ref = refs or (repo_id, repo_id)
    rows = [f"| {group} | {n:,} | {_size(size)} |" for group, (n, size) in contents.items()]
    settings = {k: adapter_config.get(k) for k in ("r", "lora_alpha", "target_modules", "modules_to_save",
                                                   "trainable_token_indices", "use_rslora", "use_dora")}
    snippet = _snippets(model_ref, adapter_ref, base_ref)["adapter"]
    body = "\n\n".join([
        f"# {repo_id.split('/')[-1]}: adapter",
        f"LoRA adapter of `{repo_id}` for the base `{base_ref}`, with the trained "
        "SO(8) rotation generators (`so8_rotation`, as PEFT `modules_to_save`) and the trained embedding and "
        "LM-head rows of the new thinking-tag tokens (`trainable_token_indices`: those rows only, no copy of the "
        "whole head). The complete model, LoRA merged, is at the repo root.",
        snippet,
        STOCK_WARNING,
        "## Contents of `adapter_model.safetensors`",
        "\n".join(["| part | parameters | size |", "| --- | --- | --- |", *rows]),
        "## Settings",
        "```json\n" + json.dumps(settings, indent=2) + "\n```",
        "Training and evaluation: see the main card (`README.md` one folder up).",
    ]) + "\n"
    data = _card_data(summary, base_model, license, language, datasets, repo_id.split("/")[-1], "peft", ["lora"])
    data.eval_results = None  # the results belong to the model card
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def local_card(output_dir: Path, summary: dict) -> ModelCard:
    """The output directory's README: the root card's content, with this folder's paths in the snippets."""
    output_dir = Path(output_dir)
    base = summary["base_model"]
    has_adapter = (output_dir / "adapter").is_dir() or summary["use_peft"]
    where = {
        "files": "- `final/`: the complete model (trained SO(8) rotations, merged LoRA, remote code, tokenizer, "
                 "generation config, final-only pipeline)."
                 + ("\n- `adapter/`: the LoRA adapter with the trained SO(8) rotations." if has_adapter else "")
                 + "\n- `training_log.json`, `loss_curve.png`, `run_summary.json`, `data_report.json`."
                 "\n\nPublish with `so8t-hf push " + str(output_dir) + " --repo-id <you>/<name>` (private unless "
                 "`--public`; `--dry-run DIR` writes the repo's files without uploading).",
        "adapter": "`adapter/` holds the LoRA weights, the trained SO(8) generators and the trained rows of the new "
                   "tag tokens.",
        "reports": "Training log: `training_log.json`; loss curve: `loss_curve.png`.",
    }
    name = output_dir.name
    hub_base = summary.get("hub_base_model") or (base if is_hub_id(base) else None)
    data = _card_data(summary, hub_base, summary.get("license"), (), (), name, "transformers", [])
    body = _body(name, summary, str(output_dir / "final"), str(output_dir) if has_adapter else None, base, where)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
