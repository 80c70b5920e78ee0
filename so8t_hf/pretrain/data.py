"""Pre-training text -> packed causal-LM blocks, from files, `datasets` folders, a (streamed) corpus, or dummy text.

What:
- `load_documents(config)`: a `datasets.Dataset` (files, save_to_disk folders, a corpus) or `IterableDataset`
  (`streaming: true`) with one column, `text`. JSONL / JSON / Parquet rows are read by `so8t_hf.thinking.readers`
  (file:line locations); a row without a string `text_field` is an error naming the file, line or row, and field.
- `pack_documents(dataset, tokenizer, max_length)`: tokenise each document (no special tokens), append EOS,
  concatenate every `packing_batch_size` documents and cut them into `max_length`-token blocks. Each block carries
  `input_ids`, `labels` (= input_ids) and `seq_lengths` (its document pieces), from which TRL's padding-free
  collator builds position ids that restart per document, `cu_seq_lens` for the attention backends, and labels
  that never predict across a document boundary. A group's last block may be shorter: kept, never dropped.
- `dummy_documents(n)`: deterministic synthetic documents (counting phrases) a tiny model can learn on the CPU.

Limits: files are read into memory (use a save_to_disk folder or `streaming` for corpora larger than RAM). The
blocks are a pure function of the data and the tokenizer, so a resumed run sees the same blocks in the same order.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from datasets import Dataset, IterableDataset, load_dataset, load_from_disk

from so8t_hf.pretrain.config import PretrainDataConfig
from so8t_hf.thinking.readers import DataValidationError, RowProblem, expand_paths, read_rows, resolve_dataset_path

__all__ = ["dummy_documents", "load_documents", "pack_documents", "split_eval"]

logger = logging.getLogger(__name__)

WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen twenty").split()


def dummy_documents(n: int, seed: int = 0) -> list[str]:
    """`n` documents of counting phrases ("three four five ..."), each from a random start for a random length."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        start, length = rng.randrange(len(WORDS)), rng.randrange(4, 40)
        docs.append(" ".join(WORDS[(start + i) % len(WORDS)] for i in range(length)) + ".")
    return docs


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _saved_dataset_texts(path: Path, field: str, split: str) -> Dataset:
    dataset = load_from_disk(str(path))
    if hasattr(dataset, "keys"):  # a DatasetDict
        if split not in dataset:
            raise ValueError(f"{path}: the saved DatasetDict has no split {split!r} (splits: {list(dataset)}); set "
                             "dataset_split.")
        dataset = dataset[split]
    dataset = _check_column(dataset, field, str(path)).select_columns([field])
    return dataset.rename_column(field, "text") if field != "text" else dataset


def _check_column(dataset, field: str, where: str):
    names = dataset.column_names
    if names is not None and field not in names:
        raise ValueError(f"{where}: no column {field!r} (columns: {names}); set text_field to the column holding "
                         "the text.")
    return dataset


def _stream_text(row, index, field: str, where: str):
    value = row.get(field)
    if not isinstance(value, str):
        got = "missing" if field not in row else type(value).__name__
        raise ValueError(f"{where}: row {index}: field '{field}': needs a string, got {got} (columns: {sorted(row)}); "
                         "set text_field to the column holding the text.")
    return {"text": value}


def _file_texts(paths: list[str], field: str) -> list[str]:
    files, _ = expand_paths(paths)
    texts, problems = [], []
    for path in files:
        for line, row, value in read_rows(path):
            if isinstance(value, RowProblem):
                problems.append(value)
            elif not isinstance(value, dict) or not isinstance(value.get(field), str):
                got = type(value).__name__ if not isinstance(value, dict) else (
                    "missing" if field not in value else type(value[field]).__name__)
                problems.append(RowProblem(str(path), line, row, field, f"needs a string, got {got}"))
            elif value[field]:
                texts.append(value[field])
    if problems:
        raise DataValidationError(problems, f"every row needs a string '{field}' (set text_field for another key)")
    if not texts:
        raise ValueError(f"no text in {', '.join(map(str, files))} (field '{field}')")
    logger.info("pre-training text: %d documents from %d files", len(texts), len(files))
    return texts


