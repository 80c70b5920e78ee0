"""Data files: U+2028 / U+2029 / U+0085 are data in JSON Lines, errors that name file and line for non-UTF-8
text, corrupt and empty Parquet, compressed JSON, folders read recursively with a report of every file not read,
and relative paths (the bundled sample from any directory)."""

import bz2
import gzip
import json
import logging
import lzma

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mixed_shapes import write_mixed_dataset
from paths import REPO

from so8t_hf.thinking.data import DataValidationError, load_thinking_dataset
from so8t_hf.thinking.readers import data_format, expand_paths, resolve_dataset_path

TAGGED = ("<think-task>t</think-task>\n<think-safety>s</think-safety>\n<think-policy>p</think-policy>\n"
          "<final>{}</final>")


def row(final: str = "4", instruction: str = "Q") -> dict:
    return {"instruction": instruction, "output": TAGGED.format(final)}


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\u0085"])
def test_line_separators_inside_jsonl_rows_are_data(tmp_path, sep):
    """`json.dumps(ensure_ascii=False)` writes U+2028 & co. raw; `str.splitlines` would break the row there."""
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(row(f"a{sep}b"), ensure_ascii=False), '{"instruction": "Q", "output": 4}',
             json.dumps(row(f"c{sep}d", f"Q{sep}"), ensure_ascii=False)]
    assert all(sep in lines[i] for i in (0, 2))
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")  # CRLF endings too
    ds = load_thinking_dataset(path, on_bad_rows="skip")
    assert ds["source"] == [f"{path}:1", f"{path}:3"]  # the good rows kept, lines not shifted
    assert [m[-1]["content"] for m in ds["messages"]] == [TAGGED.format(f"a{sep}b"), TAGGED.format(f"c{sep}d")]
    assert ds["messages"][1][0]["content"] == f"Q{sep}"
    with pytest.raises(DataValidationError, match=rf"{path}:2: field 'output': must be a string, got int"):
        load_thinking_dataset(path)


def test_a_latin1_file_fails_with_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes("\n".join(json.dumps(row(f"caf\u00e9 {i}"), ensure_ascii=False) for i in range(3))
                     .encode("latin-1"))
    for mode in ("error", "skip"):  # an unreadable file always raises
        with pytest.raises(DataValidationError) as err:
            load_thinking_dataset(path, on_bad_rows=mode)
        lines = str(err.value).splitlines()
        assert lines[0] == ("3 problem(s) in 3 row(s); the file is not UTF-8 (it may be Latin-1 or Shift-JIS); "
                            "re-encode it, e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`:")
        col = json.dumps(row("caf\u00e9 0"), ensure_ascii=False).index("\u00e9") + 1
        assert lines[1] == f"{path}:1: not UTF-8: byte 0xe9 at byte {col} of the line"
        assert [p.line for p in err.value.problems] == [1, 2, 3]


def test_only_the_lines_that_are_not_utf8_are_named(tmp_path):
    path = tmp_path / "mixed.json"  # a JSON array over several lines, with a UTF-8 BOM
    text = json.dumps([row("ok"), row("4", "x")], indent=1).replace('"x"', '"\u00fc"')
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8").replace("\u00fc".encode(), b"\xfc"))
    bad_line = text.splitlines().index(next(t for t in text.splitlines() if "\u00fc" in t)) + 1
    with pytest.raises(DataValidationError) as err:
        load_thinking_dataset(path)
    assert [(p.file, p.line) for p in err.value.problems] == [(str(path), bad_line)]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(row()).encode() + b"\n")
    assert len(load_thinking_dataset(tmp_path / "bom.jsonl")) == 1


