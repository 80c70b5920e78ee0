"""Thinking-SFT data: load + validate local files, train/eval split, truncation check, tiny tokenizer.

What:
- `load_thinking_dataset(paths)`: local JSONL / JSON / Parquet files (or folders of them) in the
  three row shapes of `data_validation` -> a `datasets.Dataset` with a `messages` column (the
  conversational format TRL's SFTTrainer trains on with a chat template; assistant-only loss
  comes from the template's `{% generation %}` markers) and a `source` column (`file:line`).
  Every bad row is reported with file:line, field and reason: `on_bad_rows="error"` raises one
  `DataValidationError` listing them all, `"skip"` drops them, prints the count and (with
  `report_path`) writes a JSON report. Nothing is dropped silently.
- `split_train_eval`: a seeded train/eval split.
- `check_truncation` / `drop_truncated`: rows whose chat-template tokens exceed `max_length`, and
  whether `</final>` is cut off (TRL truncates and packs with `keep_start`, cutting the end).
- `tiny_tokenizer_path()`: the byte-level BPE tokenizer the project trains and ships for tiny runs.

Locations: `path:17` is the 1-based line of a JSONL file; `path:row 3` is the 0-based row index
of a JSON array or a Parquet file (`ds[3]`).

Limits: JSON / JSONL files are parsed row by row with the `json` module, not `datasets`' pyarrow
reader, which reports neither line numbers nor per-row errors and fails a whole file on one row
of another type; all rows are held in memory (fine for SFT-sized data, not for pre-training
corpora). Parquet is read with `datasets`. Folders are read non-recursively, files sorted by name.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from so8t_hf.thinking.format import DEFAULT_TAGS, ThinkingTags, get_tag_preset
from so8t_hf.thinking.validation import normalize_thinking_row

__all__ = [
    "DATA_SUFFIXES",
    "DataValidationError",
    "RowProblem",
    "TruncatedRow",
    "check_truncation",
    "drop_truncated",
    "load_thinking_dataset",
    "normalize_thinking_row",
    "sample_data_dir",
    "split_train_eval",
    "tiny_tokenizer_path",
]

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
MAX_LISTED = 50  # problems listed in an error message; the rest are counted


@dataclass(frozen=True)
class RowProblem:
    """One problem of one row: `file`, 1-based `line` (JSONL) or None, 0-based `row`, `field`, `reason`."""

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


# --------------------------------------------------------------------------------------- files


def _expand(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files to read: folders give their data files (sorted), globs are expanded, order kept."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise ValueError("no dataset paths given")
    files: list[Path] = []
    for item in items:
        text = str(item)
        if any(c in text for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(text) if Path(m).suffix.lower() in DATA_SUFFIXES)
            if not matches:
                raise FileNotFoundError(f"no {'/'.join(DATA_SUFFIXES)} files match {text!r}")
            files += matches
        elif Path(text).is_dir():
            found = sorted(p for p in Path(text).iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"folder {text!r} holds no {'/'.join(DATA_SUFFIXES)} files")
            files += found
        elif Path(text).is_file():
            if Path(text).suffix.lower() not in DATA_SUFFIXES:
                suffix = Path(text).suffix
                raise ValueError(f"unsupported file type {suffix!r} ({text}); use {', '.join(DATA_SUFFIXES)}")
            files.append(Path(text))
        else:
            raise FileNotFoundError(f"dataset path {text!r} does not exist")
    return list(dict.fromkeys(files))


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int | None, int, Any]]:
    row = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value: Any = json.loads(line)
        except json.JSONDecodeError as err:
            value = RowProblem(str(path), line_no, row, "", f"invalid JSON: {err.msg} (column {err.colno})")
        yield line_no, row, value
        row += 1


def _read_rows(path: Path) -> Iterator[tuple[int | None, int, Any]]:
    """(1-based line or None, 0-based row, row value or RowProblem) for every row of `path`."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        for i, value in enumerate(Dataset.from_parquet(str(path))):
            yield None, i, value
        return
    text = path.read_text(encoding="utf-8-sig")
    if suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_rows(path, text)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # a .json file holding JSON Lines
            yield from _jsonl_rows(path, text)
            return
        raise DataValidationError([RowProblem(str(path), err.lineno, None, "", f"invalid JSON: {err.msg}")],
                                  "the file cannot be read, so its rows cannot be counted") from None
    if not isinstance(data, list):
        raise DataValidationError([RowProblem(str(path), None, None, "", "a .json file must hold a list of row "
                                              f"objects (or one object per line), got {type(data).__name__}")])
    for i, value in enumerate(data):
        yield None, i, value


