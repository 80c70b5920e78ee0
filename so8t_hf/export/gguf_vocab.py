"""The tokenizer as GGUF vocabulary metadata: tokens, scores, token types, merges, special ids, chat template.

What: `gguf_vocab(tokenizer, n_rows, folder)` reads a Hugging Face tokenizer into the fields llama.cpp reads:
- `tokenizer.model` beside it (SentencePiece, as the real Phi-3 / Phi-3.5 ships): GGUF model `llama`, each
  piece with its SentencePiece score and type (normal, unknown, control, byte, unused);
- a Llama-style fast tokenizer (`tokenizer.json`: BPE with byte fallback and `▁` for spaces, which is what
  transformers 5 saves for Phi-3.5, without `tokenizer.model`): GGUF model `llama` too, each multi-character
  piece scored `-(rank of the first merge that makes it)`, which orders the pieces exactly as their
  SentencePiece scores do (checked on the Phi-3.5 tokenizer in the tests), so llama.cpp's SentencePiece
  tokenizer merges in the same order;
- a byte-level BPE (`tokenizer.json` with a GPT-2 style `ByteLevel` pre-tokenizer, as the shipped tiny
  tokenizer is): GGUF model `gpt2`, pre-tokenizer `gpt-2`, with the merges.
Added tokens: special ones (`<|end|>`, `<|user|>`, `<s>`) are CONTROL, the others (the thinking tags)
USER_DEFINED, which llama.cpp always matches as one token and prints as text. The chat template is embedded
without transformers' `{% generation %}` markers (`portable_chat_template`). Rows of the embedding past the
tokenizer are `[PAD{i}]` (UNUSED), as llama.cpp's converter writes them. `<|end|>` is the end-of-turn id.

Limits: other tokenizer kinds (Unigram, WordPiece, byte-level BPEs with their own split regex) are refused
with the reason; convert those with llama.cpp's `convert_hf_to_gguf.py`.

Origin: the vocabulary handling of llama.cpp's `convert_hf_to_gguf.py` (`Phi3MiniModel.set_vocab`,
`_set_vocab_gpt2`), written again on the `gguf` package's constants.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GGUFVocab", "add_vocab", "gguf_vocab", "portable_chat_template"]

logger = logging.getLogger(__name__)

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# a thinking-format tag: always USER_DEFINED (printed as text), also where a 0.1 tokenizer saved it as special,
# which llama.cpp would hide when printing and the thinking would run into the answer
_TAG = re.compile(r"</?(?:think(?:-[a-z0-9]+)*|final)>")


@dataclass
class GGUFVocab:
    """What goes into the `tokenizer.ggml.*` keys of a GGUF file."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # the pre-tokenizer name llama.cpp knows
    tokens: list[bytes]
    scores: list[float]
    types: list[int]  # gguf.TokenType values
    source: str  # which reader ran, for the log
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / eot / unk / pad -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def id_of(self, text: str) -> int:
        return self.tokens.index(text.encode("utf-8"))


def _backend_state(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer without tokenizer.json: load it with "
                         "use_fast=True (or give the folder its tokenizer.model)")
    return json.loads(backend.to_str())


def _sentencepiece_pieces(model_file: Path):
    import gguf

    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as err:
        raise ImportError(f"{model_file} is a SentencePiece model: pip install 'so8t-hf[gguf]' (sentencepiece)") from err
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        kind = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            kind = gguf.TokenType.BYTE
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(float(sp.GetScore(i)))
        types.append(int(kind))
    return tokens, scores, types


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def _llama_json_pieces(state: dict, unk_id: int | None):
    """Pieces of a Llama-style BPE (byte fallback, `▁`), scored by the rank of the merge that first makes them."""
    import gguf

    vocab = state["model"]["vocab"]
    rank: dict[str, int] = {}
    for k, (a, b) in enumerate(_merge_pairs(state["model"].get("merges", []))):
        rank.setdefault(a + b, k)
    by_id = {i: piece for piece, i in vocab.items()}
    tokens, scores, types = [], [], []
    for i in range(len(vocab)):
        piece = by_id[i]
        kind = gguf.TokenType.NORMAL
        if i == unk_id:
            kind = gguf.TokenType.UNKNOWN
        elif _BYTE_PIECE.fullmatch(piece):
            kind = gguf.TokenType.BYTE
        tokens.append(piece.encode("utf-8"))
        scores.append(-float(rank[piece]) if piece in rank else 0.0)
        types.append(int(kind))
    return tokens, scores, types


def _byte_level_pieces(state: dict):
    import gguf

    vocab = state["model"]["vocab"]
    by_id = {i: piece for piece, i in vocab.items()}
    tokens = [by_id[i].encode("utf-8") for i in range(len(vocab))]
    merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
              for pair in _merge_pairs(state["model"].get("merges", []))]  # spaces in a merge: as llama.cpp reads them
    return tokens, [0.0] * len(tokens), [int(gguf.TokenType.NORMAL)] * len(tokens), merges


def _is_byte_level(state: dict) -> bool:
    pre = state.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts) or (state.get("decoder") or {}).get("type") == "ByteLevel"


