"""Thinking-SFT data: load + validate local files, train/eval split, truncation check, tiny tokenizer.

What:
- `load_thinking_dataset(paths)`: local data files (or folders / globs of them, see `readers`) in the row shapes
  of `validation` -> a `datasets.Dataset` with a `messages` column (the conversational format TRL's SFTTrainer
  trains on with a chat template) and a `source` column (`file:line` or `file:row N`). Every bad row is reported
  with its location, field and reason: `on_bad_rows="error"` raises one `DataValidationError` listing them all,
  `"skip"` drops them, logs the count and (with `report_path`) writes a JSON report. Nothing is dropped silently:
  files in the folders that are not read, and files without rows, are logged and listed in the report.
- `split_train_eval`: a seeded train/eval split.
- `check_truncation` / `drop_truncated`: rows whose chat-template tokens exceed `max_length` (None: no limit, no
  check), and whether `</final>` is cut off (TRL truncates and packs with `keep_start`, cutting the end).
- `tiny_tokenizer_path()`: the byte-level BPE tokenizer the project trains and ships for tiny runs.

Files (`readers`): `.jsonl` / `.ndjson` / `.json` (also `.gz`, `.bz2`, `.xz`) and `.parquet`; folders are read
recursively (hidden entries and non-data files are listed as skipped); globs may use `**`. Relative paths resolve
against the current directory, except that `data/sample` (the recipes' default) falls back to the sample of the
so8t_hf source checkout when the current directory has none (logged). Text must be UTF-8: a file that is not is
an error naming every bad line. JSON Lines split on "\\n" only, so U+2028 / U+2029 / U+0085 inside a row are data.

Ecosystem shapes, mapped onto the configured tag set (details in `validation`'s docstring):
- chat `messages` whose assistant turns carry `reasoning_content` (or `thinking`) beside a plain answer, or plain
  answers alone (rendered with empty sections; counted as `rows_without_thinking` in the report);
- answers written `<think>reasoning</think>answer` (DeepSeek-R1 / Qwen3), in `messages`, `output` or `completion`;
- TRL's `prompt` / `completion` rows, conversational (message lists) or plain (strings).
The reasoning becomes the section `reasoning_section` (default: the first section, `task`), the other sections
are rendered empty, the answer becomes `<final>`. `drop_earlier_thinking` (default True) keeps only the final
text of earlier assistant turns, as `so8t-hf chat` and the server keep history; those turns are context for
the loss (`thinking_labels`), never targets. TRL's own `assistant_only_loss` (the chat template's generation
markers) trains every assistant turn, those included: train such rows with `thinking_labels`, as the recipe
does, or load them with `drop_earlier_thinking=False`.

Limits: all rows are held in memory (fine for SFT-sized data, not for pre-training corpora). JSON is parsed row
by row with the `json` module, not `datasets`' pyarrow reader, which reports neither line numbers nor per-row
errors and fails a whole file on one row of another type.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from so8t_hf.thinking.format import DEFAULT_TAGS, ThinkingTags, get_tag_preset
from so8t_hf.thinking.readers import (
    DATA_SUFFIXES,
    DEFAULT_MAX_DECOMPRESSED_MB,
    DataValidationError,
    RowProblem,
    expand_paths,
    read_rows,
    sample_data_dir,
)
from so8t_hf.thinking.validation import normalize_thinking_row, row_shape

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
    reasoning_section: str | None = None,
    drop_earlier_thinking: bool = True,
    max_decompressed_mb: float | None = DEFAULT_MAX_DECOMPRESSED_MB,
) -> Dataset:
    """Load, validate and normalise thinking-SFT rows into a `Dataset` of `messages` + `source`.

    `paths`: files, folders (read recursively) or globs. `tags`: a tag set or preset name. `on_bad_rows`:
    "error" raises `DataValidationError` listing every problem; "skip" drops the bad rows and logs how many.
    `report_path`: a JSON report (files, skipped files, files without rows, row counts per shape, every problem
    as file/line/row/field/reason) written in both modes. `system_prompt`: added to rows without a system
    message. `reasoning_section`: the section that receives free-text reasoning (`reasoning_content`,
    `<think>...</think>`); default the first. `drop_earlier_thinking`: earlier assistant turns keep only their
    final text (what chat keeps in history). `max_decompressed_mb`: the most a compressed file may decompress to
    (None: no cap). Unreadable files always raise.
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    tags = _as_tags(tags)
    if reasoning_section is not None and reasoning_section not in tags.keys:
        raise ValueError(f"reasoning_section={reasoning_section!r} is not a section of this tag set; choose one of "
                         f"{list(tags.keys)}")
    files, skipped = expand_paths(paths)
    kept: list[dict[str, Any]] = []
    problems: list[RowProblem] = []
    shapes: Counter[str] = Counter()
    empty: list[str] = []
    total = plain = 0
    no_thinking = "\n".join(f"<{name}></{name}>" for name in tags.sections) + "\n"  # a plain answer's sections
    for path in files:
        before = total
        for line, row, value in read_rows(path, max_decompressed_mb):
            total += 1
            if isinstance(value, RowProblem):
                problems.append(value)
                continue
            messages, found = normalize_thinking_row(value, tags, system_prompt, reasoning_section=reasoning_section,
                                                     drop_earlier_thinking=drop_earlier_thinking)
            if found:
                problems += [RowProblem(str(path), line, row, field, reason) for field, reason in found]
            else:
                shapes[row_shape(value)] += 1
                plain += messages[-1]["content"].startswith(no_thinking)
                kept.append({"messages": messages, "source": f"{path}:{line}" if line else f"{path}:row {row}"})
        if total == before:
            empty.append(str(path))
    bad = len({(p.file, p.line, p.row) for p in problems})
    fails = total == 0 or bool(problems and (on_bad_rows == "error" or not kept))
    if report_path is not None:
        _write_report(report_path, {
            "files": [str(f) for f in files], "skipped_files": skipped, "files_without_rows": empty,
            "on_bad_rows": on_bad_rows, "total_rows": total, "bad_rows": bad, "skipped_rows": 0 if fails else bad,
            "kept_rows": 0 if fails else len(kept), "kept_shapes": {} if fails else dict(sorted(shapes.items())),
            "rows_without_thinking": 0 if fails else plain,
            "drop_earlier_thinking": drop_earlier_thinking,
            "reasoning_section": reasoning_section or tags.keys[0], "problems": [asdict(p) for p in problems],
        })
    if total == 0:
        raise DataValidationError([RowProblem(str(f), None, None, "", "no rows") for f in files], "nothing to train on")
    if empty:
        logger.warning("%d file(s) hold no rows: %s", len(empty), ", ".join(empty))
    if fails:
        hint = ("every row is bad" if not kept else
                "fix them, or pass on_bad_rows='skip' (with report_path=...) to drop these rows with a report")
        raise DataValidationError(problems, hint)
    if plain:
        log = logger.warning if plain == len(kept) else logger.info
        log("%d of %d rows have no thinking (plain answers): they train with empty sections%s", plain, len(kept),
            "; no row teaches the model to think" if plain == len(kept) else "")
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
    max_length: int | None,
    *,
    tags: ThinkingTags | str = DEFAULT_TAGS,
    chat_template: str | None = None,
    report_path: str | Path | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[TruncatedRow]:
    """Every row whose chat-template tokens exceed `max_length`, with whether `</final>` is cut off.

    Tokens are counted as TRL counts them: the rendered chat template, tokenised without adding
    special tokens (needs a fast tokenizer). Prints a summary when any row is too long and writes
    the list to `report_path` (JSON) when given. Pass the result to `drop_truncated` to drop rows.
    `chat_template_kwargs` go to the template (`keep_earlier_thinking=True` for rows that keep earlier thinking).
    """
    tags = _as_tags(tags)
    if max_length is None:
        logger.info("max_length is None: rows are not truncated, so none is checked")
        if report_path is not None:
            _write_report(report_path, {"max_length": None, "rows": len(dataset), "truncated": []})
        return []
    closing = f"</{tags.final}>"
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; call "
                         "so8t_hf.thinking.chat_template.apply_thinking_chat_template(tokenizer) or pass chat_template=")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("check_truncation needs a fast tokenizer (offset mapping)")
    texts = [tokenizer.apply_chat_template(m, tokenize=False, chat_template=chat_template, **(chat_template_kwargs or {}))
             for m in dataset["messages"]]
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
