"""Thinking tags as non-special added tokens on the real Phi-3.5 tokenizer: single ids in the spare embedding
rows, the same token ids as the special tokens they replace, visible after `skip_special_tokens=True`, and tags
that an old tokenizer holds as special tokens turned into plain ones."""

import pytest
from transformers import AddedToken, AutoTokenizer

from so8t_hf.thinking import DEFAULT_TAGS
from so8t_hf.thinking.chat_template import add_thinking_tokens, apply_thinking_chat_template

ANSWER = ("<think-task>Add.</think-task>\n<think-safety>Fine.</think-safety>\n<think-policy>Short.</think-policy>\n"
          "<final>4</final>")
CONVO = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": ANSWER}]


@pytest.fixture
def phi35(phi35_tokenizer_dir):
    return apply_thinking_chat_template(AutoTokenizer.from_pretrained(phi35_tokenizer_dir))


def _flags(tok):
    return {t.content: t.special for t in tok.added_tokens_decoder.values()}


def test_tags_are_single_non_special_tokens_in_the_spare_rows(phi35, tmp_path):
    summary = add_thinking_tokens(phi35)
    assert summary["new_ids"] == list(range(32011, 32019)) and len(phi35) == 32019  # Phi-3.5 has 32,064 rows
    assert [_flags(phi35)[t] for t in DEFAULT_TAGS.tokens] == [False] * 8
    for tag, i in summary["token_ids"].items():
        assert phi35.encode(f"x{tag}y", add_special_tokens=False)[1] == i
    ids = phi35.apply_chat_template(CONVO, tokenize=True, return_dict=True)["input_ids"]
    assert ANSWER in phi35.decode(ids, skip_special_tokens=True)
    assert "<|assistant|>" not in phi35.decode(ids, skip_special_tokens=True)  # real specials still skipped
    phi35.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.decode(ids, skip_special_tokens=True) == phi35.decode(ids, skip_special_tokens=True)
    assert add_thinking_tokens(again)["new_ids"] == [] and len(again) == 32019


def test_token_ids_equal_those_of_the_old_special_tags(phi35, phi35_tokenizer_dir):
    old = apply_thinking_chat_template(AutoTokenizer.from_pretrained(phi35_tokenizer_dir))
    old.add_special_tokens({"extra_special_tokens": [AddedToken(t, normalized=False, special=True)
                                                     for t in DEFAULT_TAGS.tokens]}, replace_extra_special_tokens=False)
    add_thinking_tokens(phi35)
    text = phi35.apply_chat_template(CONVO, tokenize=False) + " a <final> inside user text"
    assert phi35.encode(text, add_special_tokens=False) == old.encode(text, add_special_tokens=False)


def test_tags_held_as_special_tokens_become_plain_tokens_with_the_same_ids(phi35_tokenizer_dir, tmp_path):
    old = AutoTokenizer.from_pretrained(phi35_tokenizer_dir)
    old.add_special_tokens({"extra_special_tokens": [AddedToken(t, normalized=False, special=True)
                                                     for t in DEFAULT_TAGS.tokens]}, replace_extra_special_tokens=False)
    old.save_pretrained(tmp_path)  # a tokenizer written by so8t_hf 0.1
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok.encode("a<final>b</final>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "ab"  # what 0.1 gave: tags dropped
    summary = add_thinking_tokens(tok)
    assert summary["new_ids"] == [] and summary["token_ids"]["<final>"] == 32017 and len(tok) == 32019
    assert [_flags(tok)[t] for t in DEFAULT_TAGS.tokens] == [False] * 8
    assert tok.encode("a<final>b</final>", add_special_tokens=False) == ids
    assert tok.decode(ids, skip_special_tokens=True) == "a<final>b</final>"
    tok.save_pretrained(tmp_path / "new")
    assert AutoTokenizer.from_pretrained(tmp_path / "new").decode(ids, skip_special_tokens=True) == "a<final>b</final>"
