"""Train the tiny byte-level BPE tokenizer shipped in `so8t_hf/assets/tiny_tokenizer/`.

What: a GPT-2-style byte-level BPE (no normaliser, so text round-trips exactly; any UTF-8 text,
Japanese included, encodes without `<unk>`), trained on the message contents of the bundled
sample data (`data/sample/*.jsonl`, English and Japanese) with the thinking tags removed. It has
Phi-3's special tokens with Phi-3.5's flags (`<|system|>`, `<|user|>`, `<|assistant|>` and
`<|end|>` absorb the whitespace after them, so the chat template tokenises as on Phi-3.5), EOS and
padding `<|endoftext|>`, and the default preset's thinking tags as single NON-special added tokens (as
`add_thinking_tokens` adds them: `decode(skip_special_tokens=True)` keeps them). The tokenizer config carries
the thinking chat template, inline (not as a .jinja file).

Ids: 0 `<unk>`, 1 `<s>`, 2 `</s>`, 3 `<|endoftext|>`, 4 `<|system|>`, 5 `<|user|>`,
6 `<|assistant|>`, 7 `<|end|>`, 8.. the tags, then the 256 byte symbols and the merges.

Limits: a toy for CPU tests and the tiny recipe, not for real models. Deterministic: the same
data and vocabulary size give byte-identical files (a test retrains and compares).

Usage: python scripts/train_tiny_tokenizer.py [--data data/sample] [--vocab-size 3000]
       [--output so8t_hf/assets/tiny_tokenizer]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from so8t_hf.thinking.chat_template import PHI3_THINKING_CHAT_TEMPLATE
from so8t_hf.thinking.data import load_thinking_dataset
from so8t_hf.thinking import DEFAULT_TAGS

REPO = Path(__file__).resolve().parents[1]
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>", *ROLE_TOKENS, *DEFAULT_TAGS.tokens)
MODEL_MAX_LENGTH = 4096


def corpus(data: str | Path) -> list[str]:
    """Every message content of the sample data, thinking tags replaced by newlines, in file order."""
    tag_re = re.compile("|".join(re.escape(t) for t in DEFAULT_TAGS.tokens))
    dataset = load_thinking_dataset(data, drop_earlier_thinking=False)  # every turn's thinking, as committed
    return [tag_re.sub("\n", m["content"]) for messages in dataset["messages"] for m in messages]


def build_tokenizer(data: str | Path = REPO / "data" / "sample", vocab_size: int = 3000) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on `data` and wrap it with Phi-3 specials and the chat template."""
    specials = [
        AddedToken(t, single_word=False, lstrip=False, rstrip=t in ROLE_TOKENS, normalized=False, special=True)
        for t in SPECIAL_TOKENS
    ]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(data), trainer=trainer)  # the trainer pins the ids 0..15, all special
    state = json.loads(backend.to_str())
    for entry in state["added_tokens"]:
        entry["special"] = entry["content"] not in DEFAULT_TAGS.tokens  # the tags: plain added tokens
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = PHI3_THINKING_CHAT_TEMPLATE
    return tokenizer


def save(tokenizer: PreTrainedTokenizerFast, output: str | Path) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json (chat template inline) and special_tokens_map.json."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(output, save_jinja_files=False)
    config_path = output / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # loads on transformers 4.x and 5.x alike
    config["add_bos_token"] = config["add_eos_token"] = False
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    token_map = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>"}
    (output / "special_tokens_map.json").write_text(json.dumps(token_map, indent=2) + "\n", encoding="utf-8")
    return sorted(output.iterdir())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO / "data" / "sample"), help="sample data folder or files")
    parser.add_argument("--vocab-size", type=int, default=3000, help="vocabulary size including special tokens")
    parser.add_argument("--output", default=str(REPO / "so8t_hf" / "assets" / "tiny_tokenizer"))
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer(args.data, args.vocab_size)
    for path in save(tokenizer, args.output):
        print(f"{path} ({path.stat().st_size:,} bytes)")
    print(f"vocabulary: {len(tokenizer)} tokens")


if __name__ == "__main__":
    main()
