"""What the model sees at chat time is what it was trained on: the chat template renders earlier assistant turns as
training renders them (`drop_earlier_thinking`, the default): their final text only. The same 2-turn conversation
through the chat template (a whole earlier reply in the history, as a user of `apply_chat_template` keeps it) and
through training's rendering gives the same tokens for the history, with the tiny and the real Phi-3.5 tokenizers;
`keep_earlier_thinking=True` renders them whole, as rows loaded with `drop_earlier_thinking=False` train."""

import pytest
from paths import PHI35_TOKENIZER
from transformers import AutoTokenizer

from so8t_hf.thinking import extract_final, get_tag_preset, render_thinking
from so8t_hf.thinking.chat_template import add_thinking_tokens, apply_thinking_chat_template, thinking_labels
from so8t_hf.thinking.data import tiny_tokenizer_path
from so8t_hf.thinking.validation import normalize_thinking_row

SYSTEM = {"role": "system", "content": "Be brief."}
Q1, Q2 = {"role": "user", "content": "What is 2 + 2?"}, {"role": "user", "content": "And 3 + 3?"}
A1 = render_thinking({"task": "Add two and two.", "safety": "Harmless.", "policy": "Be short."}, " 4 ")
A2 = render_thinking({"task": "Add three and three.", "safety": "Harmless.", "policy": "Be short."}, "6")
ROW = {"messages": [SYSTEM, Q1, {"role": "assistant", "content": A1}, Q2, {"role": "assistant", "content": A2}]}


def _tiny():
    return AutoTokenizer.from_pretrained(tiny_tokenizer_path())


def _phi35():
    if not (PHI35_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"real Phi-3.5 tokenizer fixture not found at {PHI35_TOKENIZER} (set SO8T_PHI35_TOKENIZER)")
    tok = AutoTokenizer.from_pretrained(PHI35_TOKENIZER)
    add_thinking_tokens(tok)
    return tok


@pytest.fixture(params=["tiny", "phi35"])
def tok(request):
    return apply_thinking_chat_template(_tiny() if request.param == "tiny" else _phi35())


def ids(tok, messages, **kwargs) -> list[int]:
    return tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]


def test_the_chat_history_has_the_tokens_training_gave_it(tok):
    trained, problems = normalize_thinking_row(ROW)  # drop_earlier_thinking: the default
    assert problems == [] and trained[2] == {"role": "assistant", "content": "4"}
    train_ids = ids(tok, trained)
    histories = {
        "whole replies": ROW["messages"][:4],  # what an apply_chat_template user keeps
        "finals (so8t-hf chat, server, pipeline)": [SYSTEM, Q1, {"role": "assistant", "content": extract_final(A1)}, Q2],
    }
    for name, history in histories.items():
        chat_ids = ids(tok, history, add_generation_prompt=True)
        assert train_ids[: len(chat_ids)] == chat_ids, name
        text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|assistant|>\n4<|end|>\n<|user|>\nAnd 3 + 3?<|end|>\n<|assistant|>\n"), name
    labelled = [t for t in thinking_labels(train_ids, tok) if t != -100]
    assert tok.decode(labelled) == A2 + "<|end|>"  # the last turn trains whole; the earlier one is context


def test_keeping_earlier_thinking_renders_it_whole_as_training_then_does(tok):
    kept, problems = normalize_thinking_row(ROW, drop_earlier_thinking=False)
    assert problems == [] and kept[2]["content"] == A1
    train_ids = ids(tok, kept, keep_earlier_thinking=True)
    chat_ids = ids(tok, ROW["messages"][:4], add_generation_prompt=True, keep_earlier_thinking=True)
    assert train_ids[: len(chat_ids)] == chat_ids and "Add two and two." in tok.decode(chat_ids)
    assert "Add two and two." not in tok.decode(ids(tok, ROW["messages"][:4], add_generation_prompt=True))


def test_earlier_turns_without_a_final_and_other_tag_sets():
    tok = _tiny()
    apply_thinking_chat_template(tok)
    cut = "<think-task>Add two and two, and then</think-task>\n<think-safety>ok"  # a reply cut before its final
    history = [Q1, {"role": "assistant", "content": cut}, Q2]
    assert tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nWhat is 2 + 2?<|end|>\n<|assistant|>\n<|end|>\n<|user|>\nAnd 3 + 3?<|end|>\n<|assistant|>\n")
    r4 = get_tag_preset("reasoning4")
    apply_thinking_chat_template(tok, r4)
    history[1]["content"] = "<think-logic>Sum.</think-logic>\n<think-ethics>ok"
    assert "Sum." not in tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("drop", [True, False])
def test_the_recipe_trains_earlier_thinking_only_when_it_keeps_it(tmp_path, drop):
    import json

    from so8t_hf.sft import ThinkingDataConfig
    from so8t_hf.sft.pipeline import build_datasets
    from so8t_hf.thinking import DEFAULT_TAGS

    tok = apply_thinking_chat_template(_tiny())
    (tmp_path / "rows.jsonl").write_text(json.dumps(ROW) + "\n")
    data = ThinkingDataConfig(dataset_path=[str(tmp_path / "rows.jsonl")], drop_earlier_thinking=drop, eval_fraction=0)
    train, _, _ = build_datasets(data, tok, None, tmp_path, DEFAULT_TAGS, 0)
    labelled = tok.decode([t for t in train[0]["labels"] if t != -100])
    assert labelled == ("" if drop else A1 + "<|end|>") + A2 + "<|end|>"
