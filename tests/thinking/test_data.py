"""Thinking data: each row shape, each validation error (file:line, field), skip mode + report,
truncation report, train/eval split, label masks through the tiny tokenizer and the chat template,
TRL's dataset preparation, and tag tokenisation with the real Phi-3.5 tokenizer."""

import json
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from paths import PHI35_TOKENIZER
from transformers import AutoTokenizer

from so8t_hf.thinking import (
    DEFAULT_TAGS,
    extract_final,
    find_thinking_problems,
    get_tag_preset,
    render_thinking,
)
from so8t_hf.thinking.chat_template import (
    add_thinking_tokens,
    apply_thinking_chat_template,
    thinking_labels,
)
from so8t_hf.thinking.data import (
    DataValidationError,
    check_truncation,
    drop_truncated,
    load_thinking_dataset,
    sample_data_dir,
    split_train_eval,
    tiny_tokenizer_path,
)
from so8t_hf.thinking.validation import row_shape

SECTIONS = {"task": "Add the numbers.", "safety": "Harmless.", "policy": "One line."}
ANSWER = render_thinking(SECTIONS, "4")
TAGGED = ("<think-task>Add the numbers.</think-task>\n<think-safety>Harmless.</think-safety>\n"
          "<think-policy>One line.</think-policy>\n<final>4</final>")
USER = {"role": "user", "content": "What is 2 + 2?"}
ASSISTANT = {"role": "assistant", "content": TAGGED}


def write_jsonl(path: Path, rows: list, blank_after: int | None = None) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_tok():
    return AutoTokenizer.from_pretrained(tiny_tokenizer_path())


@pytest.fixture
def phi35():
    if not (PHI35_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"real Phi-3.5 tokenizer fixture not found at {PHI35_TOKENIZER} (set SO8T_PHI35_TOKENIZER)")
    tok = AutoTokenizer.from_pretrained(PHI35_TOKENIZER)
    add_thinking_tokens(tok)
    return apply_thinking_chat_template(tok)


# ------------------------------------------------------------------------------------ row shapes


SHAPES = [
    # (a) structured, instruction + input + system
    ({"system": "Be brief.", "instruction": "Add these.", "input": "2 + 2", "thinking": SECTIONS, "final": "4"},
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add these.\n\n2 + 2"},
      {"role": "assistant", "content": ANSWER}]),
    # (a) structured, prompt as messages
    ({"messages": [USER], "thinking": SECTIONS, "final": " 4 ", "id": 7},
     [USER, {"role": "assistant", "content": ANSWER}]),
    # (b) origin project: instruction / empty input / output with the tags
    ({"instruction": "What is 2 + 2?", "input": "", "output": TAGGED}, [USER, ASSISTANT]),
    # (c) chat, multi-turn, empty system message dropped, the earlier turn's thinking dropped (as chat keeps history)
    ({"messages": [{"role": "system", "content": ""}, USER, ASSISTANT, USER, ASSISTANT]},
     [USER, {"role": "assistant", "content": "4"}, USER, ASSISTANT]),
]


def test_each_row_shape_is_normalised(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [row for row, _ in SHAPES])
    ds = load_thinking_dataset(path)
    assert ds.column_names == ["messages", "source"]
    assert ds["messages"] == [expected for _, expected in SHAPES]
    assert ds["source"] == [f"{path}:{i}" for i in (1, 2, 3, 4)]
    assert ANSWER == TAGGED


def test_json_array_and_parquet_give_the_same_rows(tmp_path):
    rows = [row for row, _ in SHAPES]
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows)), tmp_path / "b.parquet")  # nulls fill other columns
    ds = load_thinking_dataset([tmp_path / "a.json", tmp_path / "b.parquet"])
    assert ds["messages"] == [e for _, e in SHAPES] * 2
    assert ds["source"][:2] == [f"{tmp_path / 'a.json'}:row 0", f"{tmp_path / 'a.json'}:row 1"]
    assert ds["source"][-1] == f"{tmp_path / 'b.parquet'}:row 3"


