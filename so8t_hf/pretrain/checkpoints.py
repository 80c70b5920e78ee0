"""The checkpoints a pre-training run leaves, and a completion chat with one.

- `find_best_checkpoint(output_dir)`: `best/` (lowest eval_loss, `BestCheckpointCallback`), else the Trainer's
  `best_model_checkpoint` of the newest `checkpoint-N/trainer_state.json`, else `final/`, else the newest
  `checkpoint-N/`. Logged: which rule found it.
- `python -m so8t_hf.pretrain.checkpoints [--checkpoint DIR | --output_dir DIR] [--prompt TEXT]`: load it with
  `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` (the checkpoint's own remote code) and continue
  each prompt (a pre-trained base model completes text; it has no chat template). Interactive on stdin without
  `--prompt`. `make chat-pretrained [CHECKPOINT=...]` runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

__all__ = ["complete", "find_best_checkpoint"]

logger = logging.getLogger(__name__)


def _numbered(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_best_checkpoint(output_dir: str | Path) -> Path:
    """The best model folder of a run (see the module docstring); raises naming what was looked for."""
    root = Path(output_dir)
    if (root / "best" / "config.json").is_file():
        logger.info("best checkpoint: %s (lowest eval_loss: %s)", root / "best", (root / "best" / "best.json").read_text().strip()
                    if (root / "best" / "best.json").is_file() else "?")
        return root / "best"
    numbered = _numbered(root)
    if numbered and (numbered[-1] / "trainer_state.json").is_file():
        best = json.loads((numbered[-1] / "trainer_state.json").read_text()).get("best_model_checkpoint")
        if best and Path(best).is_dir():
            logger.info("best checkpoint: %s (trainer_state best_model_checkpoint)", best)
            return Path(best)
    if (root / "final" / "config.json").is_file():
        logger.info("best checkpoint: %s (no evaluation: the final model)", root / "final")
        return root / "final"
    if numbered:
        logger.info("best checkpoint: %s (no evaluation, no final/: the newest checkpoint)", numbered[-1])
        return numbered[-1]
    raise FileNotFoundError(f"{root}: no best/, final/ or checkpoint-N/ model folder; train first (make pretrain) or "
                            "pass CHECKPOINT=path/to/folder")


def complete(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0) -> str:
    """The model's continuation of `prompt` (greedy at temperature 0)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").to(model.device)
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=sample,
                             temperature=temperature if sample else None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m so8t_hf.pretrain.checkpoints",
                                     description="Complete text with a pre-trained checkpoint (the best by default).")
    parser.add_argument("--checkpoint", help="model folder; default: the best of --output_dir")
    parser.add_argument("--output_dir", default="outputs/pretrain_1p5b", help="run folder searched for the best model")
    parser.add_argument("--prompt", help="continue this text and exit (default: interactive on stdin)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from so8t_hf.inference.loader import default_device, resolve_dtype

    folder = Path(args.checkpoint) if args.checkpoint else find_best_checkpoint(args.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=resolve_dtype("auto"))
    model = model.to(default_device()).eval()
    prompts = [args.prompt] if args.prompt is not None else None
    if prompts is None:
        print(f"{folder}: type a text to continue; empty line or Ctrl-D to quit", file=sys.stderr)
    for prompt in prompts or (line.rstrip("\n") for line in sys.stdin):
        if not prompt.strip():
            break
        print(prompt + complete(model, tokenizer, prompt, args.max_new_tokens, args.temperature), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
