"""Scores behind the thinking metrics: final-answer exact match, format compliance, thinking leak.

What (each over a list of generations, decoded with `skip_special_tokens=False` so the tags
survive; a generation is read up to its first turn-end token, `lexer.TURN_END_TOKENS`, as
`extract_final` reads it; every tag is recognised by the one lexer, disguised tags included):
- `final_exact_match`: fraction whose `extract_final` equals the reference answer (a reference
  holding a final tag is reduced with `extract_final` too); whitespace runs are collapsed
  unless `normalize=False`. A withheld final (the positive grammar: see `format.read_final`) is "".
- `format_compliance`: fraction with no `find_thinking_problems` (every section once, in order,
  then one non-empty final, tags spelled exactly, nothing outside the tags).
- `thinking_leak`: fraction whose extracted final (by default `extract_final`, or the `finals`
  given, e.g. a server's) contains text that appears only inside thinking sections. Thinking
  sections are found independently of `extract_final`, from the lexer's tokens: a thinking tag
  (exact or disguised, self-closing included) opens a section that ends at the matching number
  of thinking closing tags, or at the end; an unterminated tag's own text counts too. Thinking-only text: each thinking piece (text between
  tags, whitespace collapsed) of at most 8 characters, or each 8-character window of a longer one,
  that does not occur in the text outside thinking (tags removed). A correct extractor scores 0 by
  construction, since its final is part of the text outside thinking; a leak means text the user
  must never see reached the answer.

Limits: exact match is strict (no case or punctuation folding); leaks shorter than a whole
thinking piece of <= 8 characters, or than 8 characters of a longer one, are not detected
(8 characters: about two English words, or a short Japanese phrase).
"""

from __future__ import annotations

from collections.abc import Sequence

from so8t_hf.thinking.format import (
    DEFAULT_TAGS,
    ThinkingTags,
    extract_final,
    find_thinking_problems,
    get_tag_preset,
)
from so8t_hf.thinking.lexer import find_tags, fold, lex
from so8t_hf.thinking.lexer import until_turn_end as _until_turn_end

__all__ = [
    "LEAK_WINDOW",
    "final_exact_match",
    "format_compliance",
    "leaks_thinking",
    "resolve_tags",
    "thinking_leak",
    "until_turn_end",
]

LEAK_WINDOW = 8


def resolve_tags(tags: ThinkingTags | str | None) -> ThinkingTags:
    """A tag set from a `ThinkingTags`, a preset name, or None (the default set)."""
    if tags is None:
        return DEFAULT_TAGS
    return get_tag_preset(tags) if isinstance(tags, str) else tags


def until_turn_end(text: str, tags: ThinkingTags | str | None = None) -> str:
    """`text` up to its first turn-ending special token (the generation proper)."""
    return _until_turn_end(text, resolve_tags(tags))


def _norm(text: str) -> str:
    return " ".join(text.split())


def _rate(hits: int, total: int, what: str) -> float:
    if total == 0:
        raise ValueError(f"no {what} to score")
    return hits / total


def final_exact_match(
    predictions: Sequence[str], references: Sequence[str], tags: ThinkingTags | str | None = None,
    normalize: bool = True,
) -> dict[str, float]:
    """`{"final_exact_match": fraction}` of predictions whose extracted final equals the reference."""
    tags = resolve_tags(tags)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    norm = _norm if normalize else (lambda s: s)
    hits = 0
    for pred, ref in zip(predictions, references, strict=True):
        ref = extract_final(ref, tags) if find_tags(ref, tags) else ref  # a plain reference is the answer itself
        hits += norm(extract_final(pred, tags)) == norm(ref.strip())
    return {"final_exact_match": _rate(hits, len(predictions), "predictions")}


def format_compliance(predictions: Sequence[str], tags: ThinkingTags | str | None = None) -> dict[str, float]:
    """`{"format_compliance": fraction}` of generations in the strict thinking format."""
    tags = resolve_tags(tags)
    ok = sum(not find_thinking_problems(until_turn_end(p, tags).strip(), tags) for p in predictions)
    return {"format_compliance": _rate(ok, len(predictions), "predictions")}


def _split(text: str, tags: ThinkingTags) -> tuple[list[str], str]:
    """(thinking pieces, text outside thinking), tags removed, whitespace collapsed."""
    pieces: list[str] = []
    outside: list[str] = []
    depth = 0
    for tok in lex(text, tags):
        if tok.kind == "text":
            (pieces if depth else outside).append(tok.raw)
        elif tok.thinking:
            depth = depth - 1 if tok.closing and depth else depth + (not tok.closing)
            if not fold(tok.raw).text.endswith(">"):  # unterminated (`<think-task plan...<`): its text is thinking
                pieces.append(tok.raw)
    return [p for p in map(_norm, pieces) if p], _norm("".join(outside))


def leaks_thinking(generation: str, final: str, tags: ThinkingTags | str | None = None) -> bool:
    """True when `final` holds text found only inside the thinking sections of `generation`."""
    tags = resolve_tags(tags)
    pieces, outside = _split(until_turn_end(generation, tags), tags)
    final = _norm(final)
    for piece in pieces:
        k = min(LEAK_WINDOW, len(piece))
        for i in range(len(piece) - k + 1):
            unit = piece[i : i + k]
            if unit in final and unit not in outside:
                return True
    return False


def thinking_leak(
    predictions: Sequence[str], finals: Sequence[str] | None = None, tags: ThinkingTags | str | None = None
) -> dict[str, float]:
    """`{"thinking_leak_rate": fraction}` of generations whose final leaks thinking-only text.

    `finals`: the user-visible answers to check, one per prediction (default: `extract_final`).
    """
    tags = resolve_tags(tags)
    if finals is None:
        finals = [extract_final(p, tags) for p in predictions]
    if len(finals) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(finals)} finals")
    leaks = sum(leaks_thinking(p, f, tags) for p, f in zip(predictions, finals, strict=True))
    return {"thinking_leak_rate": _rate(leaks, len(predictions), "predictions")}
