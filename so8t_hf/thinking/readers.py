"""Data files for thinking SFT: which files a dataset path names, and their rows, with file:line locations.

What:
- `expand_paths(paths)`: files, folders and globs -> the data files to read, in order, plus every file that is
  not read and why (`skipped`). Folders are read recursively (sorted by relative path); entries whose name starts
  with "." (`.git`, `.cache`, ...) are not entered and are listed as skipped, as is every non-data file.
- `read_rows(path)`: `(line, row, value)` for each row of one file: JSON Lines (`.jsonl`, `.ndjson`, or `.json`
  holding one object per line), a JSON array (`.json`), Parquet (`.parquet`); the JSON kinds may be compressed
  (`.gz`, `.bz2`, `.xz`). A row that is not valid JSON becomes a `RowProblem` value (a bad row); a file that
  cannot be read at all (not UTF-8, bad compression, corrupt Parquet) raises `DataValidationError` naming the
  file and, for encodings, every bad line.
- `resolve_dataset_path(path)`: relative paths resolve against the current directory; `data/sample` (the
  recipes' default) and paths below it fall back to the sample of the so8t_hf source checkout when the current
  directory has none (logged at INFO).

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
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

__all__ = [
    "COMPRESSIONS",
    "DATA_SUFFIXES",
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
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file())
            found = [m for m in matches if data_format(m)]
            skipped += [{"path": str(m), "reason": f"not a data file ({_described()})"} for m in matches
                        if not data_format(m)]
            if not found:
                raise FileNotFoundError(f"no data files ({_described()}) match {text!r}")
            files += found
        elif Path(text).is_dir():
            found, rest = _walk(Path(text))
            if not found:
                raise FileNotFoundError(f"folder {text!r} holds no data files ({_described()}), in any subfolder; "
                                        f"{len(rest)} other entries")
            files, skipped = files + found, skipped + rest
        elif Path(text).is_file():
            if data_format(text) is None:
                raise ValueError(f"unsupported file type {''.join(Path(text).suffixes)!r} ({text}); use {_described()}")
            files.append(Path(text))
        else:
            hint = "" if Path(str(item)).is_absolute() else f" (relative to the current directory {Path.cwd()})"
            raise FileNotFoundError(f"dataset path {text!r} does not exist{hint}")
    if skipped:
        logger.warning("not read: %d entries of the dataset folders/globs that are not data files: %s", len(skipped),
                       ", ".join(s["path"] for s in skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    return list(dict.fromkeys(files)), skipped


# --------------------------------------------------------------------------------------- rows


def _unreadable(path: Path, reason: str, hint: str) -> DataValidationError:
    return DataValidationError([RowProblem(str(path), None, None, "", reason)], hint)


def _decode(path: Path, raw: bytes) -> str:
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


def read_rows(path: Path) -> Iterator[tuple[int | None, int, Any]]:
    """(1-based line or None, 0-based row, row value or RowProblem) for every row of `path`."""
    kind = data_format(path)
    if kind == "parquet":
        yield from _parquet_rows(path)
        return
    raw = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix in COMPRESSIONS:
        try:
            raw = COMPRESSIONS[suffix](raw)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as err:
            raise _unreadable(path, f"cannot decompress ({suffix}): {err}", "the file is damaged or not compressed "
                              "as its name says") from None
    text = _decode(path, raw)
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
    if not isinstance(data, list):
        raise _unreadable(path, "a .json file must hold a list of row objects (or one object per line), got "
                          f"{type(data).__name__}", "")
    for i, value in enumerate(data):
        yield None, i, value
