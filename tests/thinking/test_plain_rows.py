"""Plain chat data beside thinking data: plain answers (and `reasoning_content: null`) train with empty sections,
in the canonical shape the parser and the final-only readers accept; `save_to_disk` folders and typed content parts
load; tool turns are refused with one problem per row naming the cause."""

import json
import logging

import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from so8t_hf.thinking import extract_final, find_thinking_problems, render_thinking
from so8t_hf.thinking.chat_template import apply_thinking_chat_template, thinking_labels
from so8t_hf.thinking.data import DataValidationError, load_thinking_dataset, tiny_tokenizer_path
from so8t_hf.thinking.validation import TOOL_REASON, normalize_thinking_row

Q = {"role": "user", "content": "What is 2 + 2?"}
TAGGED = ("<think-task>Add.</think-task>\n<think-safety>Harmless.</think-safety>\n<think-policy>Short.</think-policy>"
          "\n<final>4</final>")
EMPTY = {"task": "", "safety": "", "policy": ""}


def answer(content, **extra) -> dict:
    return {"role": "assistant", "content": content, **extra}


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_tok():
    return apply_thinking_chat_template(AutoTokenizer.from_pretrained(tiny_tokenizer_path()))


def test_plain_messages_train_with_empty_sections_beside_thinking_rows(tmp_path, tiny_tok, caplog):
    path = write(tmp_path / "mixed.jsonl", [
        {"messages": [Q, answer(" Four. ")]},  # a plain chat row
        {"messages": [Q, answer("4", reasoning_content=None)]},  # reasoning_content: null = no reasoning
        {"messages": [Q, answer(TAGGED)]},
    ])
    report = tmp_path / "report.json"
    with caplog.at_level(logging.INFO, logger="so8t_hf"):
        ds = load_thinking_dataset(path, report_path=report)
    plain = render_thinking(EMPTY, "Four.")
    assert plain == ("<think-task></think-task>\n<think-safety></think-safety>\n<think-policy></think-policy>\n"
                     "<final>Four.</final>")
    assert [m[-1]["content"] for m in ds["messages"]] == [plain, render_thinking(EMPTY, "4"), TAGGED]
    assert find_thinking_problems(plain) == [] and extract_final(plain) == "Four."  # the serving shape
    assert json.loads(report.read_text())["rows_without_thinking"] == 2
    assert "2 of 3 rows have no thinking (plain answers): they train with empty sections" in caplog.text
    # only assistant tokens carry labels: the rendered answer and <|end|>; the final alone in final_only
    ids = tiny_tok.apply_chat_template(ds["messages"][0], tokenize=True, return_dict=True)["input_ids"]
    labelled = lambda mode: tiny_tok.decode([t for t in thinking_labels(ids, tiny_tok, mode) if t != -100])  # noqa: E731
    assert labelled("assistant") == plain + "<|end|>"
    assert labelled("final_only") == "<final>Four.</final><|end|>"


def test_only_plain_rows_warn_that_no_row_teaches_thinking(tmp_path, caplog):
    path = write(tmp_path / "plain.jsonl", [{"instruction": "Q", "output": "A"}, {"prompt": "Q", "completion": "B"}])
    with caplog.at_level(logging.WARNING, logger="so8t_hf"):
        ds = load_thinking_dataset(path)
    assert [m[-1]["content"] for m in ds["messages"]] == [render_thinking(EMPTY, "A"), render_thinking(EMPTY, "B")]
    assert "no row teaches the model to think" in caplog.text


def test_content_part_lists_join_their_text_parts():
    parts = lambda *texts: [{"type": "text", "text": t} for t in texts]  # noqa: E731
    row = {"messages": [{"role": "system", "content": parts("Be brief.")}, {"role": "user", "content": parts("2 + 2", "?")},
                        answer(parts("Four."), reasoning_content="Sum.")]}
    messages, problems = normalize_thinking_row(row)
    assert problems == []
    assert messages[:2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2\n?"}]
    assert messages[2]["content"] == render_thinking({**EMPTY, "task": "Sum."}, "Four.")
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, answer("A")]}
    assert normalize_thinking_row(image)[1] == [
        ("messages[0].content[0].type", "content part type 'image_url' is not supported: only 'text' parts (the "
                                        "model reads text only)")]


def test_a_save_to_disk_folder_loads(tmp_path):
    rows = [{"messages": [Q, answer(TAGGED)]}, {"messages": [Q, answer("Four.", reasoning_content=None)]}]
    Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    ds = load_thinking_dataset(tmp_path / "saved")
    assert ds["source"] == [f"{tmp_path / 'saved'}:row 0", f"{tmp_path / 'saved'}:row 1"]
    assert [m[-1]["content"] for m in ds["messages"]] == [TAGGED, render_thinking(EMPTY, "Four.")]
    (tmp_path / "data").mkdir()  # inside a folder that is read recursively: one dataset, not its json files
    Dataset.from_list(rows[:1]).save_to_disk(tmp_path / "data" / "part")
    write(tmp_path / "data" / "more.jsonl", rows[:1])
    assert load_thinking_dataset(tmp_path / "data")["source"] == [f"{tmp_path / 'data' / 'more.jsonl'}:1",
                                                                  f"{tmp_path / 'data' / 'part'}:row 0"]
    DatasetDict(train=Dataset.from_list(rows), test=Dataset.from_list(rows)).save_to_disk(tmp_path / "dict")
    with pytest.raises(ValueError, match=r"is a saved DatasetDict with splits \['train', 'test'\]: give one split's "
                                         r"folder, e.g. .*dict/train"):
        load_thinking_dataset(tmp_path / "dict")


TOOL_CALL = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]
TOOL_ROWS = [
    ({"messages": [Q, answer("", tool_calls=TOOL_CALL), {"role": "tool", "content": "4", "tool_call_id": "c1"},
                   answer(TAGGED)]}, "messages[1].tool_calls"),
    ({"messages": [Q, answer(None, tool_calls=TOOL_CALL), {"role": "tool", "content": "4"}, answer("4")]},
     "messages[1].tool_calls"),
    ({"prompt": [Q, answer("", tool_calls=TOOL_CALL), {"role": "tool", "content": "4"}],
      "completion": [answer(TAGGED)]}, "prompt[1].tool_calls"),
    ({"messages": [Q, {"role": "function", "name": "add", "content": "4"}, answer(TAGGED)]}, "messages[1].role"),
    ({"messages": [Q, answer(TAGGED)], "tools": [{"type": "function", "function": {"name": "add"}}]}, "tools"),
]


@pytest.mark.parametrize("row, field", TOOL_ROWS)
def test_a_tool_row_is_one_problem_naming_the_cause(tmp_path, row, field):
    path = write(tmp_path / "tools.jsonl", [{"messages": [Q, answer(TAGGED)]}, row])
    with pytest.raises(DataValidationError) as err:
        load_thinking_dataset(path)
    assert [(p.line, p.field, p.reason) for p in err.value.problems] == [(2, field, TOOL_REASON)]
    assert TOOL_REASON.startswith("tool use is not supported: the Phi-3.5 chat template has no 'tool' role")
    assert len(load_thinking_dataset(path, on_bad_rows="skip")) == 1