def test_system_prompt_and_reasoning4_tags(tmp_path):
    r4 = get_tag_preset("reasoning4")
    row = {"instruction": "Hi", "thinking": {k: "x" for k in r4.keys}, "final": "Hello"}
    path = write_jsonl(tmp_path / "r4.jsonl", [row, {"messages": [{"role": "system", "content": "Own."}, USER,
                                                                   {"role": "assistant", "content": render_thinking(
                                                                       {k: "y" for k in r4.keys}, "4", r4)}]}])
    ds = load_thinking_dataset(path, tags="reasoning4", system_prompt="Default.")
    assert [m[0] for m in ds["messages"]] == [{"role": "system", "content": "Default."},
                                              {"role": "system", "content": "Own."}]
    assert ds["messages"][0][2]["content"] == render_thinking({k: "x" for k in r4.keys}, "Hello", r4)
    with pytest.raises(DataValidationError, match=r"r4.jsonl:1: field 'thinking.task': missing"):
        load_thinking_dataset(path)


def test_sample_data_has_every_shape_and_is_valid():
    files = sorted(sample_data_dir().glob("*.jsonl"))
    assert [f.name for f in files] == ["thinking_en.jsonl", "thinking_ja.jsonl"]
    for f in files:
        raw = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]
        shapes = [row_shape(r) for r in raw]
        assert len(raw) == 40 and {s: shapes.count(s) for s in set(shapes)} == {"structured": 13, "output": 13,
                                                                                 "chat": 14}
    kept = load_thinking_dataset(sample_data_dir(), drop_earlier_thinking=False)
    answers = [m["content"] for ms in kept["messages"] for m in ms if m["role"] == "assistant"]
    assert len(answers) == 84 and all(find_thinking_problems(a) == [] for a in answers)
    ds = load_thinking_dataset(sample_data_dir())  # earlier turns: their final text, as chat keeps history
    assert len(ds) == 80
    earlier = [(m["content"], k["content"]) for ms, ks in zip(ds["messages"], kept["messages"])
               for m, k in zip(ms[:-1], ks[:-1]) if m["role"] == "assistant"]
    assert len(earlier) == 4 and all(m == extract_final(k) and "<" not in m for m, k in earlier)
    assert [ms[-1] for ms in ds["messages"]] == [ks[-1] for ks in kept["messages"]]
    refusals = [a for a in answers if any(w in a for w in ("I can't", "I won't", "できません"))]
    assert len(refusals) >= 8
    ja = [ms[-1]["content"] for ms, src in zip(ds["messages"], ds["source"]) if "thinking_ja" in src]
    assert len(ja) == 40 and all(any("\u3040" <= ch <= "\u30ff" for ch in a) for a in ja)  # kana in every answer


# ------------------------------------------------------------------------------------ validation


