"""Reasoning data in the ecosystem's shapes: `reasoning_content` / `thinking` beside a plain answer,
`<think>...</think>answer` (DeepSeek-R1, Qwen3), TRL prompt/completion rows, each mapped onto the tag set; the
option that keeps only the final text of earlier assistant turns, and the loss labels of those turns."""

import json

import pytest
from transformers import AutoTokenizer

from so8t_hf.thinking import get_tag_preset, render_thinking
from so8t_hf.thinking.chat_template import thinking_labels
from so8t_hf.thinking.data import DataValidationError, load_thinking_dataset, tiny_tokenizer_path
from so8t_hf.thinking.validation import normalize_thinking_row, row_shape

Q = {"role": "user", "content": "What is 2 + 2?"}
TAGGED = ("<think-task>Add.</think-task>\n<think-safety>Harmless.</think-safety>\n<think-policy>Short.</think-policy>"
          "\n<final>4</final>")


def mapped(reasoning: str, final: str = "4", section: str = "task", tags=None) -> str:
    """What a free-text reasoning + answer becomes: the reasoning in one section, the others empty."""
    tags = tags or get_tag_preset("default")
    return render_thinking({k: reasoning if k == section else "" for k in tags.keys}, final, tags)


def answer(content: str) -> dict:
    return {"role": "assistant", "content": content}


ECOSYSTEM = [
    ("reasoning_content",
     {"messages": [Q, {"role": "assistant", "content": " 4 ", "reasoning_content": "\n2 plus 2.\n"}]},
     [Q, answer(mapped("2 plus 2."))]),
    ("thinking key (gpt-oss / LFM)",
     {"messages": [Q, {"role": "assistant", "content": "4", "thinking": "2 plus 2."}]},
     [Q, answer(mapped("2 plus 2."))]),
    ("empty reasoning_content",
     {"messages": [Q, {"role": "assistant", "content": "4", "reasoning_content": ""}]},
     [Q, answer(mapped(""))]),
    ("<think> answer (Qwen3)", {"messages": [Q, answer("<think>\nTwo and two.\n</think>\n\n4")]},
     [Q, answer(mapped("Two and two."))]),
    ("R1 output without the opening <think>", {"messages": [Q, answer("Two and two.\n</think>\n\n4")]},
     [Q, answer(mapped("Two and two."))]),
    ("Qwen3 no-think answer", {"messages": [Q, answer("<think>\n\n</think>\n\n4")]}, [Q, answer(mapped(""))]),
    ("<think> in output", {"instruction": "What is 2 + 2?", "output": "<think>Sum.</think>4"},
     [Q, answer(mapped("Sum."))]),
    ("TRL conversational prompt/completion",
     {"prompt": [{"role": "system", "content": "Be brief."}, Q],
      "completion": [{"role": "assistant", "content": "4", "reasoning_content": "Sum."}]},
     [{"role": "system", "content": "Be brief."}, Q, answer(mapped("Sum."))]),
    ("TRL conversational, multi-turn prompt",
     {"prompt": [Q, answer(TAGGED), {"role": "user", "content": "And 3 + 3?"}],
      "completion": [answer("<think>Sum.</think>6")]},
     [Q, answer("4"), {"role": "user", "content": "And 3 + 3?"}, answer(mapped("Sum.", "6"))]),
    ("TRL plain prompt/completion", {"prompt": "What is 2 + 2?", "completion": "<think>Sum.</think> 4"},
     [Q, answer(mapped("Sum."))]),
    ("TRL plain completion in the tag format", {"prompt": "What is 2 + 2?", "completion": TAGGED},
     [Q, answer(TAGGED)]),
]


@pytest.mark.parametrize("name, row, expected", ECOSYSTEM, ids=[e[0] for e in ECOSYSTEM])
def test_ecosystem_shapes_map_onto_the_tag_set(tmp_path, name, row, expected):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    ds = load_thinking_dataset(path)
    assert ds["messages"] == [expected]
    assert ds["source"] == [f"{path}:1"]


def test_mapping_is_explicit_about_the_empty_sections():
    messages, problems = normalize_thinking_row({"prompt": "Q", "completion": "<think>R</think>A"})
    assert problems == [] and messages[-1]["content"] == (
        "<think-task>R</think-task>\n<think-safety></think-safety>\n<think-policy></think-policy>\n<final>A</final>")


