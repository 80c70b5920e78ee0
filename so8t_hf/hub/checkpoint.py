"""What a released so8t_hf checkpoint carries beyond `save_pretrained`.

- Stop tokens: `generation_config.eos_token_id` holds `<|end|>` first, then the tokenizer's EOS and the other
  turn-ending tokens of the vocabulary (the one set of stop rules, `inference.generation.stop_token_ids`), then
  whatever the base listed, so plain `model.generate()` ends the turn.
- The thinking tags as plain (non-special) tokens, so decoding with `skip_special_tokens=True` shows them.
- `config.thinking_tags` (the tag set) and `config.custom_pipelines`: `pipeline("text-generation", model=...,
  trust_remote_code=True)` runs `So8tThinkingPipeline` (final answer only), shipped beside the model code as
  `pipeline_so8t_thinking.py` + `format.py` + `lexer.py` + `grammar.py` + `screen.py` (copies of
  `so8t_hf/thinking/`; the pipeline also needs the small pure-Python `confusable-homoglyphs` package, which
  transformers asks for by name when it is missing).

`complete_checkpoint(folder)` edits a saved folder (JSON, tokenizer and code files; the weights are not
loaded), so it finishes a fresh `final/` and, before a push, an output directory written by so8t_hf 0.1.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from so8t_hf.inference.generation import stop_token_ids
from so8t_hf.thinking.chat_template import add_thinking_tokens
from so8t_hf.thinking.format import DEFAULT_TAGS, ThinkingTags

logger = logging.getLogger(__name__)

__all__ = ["CUSTOM_PIPELINES", "FORMAT_FILE", "PIPELINE_FILE", "complete_checkpoint", "release_stop_ids"]

THINKING = Path(__file__).resolve().parents[1] / "thinking"
PIPELINE_FILE = "pipeline_so8t_thinking.py"  # the checkpoint names of thinking/pipeline.py and thinking/format.py
FORMAT_FILE = "format.py"
LEXER_FILE = "lexer.py"  # format.py's one import (its confusables data: pip install confusable-homoglyphs)
GRAMMAR_FILES = ("grammar.py", "screen.py")  # the positive grammar that format.py and the pipeline read finals with
CUSTOM_PIPELINES = {
    "text-generation": {
        "impl": "pipeline_so8t_thinking.So8tThinkingPipeline",
        "pt": ["AutoModelForCausalLM"],
        "tf": [],
        "type": "text",
    }
}
END = "<|end|>"


def release_stop_ids(tokenizer, existing=None) -> list[int]:
    """`<|end|>` first, then every other stop id of `stop_token_ids`, then `existing` (a base's own list)."""
    end = tokenizer.convert_tokens_to_ids(END)
    if end is None or end == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {END} token: not a Phi-3 chat tokenizer")
    existing = [] if existing is None else existing if isinstance(existing, list) else [existing]
    ids = [end, *(i for i in stop_token_ids(tokenizer) if i != end), *existing]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read it as JSON ({err}); is this a saved so8t_hf model folder?") from err


def _tags_of(config: dict, tags: ThinkingTags | None) -> ThinkingTags:
    if tags is not None:
        return tags
    saved = config.get("thinking_tags")
    return ThinkingTags(tuple(saved["sections"]), saved["final"]) if saved else DEFAULT_TAGS


def complete_checkpoint(folder: str | Path, tags: ThinkingTags | None = None) -> dict:
    """Finish the saved SO8T-Phi3 thinking model in `folder` in place (see the module docstring); idempotent.
    `tags`: the run's tag set (default: the folder's `config.thinking_tags`, else the default set).
    Returns `{"eos_token_id": [...], "tags": ThinkingTags}`."""
    from transformers import AutoTokenizer, GenerationConfig

    folder = Path(folder)
    config_path = folder / "config.json"
    config = _read_json(config_path)
    missing = [f"{ref.split('.')[0]}.py" for ref in (config.get("auto_map") or {}).values()
               if not (folder / f"{ref.split('.')[0]}.py").is_file()]
    if not config.get("auto_map") or missing:
        raise FileNotFoundError(f"{folder} is not a complete SO8T-Phi3 folder: auto_map {config.get('auto_map')} "
                                f"(missing files: {missing}). Save the model with So8tPhi3ForCausalLM.save_pretrained.")
    tags = _tags_of(config, tags)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    was_special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} & set(tags.tokens)
    if add_thinking_tokens(tokenizer, tags=tags)["new_ids"]:
        raise ValueError(f"the tokenizer in {folder} lacks the thinking tags {tags.tokens}: not a thinking model")
    if was_special:
        tokenizer.save_pretrained(folder)
        logger.info("%s: thinking tags %s were special tokens; now plain tokens (skip_special_tokens keeps them)",
                    folder, sorted(was_special))

    if (folder / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(folder)
    else:
        generation = GenerationConfig(bos_token_id=config.get("bos_token_id"), eos_token_id=config.get("eos_token_id"))
    generation.eos_token_id = release_stop_ids(tokenizer, generation.eos_token_id)
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(folder)

    config["thinking_tags"] = {"sections": list(tags.sections), "final": tags.final}
    config["custom_pipelines"] = CUSTOM_PIPELINES
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shutil.copyfile(THINKING / "pipeline.py", folder / PIPELINE_FILE)
    shutil.copyfile(THINKING / "format.py", folder / FORMAT_FILE)
    shutil.copyfile(THINKING / "lexer.py", folder / LEXER_FILE)
    for name in GRAMMAR_FILES:
        shutil.copyfile(THINKING / name, folder / name)
    logger.info("%s: generation stops at %s; final-only text-generation pipeline %s", folder,
                generation.eos_token_id, CUSTOM_PIPELINES["text-generation"]["impl"])
    return {"eos_token_id": generation.eos_token_id, "tags": tags}