BAD_ROWS = [
    ({"instruction": "Q", "thinking": {"task": "t", "policy": "p"}, "final": "A"}, "thinking.safety", "missing"),
    ({"instruction": "Q", "thinking": {**SECTIONS, "plan": "x"}, "final": "A"}, "thinking.plan", "unknown section"),
    ({"instruction": "Q", "thinking": {**SECTIONS, "task": "  "}, "final": "A"}, "thinking.task", "empty"),
    ({"instruction": "Q", "thinking": {**SECTIONS, "task": 3}, "final": "A"}, "thinking.task",
     "must be a string, got int"),
    ({"instruction": "Q", "thinking": "plan", "final": "A"}, "thinking", "must be a mapping"),
    ({"instruction": "Q", "thinking": SECTIONS}, "final", "missing"),
    ({"instruction": "Q", "thinking": SECTIONS, "final": ""}, "final", "empty"),
    ({"instruction": "Q", "thinking": SECTIONS, "final": "A</final>"}, "final", "contains the tag '</final>'"),
    ({"instruction": "Q", "thinking": {**SECTIONS, "safety": "ok <think-x>"}, "final": "A"}, "thinking.safety",
     "contains the tag '<think-x>'"),
    ({"thinking": SECTIONS, "final": "A"}, "instruction", "missing"),
    ({"instruction": "Q", "input": 5, "output": TAGGED}, "input", "must be a string, got int"),
    ({"instruction": "Q", "output": TAGGED, "final": "A", "thinking": SECTIONS}, "output",
     "give either 'output' or 'thinking' + 'final', not both"),
    ({"instruction": "Q", "output": TAGGED.replace("</think-task>", "")}, "output", "unclosed tag <think-task>"),
    ({"instruction": "Q", "output": TAGGED.replace("\n<final>4</final>", "")}, "output", "missing <final>"),
    ({"instruction": "Q", "output": "<think-safety>s</think-safety>\n<think-task>t</think-task>\n"
      "<think-policy>p</think-policy>\n<final>4</final>"}, "output", "out-of-order <think-task>"),
    ({"instruction": "Q", "output": TAGGED.replace("Harmless.", "<think-task>x</think-task>")}, "output",
     "nested tag <think-task> inside <think-safety>"),
    ({"instruction": "Q", "output": "4<|end|>"}, "output", "contains the special token '<|end|>'"),  # plain answer
    ({"instruction": "Q", "output": "4 <final>4</final>"}, "output", "text outside tags: '4'"),
    ({"instruction": "Q<|end|>", "output": TAGGED}, "instruction", "contains the special token '<|end|>'"),
    ({"messages": [USER]}, "messages", "the last turn must be 'assistant', got 'user'"),
    ({"messages": []}, "messages", "must be a non-empty list"),
    ({"messages": [USER, {"role": "tool", "content": "x"}, ASSISTANT]}, "messages[1].role",
     "tool use is not supported: the Phi-3.5 chat template has no 'tool' role"),
    ({"messages": [USER, USER, ASSISTANT]}, "messages[1].role", "expected role 'assistant' here"),
    ({"messages": [USER, {"role": "system", "content": "s"}, ASSISTANT]}, "messages[1].role",
     "a system message may only come first"),
    ({"messages": [USER, {"role": "assistant", "content": "<final>4</final>"}]}, "messages[1].content",
     "missing section <think-task>"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, ASSISTANT]},
     "messages[0].content[0].type", "content part type 'image_url' is not supported: only 'text' parts"),
    ({"messages": [USER, ASSISTANT], "instruction": "Q"}, "instruction",
     "a chat row holds its turns in 'messages' only"),
    ({"messages": [USER, ASSISTANT], "thinking": SECTIONS, "final": "A"}, "messages",
     "the last turn must be 'user', got 'assistant'"),
]


@pytest.mark.parametrize("row, field, reason", BAD_ROWS)
def test_each_validation_error_names_file_line_and_field(tmp_path, row, field, reason):
    path = write_jsonl(tmp_path / "train.jsonl", [SHAPES[2][0], row], blank_after=1)  # bad row on line 3
    with pytest.raises(DataValidationError) as err:
        load_thinking_dataset(path)
    assert f"{path}:3: field '{field}': {reason}" in str(err.value)
    assert {(p.line, p.row) for p in err.value.problems} == {(3, 1)}


@pytest.mark.parametrize("line, reason", [
    ('{"instruction": "Q", ', "invalid JSON: Expecting property name enclosed in double quotes (column 22)"),
    ('["not", "a", "row"]', "a row must be a JSON object, got list"),
    ('{"question": "Q", "answer": "A"}', "unknown row shape: give 'thinking' + 'final' (structured), "
     "'instruction' + 'output', 'prompt' + 'completion' (TRL), or 'messages' (chat); the row has keys "
     "['answer', 'question']"),
])
def test_row_level_errors_have_no_field(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "x.jsonl", [line])
    with pytest.raises(DataValidationError) as err:
        load_thinking_dataset(path, on_bad_rows="skip")  # every row bad: raises in skip mode too
    assert str(err.value).splitlines()[1] == f"{path}:1: {reason}"