def test_reasoning_section_is_configurable_and_checked():
    row = {"messages": [Q, {"role": "assistant", "content": "4", "reasoning_content": "Sum."}]}
    messages, _ = normalize_thinking_row(row, reasoning_section="policy")
    assert messages[-1]["content"] == mapped("Sum.", section="policy")
    r4 = get_tag_preset("reasoning4")
    messages, _ = normalize_thinking_row(row, r4)  # default: the first section of the tag set
    assert messages[-1]["content"] == mapped("Sum.", section="logic", tags=r4)
    with pytest.raises(ValueError, match=r"reasoning_section='plan' is not a section of this tag set; choose one of "
                                         r"\['task', 'safety', 'policy'\]"):
        normalize_thinking_row(row, reasoning_section="plan")
    with pytest.raises(ValueError, match="reasoning_section='task' is not a section"):
        load_thinking_dataset("unused.jsonl", tags="reasoning4", reasoning_section="task")


def test_row_shape_names_trl_rows():
    assert row_shape({"prompt": "Q", "completion": "A"}) == "prompt_completion"
    assert row_shape({"prompt": [Q], "completion": None}) == "prompt_completion"
    assert row_shape({"messages": [Q], "prompt": None}) == "chat"


BAD = [
    ({"messages": [Q, {"role": "assistant", "content": "<think>R</think>4", "reasoning_content": "R"}]},
     "messages[1].content", "contains the tag '<think>'; give plain text"),
    ({"messages": [Q, {"role": "assistant", "content": "4", "reasoning_content": ["R"]}]},
     "messages[1].reasoning_content", "must be a string, got list"),
    ({"messages": [Q, {"role": "assistant", "content": " ", "reasoning_content": "R"}]}, "messages[1].content",
     "empty"),
    ({"messages": [Q, {"role": "assistant", "content": "4", "reasoning_content": "R<|end|>"}]},
     "messages[1].reasoning_content", "contains the special token '<|end|>'"),
    ({"messages": [Q, {"role": "assistant", "content": "4", "reasoning_content": "R <think-task>x"}]},
     "messages[1].reasoning_content", "contains the tag '<think-task>'"),
    ({"messages": [Q, {"role": "assistant", "content": "4", "reasoning_content": "R", "thinking": "T"}]},
     "messages[1].thinking", "give the reasoning once, in 'reasoning_content'"),
    ({"messages": [{"role": "user", "content": "Q", "reasoning_content": "R"}, answer(TAGGED)]},
     "messages[0].reasoning_content", "only assistant turns carry reasoning"),
    ({"messages": [Q, answer("<think>R, no close. 4")]}, "messages[1].content", "'<think>' is never closed"),
    ({"messages": [Q, answer("<think>R</think>4</think>")]}, "messages[1].content",
     "holds 1 '<think>' and 2 '</think>'"),
    ({"messages": [Q, answer("Sure. <think>R</think>4")]}, "messages[1].content",
     "text before '<think>': 'Sure.'; the reasoning must open the answer"),
    ({"messages": [Q, answer("R</think><think>4")]}, "messages[1].content", "'<think>' comes after '</think>'"),
    ({"messages": [Q, answer("<think>R</think>\n")]}, "messages[1].content", "no answer after '</think>'"),
    ({"messages": [Q, answer("<think>R</think><final>4</final>")]}, "messages[1].content",
     "contains the tag '<final>'; give plain text"),
    ({"messages": [Q, answer([{"type": "text", "text": 4}])]}, "messages[1].content[0].text", "must be a string, got int"),
    ({"prompt": "Q"}, "completion", "missing (TRL's prompt/completion rows need both)"),
    ({"completion": "<think>R</think>4"}, "prompt", "missing"),
    ({"prompt": [Q], "completion": "<think>R</think>4"}, "completion",
     "'prompt' and 'completion' must both be strings (plain) or both lists of messages (conversational); "
     "got list and str"),
    ({"prompt": [Q, answer(TAGGED)], "completion": [answer(TAGGED)]}, "prompt",
     "the last turn of the prompt must be 'user', got 'assistant'"),
    ({"prompt": [Q], "completion": []}, "completion", "must be a non-empty list"),
    ({"prompt": [Q], "completion": [{"role": "user", "content": "x"}]}, "completion[0].role",
     "expected role 'assistant' here"),
    ({"prompt": "Q", "completion": "<think>R</think>4", "messages": [Q]}, "messages",
     "a prompt/completion row holds its turns in 'prompt' and 'completion' only"),
    ({"prompt": "Q", "completion": "<think>R</think>4", "system": "S"}, "system",
     "a prompt/completion row holds its turns in 'prompt' and 'completion' only"),
    ({"instruction": "Q", "output": TAGGED, "completion": "x"}, "completion",
     "give either 'completion' or 'instruction' + 'output', not both"),
    ({"prompt": "Q<|end|>", "completion": "<think>R</think>4"}, "prompt", "contains the special token '<|end|>'"),
]