# --------------------------------------------------------------------------------------- loading


def _as_tags(tags: ThinkingTags | str) -> ThinkingTags:
    return get_tag_preset(tags) if isinstance(tags, str) else tags


def _write_report(path: str | Path, report: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def load_thinking_dataset(
    paths: str | Path | Sequence[str | Path],
    *,
    tags: ThinkingTags | str = DEFAULT_TAGS,
    on_bad_rows: str = "error",
    report_path: str | Path | None = None,
    system_prompt: str | None = None,
) -> Dataset:
    """Load, validate and normalise thinking-SFT rows into a `Dataset` of `messages` + `source`.

    `paths`: files, folders (their .jsonl/.ndjson/.json/.parquet files) or globs. `tags`: a tag set
    or preset name. `on_bad_rows`: "error" raises `DataValidationError` listing every problem;
    "skip" drops the bad rows and prints how many. `report_path`: a JSON report (files, row
    counts, every problem as file/line/row/field/reason) written in both modes. `system_prompt`:
    added to rows without a system message. Unreadable files always raise.
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    tags = _as_tags(tags)
    files = _expand(paths)
    kept: list[dict[str, Any]] = []
    problems: list[RowProblem] = []
    total = 0
    for path in files:
        for line, row, value in _read_rows(path):
            total += 1
            if isinstance(value, RowProblem):
                problems.append(value)
                continue
            messages, found = normalize_thinking_row(value, tags, system_prompt)
            if found:
                problems += [RowProblem(str(path), line, row, field, reason) for field, reason in found]
            else:
                kept.append({"messages": messages, "source": f"{path}:{line}" if line else f"{path}:row {row}"})
    bad = len({(p.file, p.line, p.row) for p in problems})
    fails = total == 0 or bool(problems and (on_bad_rows == "error" or not kept))
    if report_path is not None:
        _write_report(report_path, {
            "files": [str(f) for f in files], "on_bad_rows": on_bad_rows, "total_rows": total,
            "bad_rows": bad, "skipped_rows": 0 if fails else bad, "kept_rows": 0 if fails else len(kept),
            "problems": [asdict(p) for p in problems],
        })
    if total == 0:
        raise DataValidationError([RowProblem(str(f), None, None, "", "no rows") for f in files], "nothing to train on")
    if fails:
        hint = ("every row is bad" if not kept else
                "fix them, or pass on_bad_rows='skip' (with report_path=...) to drop these rows with a report")
        raise DataValidationError(problems, hint)
    if problems:
        where = f"; report: {report_path}" if report_path is not None else ""
        logger.warning("skipped %d of %d rows with problems (%d problems)%s", bad, total, len(problems), where)
    return Dataset.from_list(kept)


def split_train_eval(
    dataset: Dataset, *, eval_fraction: float | None = None, eval_size: int | None = None, seed: int = 0
) -> DatasetDict:
    """A shuffled, seeded split into `DatasetDict(train=..., eval=...)`; give one of fraction / size.

    `eval_fraction` in (0, 1) rounds up to whole rows; both parts must keep at least one row.
    """
    n = len(dataset)
    if (eval_fraction is None) == (eval_size is None):
        raise ValueError("give exactly one of eval_fraction or eval_size")
    if eval_fraction is not None:
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        eval_size = max(1, round(n * eval_fraction))
    if not 1 <= eval_size < n:
        raise ValueError(f"eval_size must be between 1 and {n - 1} for {n} rows, got {eval_size}")
    parts = dataset.train_test_split(test_size=eval_size, seed=seed, shuffle=True)
    return DatasetDict(train=parts["train"], eval=parts["test"])


# --------------------------------------------------------------------------------------- truncation


@dataclass(frozen=True)
class TruncatedRow:
    """A row longer than `max_length` tokens; `final_end` = tokens needed to keep the last `</final>`."""

    index: int
    source: str | None
    num_tokens: int
    max_length: int
    final_end: int | None
    cuts_final: bool

    def __str__(self) -> str:
        where = self.source or f"row {self.index}"
        if self.cuts_final:
            cut = "cuts </final> off" if self.final_end else "has no </final>"
        else:
            cut = f"keeps </final> (ends at token {self.final_end}) but cuts the end of the turn"
        return f"{where}: {self.num_tokens} tokens > max_length {self.max_length}; truncation {cut}"


def check_truncation(
    dataset: Dataset,
    tokenizer: Any,
    max_length: int,
    *,
    tags: ThinkingTags | str = DEFAULT_TAGS,
    chat_template: str | None = None,
    report_path: str | Path | None = None,
) -> list[TruncatedRow]:
    """Every row whose chat-template tokens exceed `max_length`, with whether `</final>` is cut off.

    Tokens are counted as TRL counts them: the rendered chat template, tokenised without adding
    special tokens (needs a fast tokenizer). Prints a summary when any row is too long and writes
    the list to `report_path` (JSON) when given. Pass the result to `drop_truncated` to drop rows.
    """
    tags = _as_tags(tags)
    closing = f"</{tags.final}>"
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; call "
                         "so8t_hf.thinking.chat_template.apply_thinking_chat_template(tokenizer) or pass chat_template=")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("check_truncation needs a fast tokenizer (offset mapping)")
    texts = [tokenizer.apply_chat_template(m, tokenize=False, chat_template=chat_template) for m in dataset["messages"]]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    sources = dataset["source"] if "source" in dataset.column_names else [None] * len(texts)
    rows: list[TruncatedRow] = []
    for i, (text, ids, offsets) in enumerate(zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True)):
        if len(ids) <= max_length:
            continue
        pos = text.rfind(closing)
        final_end = None
        if pos >= 0:
            last_char = pos + len(closing) - 1
            final_end = next((t + 1 for t, (s, e) in enumerate(offsets) if s <= last_char < e), None)
        cuts = final_end is None or final_end > max_length
        rows.append(TruncatedRow(i, sources[i], len(ids), max_length, final_end, cuts))
    if rows:
        cut = sum(r.cuts_final for r in rows)
        logger.warning("%d of %d rows exceed max_length=%d tokens; %d would lose </%s>. First: %s",
                       len(rows), len(texts), max_length, cut, tags.final, rows[0])
    if report_path is not None:
        _write_report(report_path, {"max_length": max_length, "rows": len(texts),
                                    "truncated": [asdict(r) for r in rows]})
    return rows


def drop_truncated(dataset: Dataset, truncated: Sequence[TruncatedRow], *, only_cut_final: bool = True) -> Dataset:
    """`dataset` without the rows of `truncated` (only those that cut `</final>` unless told otherwise)."""
    drop = {r.index for r in truncated if r.cuts_final or not only_cut_final}
    if drop:
        logger.warning("dropped %d of %d rows that exceed max_length", len(drop), len(dataset))
    return dataset.select([i for i in range(len(dataset)) if i not in drop])


# --------------------------------------------------------------------------------------- assets


def tiny_tokenizer_path() -> Path:
    """Folder of the shipped tiny byte-level BPE tokenizer (`AutoTokenizer.from_pretrained` it)."""
    path = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tiny tokenizer missing at {path}; run scripts/train_tiny_tokenizer.py")
    return path


def sample_data_dir() -> Path:
    """`data/sample` of a source checkout (English and Japanese sample rows); not in installed wheels."""
    path = Path(__file__).resolve().parents[2] / "data" / "sample"
    if not path.is_dir():
        raise FileNotFoundError(f"sample data not found at {path}; it ships with the source repository only")
    return path