def test_error_lists_every_problem_and_caps_the_message(tmp_path):
    bad = {"instruction": "Q", "thinking": {"task": "t"}, "final": ""}  # 3 problems per row
    path = write_jsonl(tmp_path / "many.jsonl", [SHAPES[2][0]] + [bad] * 20)
    with pytest.raises(DataValidationError) as err:
        load_thinking_dataset(path)
    assert len(err.value.problems) == 60
    lines = str(err.value).splitlines()
    assert lines[0] == ("60 problem(s) in 20 row(s); fix them, or pass on_bad_rows='skip' (with report_path=...) "
                        "to drop these rows with a report:")
    assert lines[1:4] == [f"{path}:2: field 'thinking.safety': missing", f"{path}:2: field 'thinking.policy': missing",
                          f"{path}:2: field 'final': empty"]
    assert len(lines) == 1 + 50 + 1 and lines[-1] == "... and 10 more problems"
    assert lines[50] == f"{path}:18: field 'thinking.policy': missing"


def test_skip_mode_logs_count_and_writes_report(tmp_path, caplog):
    rows = [SHAPES[2][0], BAD_ROWS[0][0], SHAPES[0][0], "{oops", SHAPES[3][0], BAD_ROWS[13][0], SHAPES[1][0]]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows, blank_after=2)
    report = tmp_path / "out" / "bad_rows.json"
    with caplog.at_level(logging.WARNING, logger="so8t_hf"):
        ds = load_thinking_dataset(path, on_bad_rows="skip", report_path=report)
    assert ds["source"] == [f"{path}:{n}" for n in (1, 4, 6, 8)]
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("so8t_hf.thinking.data", f"skipped 3 of 7 rows with problems (3 problems); report: {report}")]
    assert json.loads(report.read_text()) == {
        "files": [str(path)], "skipped_files": [], "files_without_rows": [], "on_bad_rows": "skip",
        "total_rows": 7, "bad_rows": 3, "skipped_rows": 3, "kept_rows": 4,
        "kept_shapes": {"chat": 1, "output": 1, "structured": 2}, "rows_without_thinking": 0,
        "drop_earlier_thinking": True,
        "reasoning_section": "task", "problems": [
            {"file": str(path), "line": 2, "row": 1, "field": "thinking.safety", "reason": "missing"},
            {"file": str(path), "line": 5, "row": 3, "field": "",
             "reason": "invalid JSON: Expecting property name enclosed in double quotes (column 2)"},
            {"file": str(path), "line": 7, "row": 5, "field": "output", "reason": "missing <final>"},
        ]}


def test_error_mode_report_and_clean_load_log_nothing(tmp_path, caplog):
    path = write_jsonl(tmp_path / "ok.jsonl", [SHAPES[2][0]])
    report = tmp_path / "report.json"
    with caplog.at_level(logging.DEBUG, logger="so8t_hf"):
        assert len(load_thinking_dataset(path, report_path=report)) == 1
    assert caplog.records == []
    assert json.loads(report.read_text())["problems"] == []
    write_jsonl(path, [SHAPES[2][0], BAD_ROWS[0][0]])
    with pytest.raises(DataValidationError):
        load_thinking_dataset(path, report_path=report)
    assert json.loads(report.read_text())["skipped_rows"] == 0 == json.loads(report.read_text())["kept_rows"]
    with pytest.raises(ValueError, match="on_bad_rows must be 'error' or 'skip'"):
        load_thinking_dataset(path, on_bad_rows="drop")


