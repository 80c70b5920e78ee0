"""The thinking format: tags, render, strict parse / validate, fail-closed `read_final`, `thinking_hash`.

What: an assistant answer is a fixed sequence of thinking sections followed by one final answer,

    <think-task>...</think-task>
    <think-safety>...</think-safety>
    <think-policy>...</think-policy>
    <final>...</final>

(one block per line, section text stripped of surrounding whitespace, no text outside the
blocks). Only the `<final>` text is ever shown to users. Training data is checked with the strict
parser (`find_thinking_problems` / `validate_thinking` / `parse_thinking`, on the lexer's tokens); model
generations are read with `read_final` / `extract_final` / `visible_final_prefix`, which route through the
positive grammar of `grammar` (allow, don't deny): the final is shown only when the whole output parses as
the canonical shape and the final's text holds nothing tag-like (`screen`); anything else is WITHHELD
(outcome `withheld`, shown as "") with a reason code (`grammar.REASONS`).

Its cost: a final that quotes the tags (`use <think-task> for ...`), puts a bracket before a tag word
(`(think twice)`), or is cut off (a length limit) is withheld, and a stream shows the final only once the
output is complete.

Limits: pure text (token ids: `grammar.read_ids`; tokens, chat template and loss masks: `chat_template`).
Plain-prose thinking outside any tag cannot be recognised.

Origin: the three-section safety-reasoning layout of the SO8T origin project, with its tag set
made configurable and its answer extraction rewritten as a positive grammar (issues 14, 20).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from .grammar import FinalReading, read_text  # relative: shipped beside the pipeline with lexer.py and screen.py
from .lexer import TURN_END_TOKENS, Tok, lex, partial_tag_start

__all__ = [
    "DEFAULT_TAGS",
    "TURN_END_TOKENS",
    "TAG_PRESETS",
    "FinalReading",
    "ParsedThinking",
    "ThinkingFormatError",
    "ThinkingTags",
    "extract_final",
    "final_is_closed",
    "find_thinking_problems",
    "get_tag_preset",
    "parse_thinking",
    "read_final",
    "render_thinking",
    "thinking_hash",
    "validate_thinking",
    "visible_final_prefix",
]

_NAME_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


@dataclass(frozen=True)
class ThinkingTags:
    """A tag set: the thinking sections in their required order, then the final-answer tag.

    Names are lowercase letters, digits and dashes; the tag strings are `<name>` and `</name>`.
    A section's dict key is its name without a leading `think-` (`think-task` -> `task`).
    """

    sections: tuple[str, ...] = ("think-task", "think-safety", "think-policy")
    final: str = "final"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sections", tuple(self.sections))
        names = (*self.sections, self.final)
        if not self.sections:
            raise ValueError("a tag set needs at least one thinking section")
        for name in names:
            if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
                raise ValueError(f"invalid tag name {name!r}: use lowercase letters, digits and dashes")
        if len(set(names)) != len(names) or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"duplicate tag names or section keys in {names}")
        if self.final.startswith("think"):
            raise ValueError(f"the final tag {self.final!r} must not start with 'think' (that marks thinking)")
        final = self.final.replace("-", "")
        for name in self.sections:
            if final.startswith(name.replace("-", "")):
                raise ValueError(f"the final tag {self.final!r} starts with the section name {name!r}: "
                                 "the lexer would read it as thinking")

    @property
    def keys(self) -> tuple[str, ...]:
        """Section keys, in order: `("task", "safety", "policy")` for the default set."""
        return tuple(name.removeprefix("think-") for name in self.sections)

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every tag string: `<s1>`, `</s1>`, ..., `<final>`, `</final>`."""
        return tuple(tag for name in (*self.sections, self.final) for tag in (f"<{name}>", f"</{name}>"))


DEFAULT_TAGS = ThinkingTags()
TAG_PRESETS: dict[str, ThinkingTags] = {
    "default": DEFAULT_TAGS,
    "reasoning4": ThinkingTags(("think-logic", "think-ethics", "think-practical", "think-creative")),
}


def get_tag_preset(name: str) -> ThinkingTags:
    """The tag set called `name` (`default` or `reasoning4`)."""
    try:
        return TAG_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown tag preset {name!r}; choose one of {sorted(TAG_PRESETS)}") from None


class ParsedThinking(NamedTuple):
    """A strictly parsed answer: section key -> stripped text, and the stripped final."""

    sections: dict[str, str]
    final: str


class ThinkingFormatError(ValueError):
    """Badly formed thinking text; `problems` lists every problem, `row` says where."""

    def __init__(self, problems: list[str], row: int | str | None = None) -> None:
        self.problems = list(problems)
        self.row = row
        where = f"row {row}" if isinstance(row, int) else (row or "thinking format")
        super().__init__(f"{where}: " + "; ".join(self.problems))