def test_corrupt_parquet_names_the_file(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([row(str(i)) for i in range(50)]), good)
    for name, data in (("garbage.parquet", b"PAR1 this is not parquet"),
                       ("cut.parquet", good.read_bytes()[: len(good.read_bytes()) // 2]),
                       ("empty-file.parquet", b"")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataValidationError) as err:
            load_thinking_dataset(path)
        assert str(err.value).splitlines()[1].startswith(f"{path}: cannot read Parquet: "), str(err.value)
        assert "the file is not a readable Parquet file" in str(err.value).splitlines()[0]


def test_parquet_with_zero_rows_reads_as_no_rows(tmp_path, caplog):
    empty = tmp_path / "a_empty.parquet"
    pq.write_table(pa.table({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}), empty)
    with pytest.raises(DataValidationError) as err:
        load_thinking_dataset(empty)
    assert str(err.value).splitlines() == ["1 problem(s) in 1 row(s); nothing to train on:", f"{empty}: no rows"]
    pq.write_table(pa.Table.from_pylist([row()]), tmp_path / "b_rows.parquet")
    with caplog.at_level(logging.WARNING, logger="so8t_hf"):
        ds = load_thinking_dataset(tmp_path, report_path=tmp_path / "report.json")
    assert ds["source"] == [f"{tmp_path / 'b_rows.parquet'}:row 0"]
    assert f"1 file(s) hold no rows: {empty}" in caplog.text
    assert json.loads((tmp_path / "report.json").read_text())["files_without_rows"] == [str(empty)]


@pytest.mark.parametrize("suffix, compress", [(".jsonl.gz", gzip.compress), (".ndjson.bz2", bz2.compress),
                                              (".json.xz", lzma.compress), (".JSONL.GZ", gzip.compress)])
def test_compressed_json_files(tmp_path, suffix, compress):
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(compress(("\n".join(json.dumps(row(str(i)), ensure_ascii=False) for i in range(3)) + "\n")
                              .encode("utf-8")))
    ds = load_thinking_dataset(path)
    assert ds["source"] == [f"{path}:{i}" for i in (1, 2, 3)]
    path.write_bytes(b"not compressed")
    with pytest.raises(DataValidationError, match=rf"{path}: cannot decompress \({path.suffix.lower()}\)"):
        load_thinking_dataset(path)


def test_data_format_names():
    assert [data_format(n) for n in ("a.jsonl", "a.ndjson", "a.json", "a.parquet", "a.jsonl.gz", "a.json.bz2",
                                     "a.parquet.gz", "a.txt", "a.gz", "jsonl")] == [
        "jsonl", "jsonl", "json", "parquet", "jsonl", "json", None, None, None, None]


def test_folders_are_read_recursively_and_every_file_not_read_is_reported(tmp_path, caplog):
    expected = write_mixed_dataset(tmp_path / "data")
    (tmp_path / "data" / ".cache").mkdir()
    (tmp_path / "data" / ".cache" / "old.jsonl").write_text("{broken\n")
    deep = tmp_path / "data" / "more" / "deeper"
    deep.mkdir()
    (deep / "rows.json").write_text(json.dumps([row()]))
    report = tmp_path / "report.json"
    with caplog.at_level(logging.WARNING, logger="so8t_hf"):
        ds = load_thinking_dataset(tmp_path / "data", report_path=report)
    files = json.loads(report.read_text())["files"]
    assert [f.removeprefix(str(tmp_path / "data") + "/") for f in files] == [
        "chats.parquet", "mixed.jsonl", "more/deeper/rows.json", "more/extra.jsonl.gz"]
    assert len(ds) == expected["rows"] + 1
    skipped = json.loads(report.read_text())["skipped_files"]
    assert [s["path"] for s in skipped] == [str(tmp_path / "data" / ".cache"), *expected["skipped"]]
    assert skipped[0]["reason"] == "hidden (name starts with '.'), not read"
    assert skipped[1]["reason"].startswith("not a data file (.jsonl, .ndjson, .json, .parquet")
    assert "not read: 2 entries" in caplog.text and "README.txt" in caplog.text
    assert json.loads(report.read_text())["kept_shapes"] == {**expected["shapes"],
                                                              "output": expected["shapes"]["output"] + 1}
    found, _ = expand_paths(str(tmp_path / "data" / "**" / "*.json*"))  # recursive globs
    assert [p.name for p in found] == ["mixed.jsonl", "rows.json", "extra.jsonl.gz"]


def test_a_folder_without_data_files_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="holds no data files .* in any subfolder; 1 other entries"):
        load_thinking_dataset(tmp_path)


def test_the_bundled_sample_resolves_from_any_directory(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="so8t_hf"):
        ds = load_thinking_dataset("data/sample")
    assert len(ds) == 80 and ds["source"][0] == f"{REPO / 'data/sample/thinking_en.jsonl'}:1"
    assert (f"dataset path 'data/sample' is not in the current directory {tmp_path}; using the sample bundled "
            f"with so8t_hf: {REPO / 'data/sample'}") in caplog.text
    assert resolve_dataset_path("./data/sample/thinking_ja.jsonl") == str(REPO / "data/sample/thinking_ja.jsonl")
    assert resolve_dataset_path("data/sample/*.jsonl") == str(REPO / "data/sample/*.jsonl")
    with pytest.raises(FileNotFoundError, match=rf"dataset path 'data/train.jsonl' does not exist \(relative to the "
                                                rf"current directory {tmp_path}\)"):
        load_thinking_dataset("data/train.jsonl")
    own = tmp_path / "data" / "sample"  # a data/sample of the current directory wins
    own.mkdir(parents=True)
    (own / "mine.jsonl").write_text(json.dumps(row()) + "\n")
    assert load_thinking_dataset("data/sample")["source"] == ["data/sample/mine.jsonl:1"]


def test_hostile_rows_are_bad_rows_not_crashes(tmp_path):
    path = tmp_path / "hostile.jsonl"
    lines = [json.dumps(row()), "[" * 100_000, '{"instruction": NaN, "output": "x"}', "\x00",
             json.dumps({"messages": {"role": "user"}}), json.dumps(row())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = tmp_path / "report.json"
    ds = load_thinking_dataset(path, on_bad_rows="skip", report_path=report)
    assert ds["source"] == [f"{path}:1", f"{path}:6"]
    first = {}
    for p in json.loads(report.read_text())["problems"]:
        first.setdefault(p["line"], (p["field"], p["reason"]))
    assert sorted(first) == [2, 3, 4, 5]
    assert first[2] == ("", "invalid JSON: nested too deeply")
    assert first[3] == ("instruction", "must be a string, got float")
    assert first[4][1].startswith("invalid JSON: Expecting value")
    assert first[5] == ("messages", "must be a non-empty list of {'role', 'content'} messages")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    with pytest.raises(DataValidationError, match="deep.json: invalid JSON: nested too deeply"):
        load_thinking_dataset(tmp_path / "deep.json")