def test_paths_folders_globs_and_unreadable_files(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [SHAPES[2][0]])
    write_jsonl(tmp_path / "a.jsonl", [SHAPES[3][0]])
    (tmp_path / "notes.txt").write_text("ignored")
    assert load_thinking_dataset(tmp_path)["source"] == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'b.jsonl'}:1"]
    assert len(load_thinking_dataset(str(tmp_path / "*.jsonl"))) == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_thinking_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"unsupported file type '.txt'"):
        load_thinking_dataset(tmp_path / "notes.txt")
    (tmp_path / "broken.json").write_text('[{"instruction": "Q",\n  "output": }]')
    with pytest.raises(DataValidationError, match=r"broken.json:2: invalid JSON: Expecting value"):
        load_thinking_dataset(tmp_path / "broken.json", on_bad_rows="skip")
    (tmp_path / "obj.json").write_text('{"rows": []}')
    with pytest.raises(DataValidationError, match="must hold a list of row objects"):
        load_thinking_dataset(tmp_path / "obj.json")
    (tmp_path / "lines.json").write_text(json.dumps(SHAPES[2][0]) + "\n" + json.dumps(SHAPES[3][0]) + "\n")
    assert load_thinking_dataset(tmp_path / "lines.json")["source"][1] == f"{tmp_path / 'lines.json'}:2"
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataValidationError, match="empty.jsonl: no rows"):
        load_thinking_dataset(tmp_path / "empty.jsonl")


# ------------------------------------------------------------------------------------ split


def test_split_train_eval_is_seeded_and_disjoint():
    ds = load_thinking_dataset(sample_data_dir())
    split = split_train_eval(ds, eval_fraction=0.1, seed=3)
    assert (len(split["train"]), len(split["eval"])) == (72, 8)
    assert sorted(list(split["train"]["source"]) + list(split["eval"]["source"])) == sorted(ds["source"])
    assert list(split_train_eval(ds, eval_fraction=0.1, seed=3)["eval"]["source"]) == list(split["eval"]["source"])
    assert list(split_train_eval(ds, eval_fraction=0.1, seed=4)["eval"]["source"]) != list(split["eval"]["source"])
    assert len(split_train_eval(ds, eval_size=5)["eval"]) == 5
    assert len(split_train_eval(ds, eval_fraction=0.001)["eval"]) == 1
    for kwargs, msg in (({}, "exactly one"), ({"eval_fraction": 0.1, "eval_size": 2}, "exactly one"),
                        ({"eval_fraction": 1.0}, r"in \(0, 1\)"), ({"eval_size": 80}, "between 1 and 79")):
        with pytest.raises(ValueError, match=msg):
            split_train_eval(ds, **kwargs)


# ------------------------------------------------------------------------------------ truncation


def test_check_truncation_reports_and_drops(tmp_path, tiny_tok, caplog):
    long = {"instruction": "Q", "thinking": SECTIONS, "final": "A long answer. " * 20}
    path = write_jsonl(tmp_path / "t.jsonl", [SHAPES[2][0], long])
    ds = load_thinking_dataset(path)
    ids = [tiny_tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"] for m in ds["messages"]]
    final_end = len(ids[1]) - ids[1][::-1].index(tiny_tok.convert_tokens_to_ids("</final>"))
    assert ids[1][final_end:] == tiny_tok.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])
    assert len(ids[0]) < final_end - 1

    assert check_truncation(ds, tiny_tok, len(ids[1])) == []
    (keeps,) = check_truncation(ds, tiny_tok, final_end)  # cuts <|end|> and EOS only
    assert (keeps.index, keeps.source, keeps.num_tokens, keeps.final_end, keeps.cuts_final) == (
        1, f"{path}:2", len(ids[1]), final_end, False)
    report = tmp_path / "trunc.json"
    with caplog.at_level(logging.WARNING, logger="so8t_hf"):
        (cut,) = check_truncation(ds, tiny_tok, final_end - 1, report_path=report)
    assert cut.cuts_final and str(cut) == (f"{path}:2: {len(ids[1])} tokens > max_length {final_end - 1}; "
                                           "truncation cuts </final> off")
    err = caplog.text
    assert f"1 of 2 rows exceed max_length={final_end - 1} tokens; 1 would lose </final>" in err
    assert json.loads(report.read_text())["truncated"][0]["final_end"] == final_end
    assert len(drop_truncated(ds, [keeps])) == 2 and len(drop_truncated(ds, [keeps], only_cut_final=False)) == 1
    assert drop_truncated(ds, [cut])["source"] == [f"{path}:1"]
    tiny_tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        check_truncation(ds, tiny_tok, 8)