def load_documents(config: PretrainDataConfig, seed: int = 0) -> Dataset | IterableDataset:
    """The documents of `config` as a dataset with one column, `text` (see the module docstring)."""
    if config.dummy_documents:
        return Dataset.from_dict({"text": dummy_documents(config.dummy_documents, seed)})
    if config.dataset_name is not None:
        dataset = load_dataset(config.dataset_name, config.dataset_config, split=config.dataset_split,
                               data_files=config.data_files, streaming=config.streaming)
        where = config.dataset_name + (f" ({', '.join(config.data_files)})" if config.data_files else "")
        dataset = _check_column(dataset, config.text_field, where)
        if config.streaming and config.shuffle_buffer_size:
            dataset = dataset.shuffle(seed=seed, buffer_size=config.shuffle_buffer_size)
        if dataset.column_names is None:  # a stream of unknown columns: each row is checked as it arrives
            return dataset.map(_stream_text, with_indices=True, fn_kwargs={"field": config.text_field, "where": where},
                               remove_columns=None).select_columns(["text"])
        if config.text_field != "text":
            dataset = dataset.rename_column(config.text_field, "text")
        return dataset.select_columns(["text"])
    saved = [p for p in config.dataset_path if _is_saved_dataset(Path(resolve_dataset_path(p)))]
    parts = [_saved_dataset_texts(Path(resolve_dataset_path(p)), config.text_field, config.dataset_split) for p in saved]
    files = [p for p in config.dataset_path if p not in saved]
    if files:
        parts.append(Dataset.from_dict({"text": _file_texts(files, config.text_field)}))
    if len(parts) == 1:
        return parts[0]
    from datasets import concatenate_datasets

    return concatenate_datasets(parts)


def _pack_batch(batch, tokenizer, max_length: int):
    eos = tokenizer.eos_token_id
    blocks, lengths, current, pieces = [], [], [], []
    for text in batch["text"]:
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=False).input_ids + [eos]
        while ids:
            take = ids[: max_length - len(current)]
            ids = ids[len(take):]
            current += take
            pieces.append(len(take))
            if len(current) == max_length:
                blocks.append(current)
                lengths.append(pieces)
                current, pieces = [], []
    if current:  # the group's last, shorter block: kept
        blocks.append(current)
        lengths.append(pieces)
    return {"input_ids": blocks, "labels": [list(b) for b in blocks], "seq_lengths": lengths}


def pack_documents(dataset: Dataset | IterableDataset, tokenizer, max_length: int, batch_size: int = 1000,
                   num_proc: int | None = None) -> Dataset | IterableDataset:
    """Tokenised, EOS-separated, concatenated and cut into `max_length`-token blocks (see the module docstring)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: documents could not be separated; set tokenizer.eos_token")
    if not max_length or max_length < 2:
        raise ValueError(f"max_length={max_length!r}: the packed block length must be at least 2 tokens")
    kwargs = dict(batched=True, batch_size=batch_size, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                  remove_columns=["text"])
    if isinstance(dataset, Dataset):
        kwargs.update(num_proc=num_proc, desc=f"Packing into {max_length}-token blocks")
    return dataset.map(_pack_batch, **kwargs)


def split_eval(blocks: Dataset | IterableDataset, n: int, seed: int):
    """(train, eval or None): `n` random blocks (a Dataset) or the stream's first `n` blocks held out."""
    if n <= 0:
        return blocks, None
    if isinstance(blocks, IterableDataset):
        return blocks.skip(n), Dataset.from_list(list(blocks.take(n)))
    if n >= len(blocks):
        raise ValueError(f"eval_blocks={n} but the data packs into only {len(blocks)} blocks; lower eval_blocks.")
    split = blocks.train_test_split(test_size=n, seed=seed, shuffle=True)
    return split["train"], split["test"]