def _snippet(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


# ---------------------------------------------------------------------------------------------
# Strict side: training data.


def _analyse(text: str, tags: ThinkingTags) -> tuple[list[str], list[tuple[str, str]]]:
    """Problems, and the top-level blocks as (name, raw content) in order of appearance."""
    problems: list[str] = []
    blocks: list[tuple[str, str]] = []
    stack: list[tuple[str, int]] = []  # (name, content start)
    opened: set[str] = set()
    known = {*tags.sections, tags.final}
    for tok in lex(text, tags):
        if tok.kind == "text":
            if not stack and tok.raw.strip():
                problems.append(f"text outside tags: {_snippet(tok.raw)}")
            continue
        if tok.kind == "special":
            problems.append(f"special token {tok.raw!r} in the text")
            continue
        if tok.name not in known:
            problems.append(f"unknown tag {tok.raw!r}")
        elif tok.raw != f"<{'/' * tok.closing}{tok.name}>":
            problems.append(f"malformed tag {tok.raw!r} (write '<{'/' * tok.closing}{tok.name}>')")
        if tok.self_closing:
            continue
        if not tok.closing:
            if stack:
                problems.append(f"nested tag <{tok.name}> inside <{stack[-1][0]}>")
            stack.append((tok.name, tok.end))
            opened.add(tok.name)
        elif any(name == tok.name for name, _ in stack):
            while stack[-1][0] != tok.name:
                problems.append(f"unclosed tag <{stack.pop()[0]}>")
            name, start = stack.pop()
            if not stack:
                blocks.append((name, text[start : tok.start]))
        else:
            problems.append(f"closing tag </{tok.name}> without an opening tag")
    problems += [f"unclosed tag <{name}>" for name, _ in reversed(stack)]

    order = {name: i for i, name in enumerate((*tags.sections, tags.final))}
    seen: dict[str, str] = {}
    last = None
    for name, content in blocks:
        if name not in order:
            continue
        if name in seen:
            problems.append(f"duplicate <{name}>")
            continue
        seen[name] = content
        if last is not None and order[name] < order[last]:
            problems.append(f"out-of-order <{name}> after <{last}>")
        else:
            last = name
    problems += [f"missing section <{name}>" for name in tags.sections if name not in opened]
    if tags.final not in opened:
        problems.append(f"missing <{tags.final}>")
    elif tags.final in seen and not seen[tags.final].strip():
        problems.append("empty final")
    return list(dict.fromkeys(problems)), blocks


def find_thinking_problems(text: str, tags: ThinkingTags = DEFAULT_TAGS) -> list[str]:
    """Every format problem of `text` (empty when well formed), for reporting bad rows.

    Well formed: each section of `tags` once, in order, then one non-empty final; only
    whitespace between blocks; tags spelled exactly; no nesting; no `<|...|>` special tokens.
    """
    return _analyse(text, tags)[0]


def validate_thinking(text: str, tags: ThinkingTags = DEFAULT_TAGS, row: int | str | None = None) -> None:
    """Raise `ThinkingFormatError` naming `row` ("row 12", or a given "file.jsonl:12") and the problems."""
    problems = find_thinking_problems(text, tags)
    if problems:
        raise ThinkingFormatError(problems, row)


def parse_thinking(text: str, tags: ThinkingTags = DEFAULT_TAGS, row: int | str | None = None) -> ParsedThinking:
    """Strictly parse well-formed text into stripped sections (keyed by `tags.keys`) and final."""
    problems, blocks = _analyse(text, tags)
    if problems:
        raise ThinkingFormatError(problems, row)
    content = {name: body.strip() for name, body in blocks}
    return ParsedThinking({k: content[n] for k, n in zip(tags.keys, tags.sections)}, content[tags.final])


def render_thinking(sections: Mapping[str, str], final: str, tags: ThinkingTags = DEFAULT_TAGS) -> str:
    """Render sections (keyed by `tags.keys`, all required) and the final in the canonical form.

    Each block is `<name>text</name>` with the text stripped; blocks are joined by one newline;
    no trailing newline. The result always passes `validate_thinking` (else ThinkingFormatError).
    """
    unknown = sorted(set(sections) - set(tags.keys))
    missing = [k for k in tags.keys if k not in sections]
    if unknown or missing:
        raise ValueError(f"section keys must be {list(tags.keys)}; unknown {unknown}, missing {missing}")
    lines = [f"<{n}>{sections[k].strip()}</{n}>" for k, n in zip(tags.keys, tags.sections)]
    text = "\n".join([*lines, f"<{tags.final}>{final.strip()}</{tags.final}>"])
    validate_thinking(text, tags)
    return text


# ---------------------------------------------------------------------------------------------
# Lenient, fail-closed side: model generations.


def _scan(text: str, tags: ThinkingTags) -> FinalReading:
    """The lexer-based reading of issue 14: kept for `thinking_hash` (its regions); finals use the grammar."""
    toks: list[Tok] = []
    for tok in lex(text, tags):
        if tok.turn_end:
            text = text[: tok.start]
            break
        toks.append(tok)
    cut = partial_tag_start(text, tags)  # a stream or a length cut can end mid-tag: `</fin`, `<|en`, `<thi`
    if cut is not None:
        text = text[:cut]
        toks = [t if t.end <= cut else t._replace(end=cut, raw=t.raw[: cut - t.start]) for t in toks if t.start < cut]
    final: list[str] | None = None
    closed = False
    reason = ""
    regions: list[tuple[str, str]] = []
    depth, opener, start = 0, "", 0
    for tok in toks:
        in_final = final is not None and not closed
        if tok.thinking and in_final and not reason:
            reason = f"a thinking tag inside the final answer ({tok.raw!r})"
        if depth:
            if tok.thinking:
                depth += -1 if tok.closing else 1
                if not depth:
                    regions.append((opener, text[start : tok.start]))
            continue
        if tok.thinking:
            if not tok.closing:  # a self-closing thinking tag opens thinking too: fail closed
                depth, opener, start = 1, tok.name, tok.end
        elif final is None:
            if tok.kind == "tag" and tok.name == tags.final and not (tok.closing or tok.self_closing):
                final = []
        elif not closed:
            if tok.kind == "text":
                final.append(tok.raw)
            elif tok.kind == "tag" and tok.name == tags.final and tok.closing:
                closed = True
    if depth:
        regions.append((opener, text[start:]))
        reason = reason or f"an unterminated thinking section <{opener}>"
    draft = "".join(final or [])
    if not reason and any(t.thinking for t in lex(draft, tags)):
        reason = "the assembled final answer holds a thinking tag"
    if final is None:
        return FinalReading("", "no_final", "", "", False, tuple(regions))
    if reason:
        return FinalReading("", "withheld", reason, draft, closed and not depth, tuple(regions))
    shown = draft.strip()
    return FinalReading(shown, "final" if shown else "no_final", "", draft, closed, tuple(regions))


def read_final(text: str, tags: ThinkingTags = DEFAULT_TAGS) -> FinalReading:
    """Read a generation under the positive grammar (`grammar`): the final is shown only when the whole text is
    whitespace, the configured sections (each at most once, in order, exact tags), one `<final>...</final>`
    whose text holds nothing tag-like (`screen`), then only whitespace and turn-end tokens. Anything else is
    `withheld` with a reason code (`grammar.REASONS`); the end of `text` is the end of the output, so a text
    cut inside the final is withheld (`truncated`). A well-formed output with an empty final is `no_final`.
    With token ids, read them with `grammar.read_ids` instead (a tag is its id, never a spelling)."""
    return read_text(text, tags)


def extract_final(text: str, tags: ThinkingTags = DEFAULT_TAGS) -> str:
    """The user-visible answer of a generation: `read_final(text).final` (stripped; "" when withheld)."""
    return read_text(text, tags).final


def final_is_closed(text: str, tags: ThinkingTags = DEFAULT_TAGS) -> bool:
    """True when the final of `text` has been closed by its tag in grammatical position."""
    return read_text(text, tags).closed


def visible_final_prefix(text: str, tags: ThinkingTags = DEFAULT_TAGS, complete: bool = False) -> str:
    """What a stream may show of a (partial) generation: the whole final, once nothing can withhold it; else "".

    Text shown in a stream must never turn out to belong to a withheld output, and any later token could
    still withhold it (a tag-like construct in the final, text after it). So the final is shown only when the
    output is over: `text` holds a turn-end token after the closed final, or `complete=True` (the caller knows
    the generation ended, e.g. it stopped on the closing tag). Then it is `read_final(text).final`; the stream
    never shows anything the non-streaming answer does not.
    """
    if not complete:  # a string search first: a stream calls this on every chunk, the parse is the costly part
        close = text.rfind(f"</{tags.final}>")
        if close < 0 or not any(t in text[close:] for t in TURN_END_TOKENS):
            return ""
    reading = read_text(text, tags)
    return reading.final if reading.status == "final" else ""


def thinking_hash(text: str, tags: ThinkingTags = DEFAULT_TAGS, key: bytes | None = None) -> str:
    """Hex digest of the thinking part of `text`: HMAC-SHA256 under `key`, or plain SHA-256 without one.

    A plain SHA-256 of a short thinking text can be reversed by guessing (a safety verdict has few
    likely values), so anything shown to others must use a secret `key` (the server does).
    The thinking part is each top-level thinking region found by `read_final` (from a thinking
    opening tag to its matching close, or to the end of the generation). Its canonical form is, per
    region in order, `<name>` + stripped raw inner text + `</name>` (name folded, inner tags kept
    verbatim), joined by "\\n", encoded as UTF-8. For well-formed text this is exactly the thinking
    lines of `render_thinking`; text without thinking digests the empty string.
    """
    regions = _scan(text, tags).regions
    canonical = "\n".join(f"<{name}>{body.strip()}</{name}>" for name, body in regions).encode("utf-8")
    if key is None:
        return hashlib.sha256(canonical).hexdigest()
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()
