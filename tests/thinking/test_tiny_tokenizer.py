"""The shipped tiny tokenizer: exact round trip of English and Japanese text, special tokens and thinking tags
as single ids (the tags non-special, so skip_special_tokens keeps them), the Phi-3 chat format, assistant masks,
and a retrain that reproduces the committed files."""

import importlib.util

import pytest
import torch
from paths import PHI35_TOKENIZER, REPO
from tiny_models import tiny_so8t
from transformers import AutoTokenizer

from so8t_hf.thinking import DEFAULT_TAGS
from so8t_hf.thinking.chat_template import (
    PHI3_THINKING_CHAT_TEMPLATE,
    add_thinking_tokens,
    thinking_labels,
)
from so8t_hf.thinking.data import (
    load_thinking_dataset,
    sample_data_dir,
    tiny_tokenizer_path,
)

FILES = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
            *DEFAULT_TAGS.tokens]
ANSWER = ("<think-task>Greet back.</think-task>\n<think-safety>Harmless.</think-safety>\n"
          "<think-policy>Short.</think-policy>\n<final>こんにちは！</final>")
CONVO = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": ANSWER}]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tiny_tokenizer_path())


def _contents() -> dict[str, list[str]]:
    ds = load_thinking_dataset(sample_data_dir())
    out = {"en": [], "ja": []}
    for messages, source in zip(ds["messages"], ds["source"]):
        out["ja" if "thinking_ja" in source else "en"] += [m["content"] for m in messages]
    return out


def test_files_and_size():
    path = tiny_tokenizer_path()
    assert path == REPO / "so8t_hf" / "assets" / "tiny_tokenizer"
    assert sorted(p.name for p in path.iterdir()) == FILES
    assert sum(p.stat().st_size for p in path.iterdir()) < 400_000


def test_special_tokens_are_single_fixed_ids(tok):
    assert len(tok) == 3000
    assert [tok.convert_tokens_to_ids(t) for t in SPECIALS] == list(range(16))
    for i, t in enumerate(SPECIALS):
        assert tok.encode(f"a{t}b", add_special_tokens=False)[1] == i
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 3, 3)
    assert tok.encode("Hi", add_special_tokens=True) == tok.encode("Hi", add_special_tokens=False)  # no BOS/EOS added
    assert add_thinking_tokens(tok)["new_ids"] == []  # the tags are already there


def test_thinking_tags_are_not_special_and_survive_skip_special_tokens(tok):
    flags = {t.content: t.special for t in tok.added_tokens_decoder.values()}
    assert [flags[t] for t in SPECIALS] == [True] * 8 + [False] * len(DEFAULT_TAGS.tokens)
    ids = tok.apply_chat_template(CONVO, tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "Be kind.Hi" + ANSWER  # roles (with their newline) gone, tags kept


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_round_trip_of_sample_text(tok, lang):
    texts = _contents()[lang]
    assert len(texts) == 42 + 42 + 4  # user turns, assistant turns, system messages
    n_chars = n_tokens = 0
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids
        n_chars, n_tokens = n_chars + len(text), n_tokens + len(ids)
    assert n_chars / n_tokens > (3.5 if lang == "en" else 2.0)  # trained merges, not bytes (3.9 / 2.5 now)


def test_unseen_text_never_gives_unk(tok):
    text = "鬱蒼とした森で𠮷野さんが🦊を見た。Zürich — naïve façade ½ ∑"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids and tok.decode(ids) == text


def test_chat_template_renders_phi3_format(tok):
    assert tok.chat_template == PHI3_THINKING_CHAT_TEMPLATE
    text = tok.apply_chat_template(CONVO, tokenize=False)
    assert text == f"<|system|>\nBe kind.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n{ANSWER}<|end|>\n<|endoftext|>"
    assert tok.apply_chat_template(CONVO[:2], tokenize=False, add_generation_prompt=True) == (
        "<|system|>\nBe kind.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n")
    # Role tokens absorb the newline after them, as on Phi-3.5.
    ids = tok.apply_chat_template(CONVO, tokenize=True, return_dict=True)["input_ids"]
    kind = tok.encode("Be kind.", add_special_tokens=False)
    assert ids[: len(kind) + 2] == [4, *kind, 7]
    specials = [t for t in ids if t < 16]
    assert specials == [4, 7, 5, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15, 7, 3]
    if (PHI35_TOKENIZER / "chat_template.jinja").is_file():
        original = (PHI35_TOKENIZER / "chat_template.jinja").read_text()
        assert text == tok.apply_chat_template(CONVO, tokenize=False, chat_template=original)


def test_assistant_mask_equals_thinking_labels(tok):
    out = tok.apply_chat_template(CONVO, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == ANSWER + "<|end|>"
    assert [int(lab != -100) for lab in thinking_labels(ids, tok)] == mask


def test_tiny_model_runs_on_tokenised_chat(tok):
    model = tiny_so8t(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=3)
    ids = torch.tensor([tok.apply_chat_template(CONVO, tokenize=True, return_dict=True)["input_ids"]])
    labels = thinking_labels(ids, tok, "final_only")
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (1, ids.shape[1], 3000) and torch.isfinite(out.loss)


def test_retraining_reproduces_the_committed_files(tmp_path):
    spec = importlib.util.spec_from_file_location("train_tiny_tokenizer", REPO / "scripts" / "train_tiny_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--output", str(tmp_path)])
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (tiny_tokenizer_path() / name).read_bytes(), (
            f"{name} differs: rerun scripts/train_tiny_tokenizer.py and commit the result")