def _gpt2_pre(state: dict) -> str:
    pre = state.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    raise ValueError(f"byte-level tokenizer with pre-tokenizer {json.dumps(pre)[:200]}: its split rule has no "
                     "llama.cpp name known here; convert it with llama.cpp's convert_hf_to_gguf.py")


_GENERATION_TAG = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")


def portable_chat_template(template: str) -> str:
    """`template` without transformers' own `{% generation %}` block (which marks the assistant tokens for the
    loss mask and which llama.cpp's and llama-cpp-python's Jinja engines do not know), rendering the same text:
    each marker becomes `{% if true %}` / `{% endif %}` with the same whitespace control."""
    return _GENERATION_TAG.sub(lambda m: "{%" + m[1] + (" endif " if m[2] else " if true ") + m[3] + "%}", template)


def gguf_vocab(tokenizer: Any, n_rows: int, folder: str | Path | None = None) -> GGUFVocab:
    """The GGUF vocabulary of `tokenizer` for a model with `n_rows` embedding rows (see the module docstring).

    `folder` is where the tokenizer was loaded from: a `tokenizer.model` there is read with SentencePiece.
    """
    import gguf

    state = _backend_state(tokenizer)
    model_file = Path(folder) / "tokenizer.model" if folder is not None else None
    merges: list[str] = []
    if model_file is not None and model_file.is_file():
        tokens, scores, types = _sentencepiece_pieces(model_file)
        kind, pre, source = "llama", "default", f"{model_file} (SentencePiece)"
    elif state["model"]["type"] == "BPE" and state["model"].get("byte_fallback"):
        tokens, scores, types = _llama_json_pieces(state, tokenizer.unk_token_id)
        kind, pre, source = "llama", "default", "tokenizer.json (Llama-style BPE with byte fallback)"
    elif state["model"]["type"] == "BPE" and _is_byte_level(state):
        tokens, scores, types, merges = _byte_level_pieces(state)
        kind, pre, source = "gpt2", _gpt2_pre(state), "tokenizer.json (byte-level BPE)"
    else:
        raise ValueError(f"tokenizer model {state['model']['type']!r} (byte_fallback="
                         f"{state['model'].get('byte_fallback')}) is neither SentencePiece nor a byte-level BPE; "
                         "convert it with llama.cpp's convert_hf_to_gguf.py")
    added = sorted(state.get("added_tokens", []), key=lambda t: t["id"])
    size = max([len(tokens), *(t["id"] + 1 for t in added)])
    if size > n_rows:
        raise ValueError(f"the tokenizer has {size} ids but the model only {n_rows} embedding rows: a tokenizer "
                         "from another model? Export the tokenizer the run saved next to its model")
    tokens += [f"[PAD{i}]".encode() for i in range(len(tokens), n_rows)]
    scores += [-10000.0] * (n_rows - len(scores))
    types += [int(gguf.TokenType.UNUSED)] * (n_rows - len(types))
    for entry in added:  # added tokens override the base pieces, as llama.cpp's Phi-3 converter does
        i = entry["id"]
        if tokens[i] == entry["content"].encode("utf-8") and types[i] == gguf.TokenType.UNKNOWN:
            continue  # `<unk>` stays the unknown token
        tokens[i] = entry["content"].encode("utf-8")
        scores[i] = -1000.0 if kind == "llama" else 0.0
        special = entry.get("special") and not _TAG.fullmatch(entry["content"])
        types[i] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    tags = [t.decode() for t, k in zip(tokens, types) if k == gguf.TokenType.USER_DEFINED and _TAG.fullmatch(t.decode())]
    if not tags:
        logger.warning("the tokenizer holds no thinking tags as tokens (<think-...>, <final>): not a thinking run's "
                       "tokenizer? llama.cpp will split any tag text into pieces")
    dup = len(tokens) - len(set(tokens))
    if dup:
        logger.warning("GGUF vocabulary: %d duplicate token strings (llama.cpp keeps the first id of each)", dup)
    vocab = GGUFVocab(kind, pre, tokens, scores, types, source, merges)
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_rows:
            vocab.special_ids[name] = tid
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if not isinstance(end, int) or end == tokenizer.unk_token_id or end is None:
        raise ValueError("the tokenizer has no <|end|> token: the Phi-3 chat format ends every turn with it, and the "
                         "GGUF file needs it as its end-of-turn token (export the tokenizer of a so8t_hf run)")
    vocab.special_ids["eot"] = end
    if state.get("post_processor"):
        single = (state["post_processor"].get("single") or [])
        vocab.add_bos = bool(single and "SpecialToken" in single[0])
        vocab.add_eos = bool(len(single) > 1 and "SpecialToken" in single[-1])
    vocab.add_bos = bool(getattr(tokenizer, "add_bos_token", vocab.add_bos))
    vocab.add_eos = bool(getattr(tokenizer, "add_eos_token", vocab.add_eos))
    template = getattr(tokenizer, "chat_template", None)
    vocab.chat_template = portable_chat_template(template) if isinstance(template, str) else None
    logger.info("GGUF vocabulary from %s: %d tokens (%d rows), model %s", source, size, n_rows, kind)
    return vocab


def add_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Write `vocab` into a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for name, tid in vocab.special_ids.items():
        getattr(writer, f"add_{name}_token_id")(tid)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
