"""Hostile data files, as an attacker would name them: each ends, in seconds, in ONE `DataValidationError` naming
the file (and the line): a FIFO and a device named x.jsonl, a gzip bomb small on disk, a lone surrogate escape, a
5000-digit integer; a file named twice (a symlink, `./x`, an absolute path) is read once, with a warning."""

import json
import logging
import os
import time
import zlib

import pytest

from so8t_hf.sft import ThinkingDataConfig
from so8t_hf.thinking.data import DataValidationError, load_thinking_dataset
from so8t_hf.thinking.readers import DEFAULT_MAX_DECOMPRESSED_MB, read_rows

TAGGED = ("<think-task>Add.</think-task>\n<think-safety>Harmless.</think-safety>\n<think-policy>Short.</think-policy>"
          "\n<final>4</final>")
GOOD = json.dumps({"instruction": "What is 2 + 2?", "output": TAGGED})


def one_error(path, **kwargs) -> tuple[str, object]:
    """The message and single problem of the DataValidationError that loading `path` raises, within seconds."""
    start = time.monotonic()
    with pytest.raises(DataValidationError) as err:
        load_thinking_dataset(path, **kwargs)
    assert time.monotonic() - start < 10
    assert len(err.value.problems) == 1, str(err.value)
    return str(err.value), err.value.problems[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_named_jsonl_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "x.jsonl")  # reading it would wait forever for a writer
    message, problem = one_error(tmp_path / "x.jsonl")
    assert problem.file == str(tmp_path / "x.jsonl") and problem.reason == "not a regular file: a FIFO (named pipe)"
    assert "does not exist" not in message
    (tmp_path / "good.jsonl").write_text(GOOD + "\n")  # a FIFO inside a folder that is read: refused the same way
    assert one_error(tmp_path)[1].reason == "not a regular file: a FIFO (named pipe)"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_symlink_to_dev_zero_is_refused_without_reading(tmp_path):
    (tmp_path / "x.jsonl").symlink_to("/dev/zero")  # endless zeros: reading it would never end
    (tmp_path / "x.jsonl.gz").symlink_to("/dev/zero")
    for name in ("x.jsonl", "x.jsonl.gz"):
        _, problem = one_error(tmp_path / name)
        assert problem.file == str(tmp_path / name) and problem.reason == "not a regular file: a character device"


def gzip_bomb(path, mib: int) -> None:
    """`mib` MiB of zeros, gzip-compressed (about 1 KiB per MiB on disk), written without holding them."""
    packer, zeros = zlib.compressobj(9, zlib.DEFLATED, 31), bytes(1 << 20)
    with open(path, "wb") as out:
        for _ in range(mib):
            out.write(packer.compress(zeros))
        out.write(packer.flush())


def test_a_gzip_bomb_stops_at_the_size_cap(tmp_path):
    bomb = tmp_path / "bomb.jsonl.gz"
    gzip_bomb(bomb, 64)
    assert bomb.stat().st_size < 100_000
    message, problem = one_error(bomb, max_decompressed_mb=8)
    assert problem.file == str(bomb) and problem.reason == "decompresses to more than max_decompressed_mb=8 MB"
    assert "raise max_decompressed_mb (null: no cap)" in message
    with pytest.raises(DataValidationError, match="max_decompressed_mb=0.5 MB"):  # streamed: stops early
        list(read_rows(bomb, max_decompressed_mb=0.5))
    assert DEFAULT_MAX_DECOMPRESSED_MB == ThinkingDataConfig().max_decompressed_mb == 1024
    small = tmp_path / "small.jsonl.gz"
    small.write_bytes(zlib.compress((GOOD + "\n").encode(), wbits=31))
    assert len(load_thinking_dataset(small, max_decompressed_mb=0.001)) == 1  # under the cap: read
    assert len(load_thinking_dataset(small, max_decompressed_mb=None)) == 1


@pytest.mark.parametrize("bad, reason", [
    ('{"instruction": "\\ud800 x", "output": "y"}',
     "invalid JSON: the escape '\\ud800' is a lone surrogate, not a character (a cut emoji pair?); fix or remove it"),
    ('{"instruction": "Q", "output": "\\udfff"}',
     "invalid JSON: the escape '\\udfff' is a lone surrogate, not a character (a cut emoji pair?); fix or remove it"),
    ('{"instruction": "Q", "output": "x", "id": 1' + "2" * 5000 + "}",
     "invalid JSON: an integer of more than 4300 digits"),
])
def test_bad_json_values_are_located_bad_rows(tmp_path, bad, reason):
    path = tmp_path / "x.jsonl"
    path.write_text(f"{GOOD}\n{bad}\n{GOOD}\n", encoding="utf-8")
    message, problem = one_error(path)
    assert (problem.line, problem.reason) == (2, reason) and f"{path}:2: {reason}" in message
    assert len(load_thinking_dataset(path, on_bad_rows="skip")) == 2
    array = tmp_path / "x.json"  # a JSON array: the row index, or the line when the file cannot be parsed
    array.write_text(f"[\n{GOOD},\n{bad}\n]", encoding="utf-8")
    _, problem = one_error(array)
    assert (problem.where, problem.reason) == (f"{array}:3" if "digits" in reason else f"{array}:row 1", reason)


def test_a_surrogate_pair_escape_is_a_character(tmp_path):
    path = tmp_path / "emoji.jsonl"
    path.write_text(json.dumps({"instruction": "Q \ud83d\ude00", "output": TAGGED}) + "\n")  # ensure_ascii: a pair
    assert "\\ud83d\\ude00" in path.read_text()
    assert load_thinking_dataset(path)["messages"][0][0]["content"] == "Q \U0001F600"


def test_the_same_file_named_twice_is_read_once_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jsonl").write_text(GOOD + "\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "x.jsonl")
    with caplog.at_level(logging.WARNING, logger="so8t_hf"):
        ds = load_thinking_dataset(["x.jsonl", "./x.jsonl", "link.jsonl", str(tmp_path / "x.jsonl")],
                                   report_path="report.json")
    assert ds["source"] == ["x.jsonl:1"]
    warned = [r.getMessage() for r in caplog.records if "read once" in r.getMessage()]
    assert len(warned) == 3 and warned[1].startswith("dataset file link.jsonl is the same file as x.jsonl")
    skipped = json.loads((tmp_path / "report.json").read_text())["skipped_files"]
    assert [s["path"] for s in skipped] == ["x.jsonl", "link.jsonl", str(tmp_path / "x.jsonl")]


def test_running_out_of_memory_names_the_file(tmp_path, monkeypatch):
    from so8t_hf.thinking import readers

    path = tmp_path / "huge.jsonl"
    path.write_text(GOOD + "\n")

    def no_memory(*args):
        raise MemoryError

    monkeypatch.setattr(readers, "_decode", no_memory)  # as a file too large for memory would end
    _, problem = one_error(path)
    assert (problem.file, problem.reason) == (str(path), "too large to hold in memory")
