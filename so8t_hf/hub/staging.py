"""Lay out a finished thinking-SFT output directory as the Hub repo it publishes, in a local folder.

The repo (the same files whether `so8t-hf push --dry-run DIR` writes them or a push uploads them):

    README.md                      root card (`cards.root_card`)
    config.json, model*.safetensors, generation_config.json, modeling_so8t_phi3.py, configuration_so8t_phi3.py,
    tokenizer files + chat template, pipeline_so8t_thinking.py, format.py, lexer.py, grammar.py, screen.py  <- `final/`
    training_log.json, loss_curve.png, run_summary.json
    adapter/                       `adapter/` of the run (LoRA + SO(8) generators + tag-token rows) + its card

Nothing else: no trainer checkpoints, no data reports (they quote training rows). The root is completed with
`checkpoint.complete_checkpoint` (a no-op for a run of this version; older runs gain stop tokens, plain tags and
the pipeline) and checked before anything is uploaded.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path

from so8t_hf.hub.cards import SUMMARY_FILE, adapter_card, is_hub_id, root_card
from so8t_hf.hub.checkpoint import complete_checkpoint
from so8t_hf.thinking.format import ThinkingTags

logger = logging.getLogger(__name__)

__all__ = ["REPORT_FILES", "adapter_contents", "base_license", "load_summary", "stage_output_dir"]

REPORT_FILES = ("training_log.json", "loss_curve.png", SUMMARY_FILE)
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def load_summary(output_dir: Path) -> dict:
    """`run_summary.json` of the run; for a run without one (so8t_hf 0.1), what the folders tell."""
    path = output_dir / SUMMARY_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    logger.warning("%s has no %s (a run of so8t_hf 0.1): the cards will lack the training settings and metrics",
                   output_dir, SUMMARY_FILE)
    adapter_config = output_dir / "adapter" / "adapter_config.json"
    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path") if adapter_config.is_file() else None
    config = json.loads((output_dir / "final" / "config.json").read_text())
    tags = config.get("thinking_tags") or {"sections": ["think-task", "think-safety", "think-policy"], "final": "final"}
    return {"base_model": base or config.get("_name_or_path") or "unknown", "use_peft": adapter_config.is_file(),
            "tags": {"preset": "?", **tags}, "new_token_ids": [], "datasets": [], "metrics": {},
            "config": {"model": {}, "data": {}, "training": {}}, "versions": {}}


def base_license(base: str) -> str | None:
    """The `license` of the base model's card: a local folder's README.md, else the Hub card (None if unknown)."""
    from huggingface_hub import ModelCard

    try:
        path = Path(base)
        if path.is_dir():
            return ModelCard.load(path / "README.md").data.license if (path / "README.md").is_file() else None
        return ModelCard.load(base).data.license
    except Exception as err:  # offline, no card, no access: the card says so rather than guessing
        logger.warning("could not read the license of the base model %s (%s): pass --license", base, err)
        return None


def adapter_contents(path: Path) -> dict[str, tuple[int, int]]:
    """(parameters, bytes) per part of a safetensors file, read from its header: LoRA, SO(8) generators,
    tag-token rows, and each other full tensor by name."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    parts: dict[str, list[int]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        part = ("LoRA" if "lora_" in key else "SO(8) generators" if "so8_rotation" in key
                else "tag-token rows (embed_tokens, lm_head)" if "trainable_tokens" in key else f"full tensor {key}")
        n = 1
        for dim in info["shape"]:
            n *= dim
        start, end = info["data_offsets"]
        counts = parts.setdefault(part, [0, 0])
        counts[0] += n
        counts[1] += end - start
    return {part: (n, size) for part, (n, size) in parts.items()}


def _check_root(root: Path) -> None:
    weights = sorted(p.name for p in root.glob("model*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{root}: no model*.safetensors: final/ of the run is incomplete")
    for name in ("tokenizer_config.json", "generation_config.json", "README.md"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} is missing")


def stage_output_dir(output_dir: str | Path, staging_dir: str | Path, repo_id: str, *, base_model: str | None = None,
                     license: str | None = None, language=(), datasets=()) -> list[Path]:
    """Write the Hub repo of the run in `output_dir` into `staging_dir` (new or empty); returns its files.

    `base_model`: the base's Hub id for the cards and the adapter's `base_model_name_or_path` (default: the
    run's `model_name_or_path` when that is a Hub id); `license` (default: the base's), `language` and `datasets`
    (Hub dataset ids) go into the card metadata."""
    output_dir, staging_dir = Path(output_dir), Path(staging_dir)
    final = output_dir / "final"
    if not (final / "config.json").is_file():
        raise FileNotFoundError(f"{final / 'config.json'} is missing: {output_dir} is not a finished so8t_hf run "
                                "(run the recipe to the end, then push its output_dir)")
    if staging_dir.exists() and any(staging_dir.iterdir()):
        raise FileExistsError(f"{staging_dir} is not empty: stage into a new or empty folder")
    summary = load_summary(output_dir)
    base_model = base_model or summary.get("hub_base_model") or (
        summary["base_model"] if is_hub_id(summary["base_model"]) else None)
    if base_model is None:
        logger.warning("the base model %r is not a Hub id: the cards leave base_model out and adapter_config.json "
                       "keeps its local path; pass --hub_base_model <hub id>", summary["base_model"])
    if license is None and summary["base_model"] != "tiny":
        license = summary.get("license") or base_license(summary["base_model"]) or (
            base_license(base_model) if base_model else None)
        if license is None:
            logger.warning("no license found for the base model %r (its card names none): the cards leave license "
                           "out; pass --license", base_model or summary["base_model"])

    shutil.copytree(final, staging_dir, dirs_exist_ok=True)
    tags = summary["tags"]
    complete_checkpoint(staging_dir, ThinkingTags(tuple(tags["sections"]), tags["final"]))
    for name in REPORT_FILES:
        if (output_dir / name).is_file():
            shutil.copyfile(output_dir / name, staging_dir / name)

    adapter = output_dir / "adapter"
    has_adapter = (adapter / "adapter_config.json").is_file()
    card = dict(base_model=base_model, license=license, language=language, datasets=datasets)
    if has_adapter:
        shutil.copytree(adapter, staging_dir / "adapter", ignore=shutil.ignore_patterns("README.md"))
        config_path = staging_dir / "adapter" / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        if base_model and adapter_config.get("base_model_name_or_path") != base_model:
            adapter_config["base_model_name_or_path"] = base_model  # where AutoPeftModel finds the base
            config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
        contents = adapter_contents(staging_dir / "adapter" / "adapter_model.safetensors")
        adapter_card(summary, repo_id, contents, adapter_config, **card).save(staging_dir / "adapter" / "README.md")
        logger.info("adapter: %s", ", ".join(f"{k} {n:,} ({b / 2**20:.2f} MiB)" for k, (n, b) in contents.items()))
    root_card(summary, repo_id, has_adapter=has_adapter, **card).save(staging_dir / "README.md")
    _check_root(staging_dir)
    files = sorted(p for p in staging_dir.rglob("*") if p.is_file())
    logger.info("staged %d files of %s in %s", len(files), repo_id, staging_dir)
    return files
