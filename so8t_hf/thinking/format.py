"""The thinking format: tags, render, strict parse / validate, `extract_final`, `thinking_hash`.

What: an assistant answer is a fixed sequence of thinking sections followed by one final answer,

    <think-task>...</think-task>
    <think-safety>...</think-safety>
    <think-policy>...</think-policy>
    <final>...</final>

(one block per line, section text stripped of surrounding whitespace, no text outside the
blocks). Only the `<final>` text is ever shown to users. Training data is checked with the strict
parser (`find_thinking_problems` / `validate_thinking` / `parse_thinking`); model generations
are read with the lenient, allow-list `extract_final`, which never returns thinking text.

Limits: pure text, no tokenizer (tokens, chat template and loss masks are in `chat_template`).
Tags are recognised in ASCII spelling only (case and inner whitespace are tolerated, full-width
look-alikes are not). Plain-prose thinking outside any tag cannot be recognised.

Origin: the three-section safety-reasoning layout of the SO8T origin project, with its tag set
made configurable and its answer extraction rewritten as an allow-list.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

__all__ = [
    "DEFAULT_TAGS",
    "TURN_END_TOKENS",
    "TAG_PRESETS",
    "ParsedThinking",
    "ThinkingFormatError",
    "ThinkingTags",
    "extract_final",
    "find_thinking_problems",
    "get_tag_preset",
    "parse_thinking",
    "render_thinking",
    "thinking_hash",
    "validate_thinking",
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


# ---------------------------------------------------------------------------------------------
# Lexer shared by the strict parser and the lenient extractor.
# A tag is `<`, optional `/`, a tag name (any configured name, or any name starting with
# `think`), optional attributes, then `>`; a missing `>` ends the tag at the next `<` or at the
# end of the text. Case and whitespace are tolerated. `<|...|>`, `<s>` and `</s>` are specials.

TURN_END_TOKENS = ("<|end|>", "<|endoftext|>", "<|user|>", "<|system|>", "</s>")  # a generation ends at the first
_TURN_END = frozenset(t.strip("<>|") for t in TURN_END_TOKENS)  # lexer names: end, endoftext, user, system, /s


class _Tok(NamedTuple):
    kind: str  # "text" | "tag" | "special"
    start: int
    end: int
    raw: str
    name: str = ""  # normalised: lowercase, no whitespace
    closing: bool = False
    self_closing: bool = False


@lru_cache(maxsize=32)
def _lexer(tags: ThinkingTags) -> re.Pattern[str]:
    names = "|".join(re.escape(n) for n in sorted({*tags.sections, tags.final}, key=len, reverse=True))
    return re.compile(
        r"(?P<special><\s*\|(?P<sname>[^<>|]{0,64})\|\s*>|<\s*(?:/\s*)?s\s*>)"
        rf"|<\s*(?:(?P<close>/)\s*)?(?P<name>{names}|think[\w.:-]*)(?=[\s/>]|<|\Z)(?P<rest>[^<>]*?)(?P<gt>>|(?=<)|\Z)",
        re.IGNORECASE,
    )


def _lex(text: str, tags: ThinkingTags) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    for m in _lexer(tags).finditer(text):
        if m.start() > pos:
            toks.append(_Tok("text", pos, m.start(), text[pos : m.start()]))
        raw = m.group(0)
        if m.group("special"):
            name = m.group("sname") if m.group("sname") is not None else raw[1:-1]
            toks.append(_Tok("special", m.start(), m.end(), raw, re.sub(r"\s", "", name).lower()))
        else:
            rest = m.group("rest").strip()
            toks.append(
                _Tok("tag", m.start(), m.end(), raw, m.group("name").lower(), bool(m.group("close")),
                     rest.endswith("/") and m.group("gt") == ">")
            )
        pos = m.end()
    if pos < len(text):
        toks.append(_Tok("text", pos, len(text), text[pos:]))
    return toks


def _is_thinking(name: str, tags: ThinkingTags) -> bool:
    return name in tags.sections or name.startswith("think")


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
    for tok in _lex(text, tags):
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
# Lenient side: model generations.


def _strip_partial_tag(text: str, tags: ThinkingTags) -> str:
    """Drop an unfinished tag at the very end (`... </fin`, `<|en`), as a stream can end mid-tag."""
    m = re.search(r"<\s*(?:/\s*)?(\|[^<>|]*|[\w.:-]*)\Z", text)
    if m:
        frag = m.group(1).lower()
        if frag.startswith("|") or any(n.startswith(frag) for n in ("think", *tags.sections, tags.final)):
            return text[: m.start()]
    return text


def _scan(text: str, tags: ThinkingTags) -> tuple[str | None, list[tuple[str, str]]]:
    """The first final region's text (None if there is none) and the thinking regions.

    The generation ends at the first `<|end|>`, `<|endoftext|>`, `<|user|>`, `<|system|>` or
    `</s>`. A thinking tag (any section name or any name starting with `think`, self-closing
    included) opens thinking that lasts until the matching number of thinking closing tags, or to
    the end: everything inside it, final tags included, is thinking. Outside thinking, `<final>`
    opens the final region and `</final>` ends it; other tags and specials inside it are dropped.
    """
    text = _strip_partial_tag(text, tags)
    final: list[str] | None = None
    final_done = False
    regions: list[tuple[str, str]] = []
    depth, opener, start = 0, "", 0
    for tok in _lex(text, tags):
        if tok.kind == "special" and tok.name in _TURN_END:
            text = text[: tok.start]
            break
        thinking_tag = tok.kind == "tag" and _is_thinking(tok.name, tags)
        if depth:
            if thinking_tag:
                depth += -1 if tok.closing else 1
                if not depth:
                    regions.append((opener, text[start : tok.start]))
            continue
        if thinking_tag and not tok.closing:
            depth, opener, start = 1, tok.name, tok.end
        elif final is None:
            if tok.kind == "tag" and tok.name == tags.final and not (tok.closing or tok.self_closing):
                final = []
        elif not final_done:
            if tok.kind == "text":
                final.append(tok.raw)
            elif tok.kind == "tag" and tok.name == tags.final and tok.closing:
                final_done = True
    if depth:
        regions.append((opener, text[start:]))
    return (None if final is None else "".join(final)), regions


def extract_final(text: str, tags: ThinkingTags = DEFAULT_TAGS) -> str:
    """The user-visible answer of a generation: the first final's text, stripped; never thinking.

    Allow-list: only text inside a `<final>` region that is outside every thinking region is
    kept (rules in `_scan`). No `<final>` gives "" (never the raw text); an unterminated final
    runs to the end of the generation; an unterminated thinking tag hides everything after it;
    tags and `<|...|>` specials inside the final are removed. The first final wins, because a
    finished answer ends the turn and a streaming server can stop at the first `</final>`.
    """
    final, _ = _scan(text, tags)
    return (final or "").strip()


def thinking_hash(text: str, tags: ThinkingTags = DEFAULT_TAGS) -> str:
    """SHA-256 hex digest of the thinking part of `text`, for audit logs.

    The thinking part is found as in `extract_final`: each top-level thinking region (from a
    thinking opening tag to its matching close, or to the end of the generation). Its canonical
    form is, per region in order, `<name>` + stripped raw inner text + `</name>` (name lowercased,
    inner tags kept verbatim), joined by "\\n", encoded as UTF-8. For well-formed text this is
    exactly the thinking lines of `render_thinking`; text without thinking hashes the empty string.
    """
    _, regions = _scan(text, tags)
    canonical = "\n".join(f"<{name}>{body.strip()}</{name}>" for name, body in regions)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