@pytest.mark.parametrize("row, field, reason", BAD)
def test_bad_ecosystem_rows_name_file_line_and_field(tmp_path, row, field, reason):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "Q", "completion": "<think>R</think>4"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataValidationError) as err:
        load_thinking_dataset(path)
    assert f"{path}:2: field '{field}': {reason}" in str(err.value)
    assert {(p.line, p.row) for p in err.value.problems} == {(2, 1)}


# ------------------------------------------------------------------------------------ earlier turns


EARLIER = [  # (earlier assistant turn, what chat keeps of it)
    (answer(TAGGED), "4"),
    ({"role": "assistant", "content": " 4 ", "reasoning_content": "Sum."}, "4"),
    (answer("<think>Sum.</think>\n\n4"), "4"),
    (answer("Four."), "Four."),  # a plain reply, as chat histories hold
]


@pytest.mark.parametrize("earlier, kept", EARLIER)
def test_earlier_turns_keep_only_their_final_text_by_default(earlier, kept):
    row = {"messages": [Q, earlier, {"role": "user", "content": "And 3 + 3?"}, answer("<think>Sum.</think>6")]}
    messages, problems = normalize_thinking_row(row)
    assert problems == [] and messages[1] == answer(kept)
    assert messages[3] == answer(mapped("Sum.", "6"))  # the last turn keeps its thinking


def test_keeping_earlier_thinking_renders_every_turn_in_the_tag_format():
    row = {"messages": [Q, {"role": "assistant", "content": "4", "reasoning_content": "Sum."}, Q, answer(TAGGED)]}
    messages, problems = normalize_thinking_row(row, drop_earlier_thinking=False)
    assert problems == [] and messages[1] == answer(mapped("Sum.")) and messages[3] == answer(TAGGED)
    plain = {"messages": [Q, answer("Four."), Q, answer(TAGGED)]}  # a plain reply: empty sections
    messages, problems = normalize_thinking_row(plain, drop_earlier_thinking=False)
    assert problems == [] and messages[1] == answer(mapped("", "Four."))


def test_bad_earlier_turns_are_reported_even_when_their_thinking_is_dropped():
    row = {"messages": [Q, answer(TAGGED.replace("</think-task>", "")), Q, answer(TAGGED)]}
    _, problems = normalize_thinking_row(row)
    assert ("messages[1].content", "unclosed tag <think-task>") in problems
    _, problems = normalize_thinking_row({"messages": [Q, answer("Fine<|end|>"), Q, answer(TAGGED)]})
    assert problems == [("messages[1].content", "contains the special token '<|end|>'; remove it (the chat "
                                                "template adds turns)")]


@pytest.fixture(scope="module")
def tiny_tok():
    return AutoTokenizer.from_pretrained(tiny_tokenizer_path())


MULTI = {"messages": [Q, {"role": "assistant", "content": "4", "reasoning_content": "Two and two."},
                      {"role": "user", "content": "And 3 + 3?"}, answer("<think>Sum.</think>6")]}


def _labelled_text(tok, ids, mode):
    return tok.decode([t for t in thinking_labels(ids, tok, mode) if t != -100])


def test_earlier_turns_without_thinking_are_context_in_the_loss(tiny_tok):
    dropped, _ = normalize_thinking_row(MULTI)
    kept, _ = normalize_thinking_row(MULTI, drop_earlier_thinking=False)
    ids = tiny_tok.apply_chat_template(dropped, tokenize=True, return_dict=True)["input_ids"]
    assert _labelled_text(tiny_tok, ids, "assistant") == mapped("Sum.", "6") + "<|end|>"
    assert _labelled_text(tiny_tok, ids, "final_only") == "<final>6</final><|end|>"
    assert thinking_labels(ids, tiny_tok, "all") == ids
    out = tiny_tok.apply_chat_template(kept, return_dict=True, return_assistant_tokens_mask=True, keep_earlier_thinking=True)
    ids, mask = out["input_ids"], out["assistant_masks"]  # both turns keep thinking: both train, = the template
    assert [int(lab != -100) for lab in thinking_labels(ids, tiny_tok)] == mask
    assert _labelled_text(tiny_tok, ids, "assistant") == (mapped("Two and two.") + "<|end|>"
                                                          + mapped("Sum.", "6") + "<|end|>")


def test_labels_of_packed_rows_equal_the_rows_labels(tiny_tok):
    rows = [normalize_thinking_row(MULTI)[0], normalize_thinking_row({"prompt": "Q", "completion": "Hi</think>A"})[0]]
    ids = [tiny_tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"] for m in rows]
    for mode in ("assistant", "final_only"):
        assert thinking_labels(ids[0] + ids[1], tiny_tok, mode) == (
            thinking_labels(ids[0], tiny_tok, mode) + thinking_labels(ids[1], tiny_tok, mode))
