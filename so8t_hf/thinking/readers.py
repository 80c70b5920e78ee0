"""Data files for thinking SFT: which files a dataset path names, and their rows, with file:line locations.

What:
- `expand_paths(paths)`: files, folders and globs -> the data files to read, in order, plus every file that is
  not read and why (`skipped`). Folders are read recursively (sorted by relative path); entries whose name starts
  with "." (`.git`, `.cache`, ...) are not entered and are listed as skipped, as is every non-data file. A folder
  written by `datasets`' `save_to_disk` (it holds `state.json` + `dataset_info.json`) is one dataset, read with
  `datasets.load_from_disk`; a saved `DatasetDict` must be named by one split's folder. A file named twice (the
  same real path: `x`, `./x`, a symlink to it) is read once, with a warning, and listed as skipped.
- `read_rows(path)`: `(line, row, value)` for each row of one file: JSON Lines (`.jsonl`, `.ndjson`, or `.json`
  holding one object per line), a JSON array (`.json`), Parquet (`.parquet`), a saved dataset folder; the JSON
  kinds may be compressed (`.gz`, `.bz2`, `.xz`). A row that is not valid JSON (a syntax error, a lone surrogate
  escape such as `\\ud800`, an integer of more than 4300 digits) becomes a `RowProblem` value (a bad row); a file
  that cannot be read at all (not a regular file, not UTF-8, bad compression, more than `max_decompressed_mb`
  once decompressed, corrupt Parquet, too large for memory) raises one `DataValidationError` naming the file and,
  for encodings, every bad line.
- `resolve_dataset_path(path)`: relative paths resolve against the current directory; `data/sample` (the
  recipes' default) and paths below it fall back to the sample of the so8t_hf source checkout when the current
  directory has none (logged at INFO).

Hostile files: only regular files are read (a FIFO or a device named `x.jsonl`, or a symlink to one, is refused
before any byte is read: opened non-blocking, then checked with `fstat`); decompression streams in 1 MiB chunks
and stops at `max_decompressed_mb` (default 1024, None for no cap), so a small compression bomb fails in about
the time it takes to decompress the cap.

Locations: `path:17` is the 1-based line of a JSON Lines or JSON file; `path:row 3` the 0-based row index of a
JSON array or Parquet file. JSON Lines are split on "\\n" only (with an optional "\\r" before it): U+2028,
U+2029, U+0085 and the other characters `str.splitlines` also breaks on are data, as the JSON Lines format says.

Limits: a whole file is read into memory (SFT-sized data, not pre-training corpora). Parquet is read with
pyarrow (what `datasets` reads it with), batch by batch, without `datasets`' cache.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import logging
import lzma
import os
import re
import stat
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

__all__ = [
    "COMPRESSIONS",
    "DATA_SUFFIXES",
    "DEFAULT_MAX_DECOMPRESSED_MB",
    "SAMPLE_PATH",
    "DataValidationError",
    "RowProblem",
    "data_format",
    "expand_paths",
    "read_rows",
    "resolve_dataset_path",
    "sample_data_dir",
]

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
COMPRESSIONS = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}  # JSON kinds only
_STREAMS = {  # streaming readers over an open file, for the size cap
    ".gz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), ".bz2": bz2.BZ2File, ".xz": lzma.LZMAFile,
}
DEFAULT_MAX_DECOMPRESSED_MB = 1024  # a whole file is held in memory: SFT-sized data, not a compression bomb
_CHUNK = 1 << 20
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: lone unless json pairs them
SAMPLE_PATH = PurePath("data", "sample")
MAX_LISTED = 50  # problems listed in an error message; the rest are counted


@dataclass(frozen=True)
class RowProblem:
    """One problem of one row: `file`, 1-based `line` (JSON) or None, 0-based `row`, `field`, `reason`."""

    file: str
    line: int | None
    row: int | None
    field: str
    reason: str

    @property
    def where(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        return self.file if self.row is None else f"{self.file}:row {self.row}"

    def __str__(self) -> str:
        return f"{self.where}: field '{self.field}': {self.reason}" if self.field else f"{self.where}: {self.reason}"


class DataValidationError(ValueError):
    """Bad rows or unreadable files; `problems` holds every one, the message the first 50."""

    def __init__(self, problems: list[RowProblem], hint: str = "") -> None:
        self.problems = list(problems)
        rows = {(p.file, p.line, p.row) for p in self.problems}
        lines = [str(p) for p in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"... and {len(self.problems) - MAX_LISTED} more problems")
        head = f"{len(self.problems)} problem(s) in {len(rows)} row(s)"
        super().__init__("\n".join([head + (f"; {hint}" if hint else "") + ":", *lines]))


# --------------------------------------------------------------------------------------- paths


def data_format(path: str | Path) -> str | None:
    """`"jsonl"`, `"json"` or `"parquet"` for a data file name (compressed JSON kinds included), else None."""
    suffixes = [s.lower() for s in Path(path).suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
        if suffixes[-1:] == [".parquet"]:
            return None  # Parquet compresses inside the file
    kind = suffixes[-1] if suffixes else ""
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}.get(kind)


def _described() -> str:
    return f"{', '.join(DATA_SUFFIXES)} (JSON kinds also as {'/'.join(COMPRESSIONS)})"


def sample_data_dir() -> Path:
    """`data/sample` of the so8t_hf source checkout (English and Japanese rows); not in installed wheels."""
    path = Path(__file__).resolve().parents[2] / SAMPLE_PATH
    if not path.is_dir():
        raise FileNotFoundError(f"sample data not found at {path}; it ships with the source repository only")
    return path


def _sample_fallback(text: str) -> str | None:
    """The bundled-sample path for a relative `data/sample[/...]` path, else None."""
    path = PurePath(text)
    if path.is_absolute() or tuple(path.parts[:2]) != SAMPLE_PATH.parts:
        return None
    root = Path(__file__).resolve().parents[2]
    return str(root / path) if (root / SAMPLE_PATH).is_dir() else None


def resolve_dataset_path(text: str | Path) -> str:
    """`text` itself, or the bundled sample's path when `text` is `data/sample[/...]` and the current directory
    has nothing there (logged). Globs fall back the same way when they match nothing here."""
    text = str(text)
    is_glob = any(c in text for c in "*?[")
    if (glob.glob(text, recursive=True) if is_glob else Path(text).exists()):
        return text
    fallback = _sample_fallback(text)
    if fallback is None or not (glob.glob(fallback, recursive=True) if is_glob else Path(fallback).exists()):
        return text
    logger.info("dataset path %r is not in the current directory %s; using the sample bundled with so8t_hf: %s",
                text, Path.cwd(), fallback)
    return fallback


def _saved_dataset(folder: Path) -> bool:
    """Whether `folder` was written by `Dataset.save_to_disk`; a saved `DatasetDict` raises, naming its splits."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = ["<split>"]
        raise ValueError(f"{folder} is a saved DatasetDict with splits {splits}: give one split's folder, e.g. "
                         f"{folder / str(splits[0])}")
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def _walk(folder: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """Data files under `folder`, recursively, sorted by relative path; the rest as skipped entries."""
    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    stack, seen = [folder], {folder.resolve()}
    while stack:
        current = stack.pop()
        for entry in sorted(current.iterdir()):
            if entry.name.startswith("."):
                skipped.append({"path": str(entry), "reason": "hidden (name starts with '.'), not read"})
            elif entry.is_dir() and _saved_dataset(entry):
                files.append(entry)
            elif entry.is_dir():
                if entry.resolve() in seen:  # a symlink back up the tree
                    skipped.append({"path": str(entry), "reason": "a folder already read (symlink loop)"})
                else:
                    seen.add(entry.resolve())
                    stack.append(entry)
            elif data_format(entry) is None:
                skipped.append({"path": str(entry), "reason": f"not a data file ({_described()})"})
            else:
                files.append(entry)
    key = lambda p: Path(p).relative_to(folder).as_posix()  # noqa: E731
    return sorted(files, key=key), sorted(skipped, key=lambda s: key(s["path"]))


def expand_paths(paths: str | Path | Sequence[str | Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """(files to read, skipped entries `{"path", "reason"}`): folders recursively, globs (`**` too) expanded,
    order kept, duplicates read once. Missing paths and explicit files of another type raise."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise ValueError("no dataset paths given")
    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    for item in items:
        text = resolve_dataset_path(item)
        if any(c in text for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if not Path(m).is_dir())
            found = [m for m in matches if data_format(m)]
            skipped += [{"path": str(m), "reason": f"not a data file ({_described()})"} for m in matches
                        if not data_format(m)]
            if not found:
                raise FileNotFoundError(f"no data files ({_described()}) match {text!r}")
            files += found
        elif Path(text).is_dir() and _saved_dataset(Path(text)):
            files.append(Path(text))
        elif Path(text).is_dir():
            found, rest = _walk(Path(text))
            if not found:
                raise FileNotFoundError(f"folder {text!r} holds no data files ({_described()}), in any subfolder; "
                                        f"{len(rest)} other entries")
            files, skipped = files + found, skipped + rest
        elif Path(text).exists():  # a regular file, or a FIFO / device that read_rows refuses by name
            if data_format(text) is None:
                raise ValueError(f"unsupported file type {''.join(Path(text).suffixes)!r} ({text}); use {_described()}")
            files.append(Path(text))
        else:
            hint = "" if Path(str(item)).is_absolute() else f" (relative to the current directory {Path.cwd()})"
            raise FileNotFoundError(f"dataset path {text!r} does not exist{hint}")
    if skipped:
        logger.warning("not read: %d entries of the dataset folders/globs that are not data files: %s", len(skipped),
                       ", ".join(s["path"] for s in skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    unique: dict[str, Path] = {}  # real path -> the first name it was given
    for path in files:
        real = os.path.realpath(path)
        if real not in unique:
            unique[real] = path
        else:
            logger.warning("dataset file %s is the same file as %s (%s): read once", path, unique[real], real)
            skipped.append({"path": str(path), "reason": f"the same file as {unique[real]} ({real}); read once"})
    return list(unique.values()), skipped


# --------------------------------------------------------------------------------------- rows


def _unreadable(path: Path, reason: str, hint: str) -> DataValidationError:
    return DataValidationError([RowProblem(str(path), None, None, "", reason)], hint)


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _open_regular(path: Path) -> Any:
    """`path` opened for reading ("rb"), or one error naming it when it is not a regular file."""
    try:  # non-blocking: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise _unreadable(path, f"cannot open: {err.strerror}", "") from None
    handle = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        handle.close()
        raise _unreadable(path, f"not a regular file: {_file_kind(mode)}", "data files must be regular files")
    return handle


def _read_bytes(path: Path, max_decompressed_mb: float | None) -> bytes | bytearray:
    """The bytes of a regular file, decompressed by its suffix (streaming, at most `max_decompressed_mb`)."""
    with _open_regular(path) as handle:
        suffix = path.suffix.lower()
        return _decompress(path, handle, suffix, max_decompressed_mb) if suffix in _STREAMS else handle.read()


def _decompress(path: Path, handle: Any, suffix: str, max_mb: float | None) -> bytearray:
    cap = None if max_mb is None else int(max_mb * (1 << 20))
    out = bytearray()
    try:
        with _STREAMS[suffix](handle) as stream:
            while chunk := stream.read(_CHUNK):
                out += chunk
                if cap is not None and len(out) > cap:
                    raise _unreadable(path, f"decompresses to more than max_decompressed_mb={max_mb:g} MB",
                                      "a compression bomb, or a larger file than the cap: if it is real data, raise "
                                      "max_decompressed_mb (null: no cap)")
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as err:
        raise _unreadable(path, f"cannot decompress ({suffix}): {err}", "the file is damaged or not compressed "
                          "as its name says") from None
    return out  # a bytearray: no copy of what may be a GiB


def _json_problem(err: ValueError) -> str:
    """The reason of a row that `json.loads` refused with a plain ValueError (not a JSONDecodeError)."""
    if "integer string conversion" in str(err):
        return f"invalid JSON: an integer of more than {sys.get_int_max_str_digits()} digits"
    return f"invalid JSON: {err}"


def _surrogate_problem(value: Any) -> str | None:
    """A reason when `value` holds a lone surrogate (a `\\ud800` escape), which is no Unicode character."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"invalid JSON: the escape '\\u{ord(err.object[err.start]):04x}' is a lone surrogate, not a "
                "character (a cut emoji pair?); fix or remove it")
    except (RecursionError, ValueError):
        return "invalid JSON: nested too deeply"
    return None


def _decode(path: Path, raw: bytes | bytearray) -> str:
    """UTF-8 text (a BOM is dropped); otherwise an error naming every line that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    problems = []
    for line_no, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as err:
            problems.append(RowProblem(str(path), line_no, None, "",
                                       f"not UTF-8: byte 0x{line[err.start]:02x} at byte {err.start + 1} of the line"))
    raise DataValidationError(problems, "the file is not UTF-8 (it may be Latin-1 or Shift-JIS); re-encode it, e.g. "
                                        "`iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`")


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int | None, int, Any]]:
    row = 0
    for line_no, line in enumerate(text.split("\n"), start=1):  # "\n" only: U+2028 & co. are data
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            value: Any = json.loads(line)
        except json.JSONDecodeError as err:
            value = RowProblem(str(path), line_no, row, "", f"invalid JSON: {err.msg} (column {err.colno})")
        except RecursionError:
            value = RowProblem(str(path), line_no, row, "", "invalid JSON: nested too deeply")
        except ValueError as err:
            value = RowProblem(str(path), line_no, row, "", _json_problem(err))
        else:
            if _SURROGATE_ESCAPE.search(line) and (reason := _surrogate_problem(value)):
                value = RowProblem(str(path), line_no, row, "", reason)
        yield line_no, row, value
        row += 1


def _parquet_rows(path: Path) -> Iterator[tuple[int | None, int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise _unreadable(path, f"cannot read Parquet: {err}", "the file is not a readable Parquet file") from None
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for value in batch.to_pylist():
                yield None, row, value
                row += 1
    except (pa.ArrowException, OSError) as err:
        problem = RowProblem(str(path), None, row, "", f"cannot read Parquet from this row on: {err}")
        raise DataValidationError([problem], "the Parquet file is corrupt") from None


def _saved_rows(path: Path) -> Iterator[tuple[int | None, int, Any]]:
    """The rows of a `save_to_disk` folder (memory-mapped by `datasets`)."""
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - datasets / pyarrow raise many types; each is named here
        raise _unreadable(path, f"cannot load the saved dataset: {type(err).__name__}: {err}",
                          "the folder is not a readable datasets.save_to_disk folder") from None
    row = 0
    try:
        for value in dataset:
            yield None, row, value
            row += 1
    except Exception as err:  # noqa: BLE001
        problem = RowProblem(str(path), None, row, "", f"cannot read from this row on: {type(err).__name__}: {err}")
        raise DataValidationError([problem], "the saved dataset is corrupt") from None


def read_rows(
    path: Path, max_decompressed_mb: float | None = DEFAULT_MAX_DECOMPRESSED_MB
) -> Iterator[tuple[int | None, int, Any]]:
    """(1-based line or None, 0-based row, row value or RowProblem) for every row of `path`."""
    path = Path(path)
    try:
        yield from _rows(path, max_decompressed_mb)
    except MemoryError:
        raise _unreadable(path, "too large to hold in memory", "split the file (a whole JSON file is read into "
                          "memory), or lower max_decompressed_mb for compressed files") from None


def _rows(path: Path, max_decompressed_mb: float | None) -> Iterator[tuple[int | None, int, Any]]:
    if path.is_dir():
        yield from _saved_rows(path)
        return
    kind = data_format(path)
    if kind == "parquet":
        _open_regular(path).close()
        yield from _parquet_rows(path)
        return
    text = _decode(path, _read_bytes(path, max_decompressed_mb))
    if kind == "jsonl":
        yield from _jsonl_rows(path, text)
        return
    try:
        data = json.loads(text)
    except RecursionError:
        raise _unreadable(path, "invalid JSON: nested too deeply", "the file cannot be read") from None
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # a .json file holding JSON Lines
            yield from _jsonl_rows(path, text)
            return
        raise DataValidationError([RowProblem(str(path), err.lineno, None, "", f"invalid JSON: {err.msg}")],
                                  "the file cannot be read, so its rows cannot be counted") from None
    except ValueError as err:  # an integer too long to convert: located by its line
        digits = re.search(r"\d{%d,}" % (sys.get_int_max_str_digits() + 1), text)
        line = None if digits is None else text.count("\n", 0, digits.start()) + 1
        raise DataValidationError([RowProblem(str(path), line, None, "", _json_problem(err))],
                                  "the file cannot be read, so its rows cannot be counted") from None
    if not isinstance(data, list):
        raise _unreadable(path, "a .json file must hold a list of row objects (or one object per line), got "
                          f"{type(data).__name__}", "")
    check = _SURROGATE_ESCAPE.search(text) is not None
    for i, value in enumerate(data):
        reason = _surrogate_problem(value) if check else None
        yield None, i, RowProblem(str(path), None, i, "", reason) if reason else value