# ------------------------------------------------------------------------------------ label masks


def _final_spans(text: str) -> list[tuple[int, int]]:
    """Character spans `<final>...</final><|end|>` of each assistant turn in a rendered chat."""
    spans, start = [], 0
    while (i := text.find("<final>", start)) >= 0:
        end = text.index("</final><|end|>", i) + len("</final><|end|>")
        spans.append((i, end))
        start = end
    return spans


@pytest.mark.parametrize("mode", ["assistant", "final_only", "all"])
def test_label_masks_exact_on_sample_data(tiny_tok, mode):
    ds = load_thinking_dataset(sample_data_dir(), drop_earlier_thinking=False)  # every turn has thinking
    for messages in ds["messages"]:
        out = tiny_tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True,
                                           keep_earlier_thinking=True)  # the template keeps them whole too
        ids, mask = out["input_ids"], out["assistant_masks"]
        labels = thinking_labels(ids, tiny_tok, mode)
        if mode == "assistant":
            expected = [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        elif mode == "final_only":
            text = tiny_tok.apply_chat_template(messages, tokenize=False, keep_earlier_thinking=True)
            offsets = tiny_tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            spans = _final_spans(text)
            inside = [any(a <= s < b for a, b in spans) for s, _ in offsets]
            expected = [t if keep else -100 for t, keep in zip(ids, inside, strict=True)]
            kept = tiny_tok.decode([t for t in labels if t != -100])
            assert kept == "".join(text[a:b] for a, b in spans)
        else:
            expected = ids
        assert labels == expected
        assert sum(lab != -100 for lab in labels) > 0


def test_trl_prepares_the_dataset_with_assistant_only_loss(tmp_path, tiny_tok):
    from tiny_models import tiny_so8t
    from trl import SFTConfig, SFTTrainer

    ds = load_thinking_dataset(sample_data_dir(), drop_earlier_thinking=False).select(range(0, 80, 10))
    ds = ds.add_column("chat_template_kwargs", [{"keep_earlier_thinking": True}] * len(ds))  # TRL passes it on
    model = tiny_so8t(vocab_size=len(tiny_tok), pad_token_id=tiny_tok.pad_token_id, bos_token_id=1,
                      eos_token_id=tiny_tok.eos_token_id, max_position_embeddings=1024)
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_length=1024, report_to="none",
                     packing=False, use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tiny_tok)
    prepared = trainer.train_dataset
    assert len(prepared) == 8
    for row in prepared:
        assert row["labels"] == thinking_labels(row["input_ids"], tiny_tok, "assistant")


# ------------------------------------------------------------------------------------ real Phi-3.5


def test_tags_tokenise_as_single_ids_with_phi35(phi35):
    ds = load_thinking_dataset(sample_data_dir(), drop_earlier_thinking=False)
    tag_ids = {t: phi35.convert_tokens_to_ids(t) for t in DEFAULT_TAGS.tokens}
    assert sorted(tag_ids.values()) == list(range(32011, 32019))
    keep = {"keep_earlier_thinking": True}  # the rows keep earlier thinking: so does the template
    for messages in ds["messages"]:
        ids = phi35.apply_chat_template(messages, tokenize=True, return_dict=True, **keep)["input_ids"]
        turns = sum(m["role"] == "assistant" for m in messages)
        assert all(ids.count(i) == turns for i in tag_ids.values())
        assert phi35.unk_token_id not in ids
        labels = thinking_labels(ids, phi35, "final_only")
        finals = [m["content"][m["content"].index("<final>"):] for m in messages if m["role"] == "assistant"]
        assert phi35.decode([t for t in labels if t != -100]) == "".join(f + "<|end|>" for f in finals)
    lengths = [len(phi35.apply_chat_template(m, tokenize=True, return_dict=True, **keep)["input_ids"])
               for m in ds["messages"]]
    rows = check_truncation(ds, phi35, sorted(lengths)[-3], chat_template_kwargs=keep)
    assert sorted(r.num_tokens for r in rows) == sorted(lengths)[-2:]
