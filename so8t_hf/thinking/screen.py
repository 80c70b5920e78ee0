"""The positive screen of a final answer's own text: does anything in it read as a tag?

What: `find_tag_like(text, tags)` returns the first tag-like construct of `text` (the folded spelling that
matched), or None. A *tag-like construct* is anything that, in the reader's view `reader_view(text)`, is an
opening mark (any bracket) then up to 16 characters that are neither letters nor digits (`/`, spaces,
quotes...) then a tag word, or a tag word then up to 3 such characters then an angle-type closing mark; or a
`<|...|>` special-token form. Tag words: `think` (so `thinking`, `think-task`...), every configured section
name, and the final's name, each with up to 3 non-alphanumeric characters between two of its letters
(`t h i n k`, `t-h-i-n-k`), `i`/`l` also as `1 | !`, `o` also as `0`, `m` also as `rn`.

The reader's view, built only from Unicode data (no hand table of lookalike characters):
1. HTML unescaping (`html.unescape`: named and numeric entities) and NFKC, repeated until stable
   (`&amp;lt;`, full-width `＆ｌｔ；`, enclosed and squared letters, mathematical alphanumerics);
2. per character: combining marks and format characters (zero-width, soft hyphen, BOM, tag characters)
   dropped; a character whose Unicode name is a single Latin letter (`LATIN LETTER SMALL CAPITAL T`,
   `NEGATIVE SQUARED LATIN CAPITAL LETTER T`, `... DOTLESS I`) is that letter; otherwise its UTS #39
   confusable prototype (data: `confusable_homoglyphs`, Unicode's confusables.txt), followed through the
   confusables graph to the nearest ASCII or single-Latin-letter reading (`қ` -> `ĸ` -> `ᴋ` -> `k`,
   `η` -> `n`); punctuation by the words of its name (`EXCLAMATION` -> `!` so `¡`; `SOLIDUS` -> `/`; `HYPHEN`,
   `DASH`, `MINUS` -> `-`); brackets by name and category (`BRACKET`, `PARENTHESIS`, `BRACE`, `ANGLE`, `LESS-THAN`,
   `PRECEDES`, ... and Ps / Pe): opening marks read `<`, angle-type closing marks `>`, the others `)`;
3. lowercased.

Limits: prose that puts a bracket right before a tag word (`(think twice)`, `[final]`, `<think>` quoted) or
an angle after one (`think ->`) is tag-like: the final is withheld (the cost of allowing, not denying). A
thinking word that does not look like a tag word (`<reasoning>`) is not tag-like unless it is a configured
name. Works on a whole text (the final is screened once it is complete).

Origin: written for this project (issue 20) to replace the deny-list folding of `lexer` for finals; the
skeleton is UTS #39's (confusables.txt through `confusable_homoglyphs`), extended along its graph.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import deque
from functools import lru_cache
from typing import Protocol

__all__ = ["find_tag_like", "reader_view"]


class ThinkingTags(Protocol):  # `format.ThinkingTags`: the names the screen needs
    sections: tuple[str, ...]
    final: str


_LETTER_NAME = re.compile(r"\bLATIN (?:SMALL |CAPITAL )?(?:LETTER )?(?:SMALL CAPITAL |CAPITAL |SMALL |DOTLESS )*"
                          r"(?:LETTER )?([A-Z])(?: WITH .*)?$|\bLETTER ([A-Z])$")
_BRACKET_NAME = re.compile(r"BRACKET|PARENTHESIS|BRACE|ANGLE|CHEVRON|LESS-THAN|GREATER-THAN|PRECEDES|SUCCEEDS"
                           r"|ARROWHEAD|ORNAMENT|GUILLEMET")
_OPENING = re.compile(r"\b(?:LEFT|LESS-THAN|PRECEDES|OPENING|LEFT-POINTING)\b")
_ANGLE = re.compile(r"ANGLE|GREATER-THAN|SUCCEEDS|ARROWHEAD|CHEVRON|GUILLEMET")
_PUNCT_NAME = [(re.compile(r"EXCLAMATION"), "!"), (re.compile(r"SOLIDUS|SLASH"), "/"),
               (re.compile(r"VERTICAL (?:LINE|BAR)|DIVIDES"), "|"), (re.compile(r"HYPHEN|DASH|MINUS"), "-")]
_ASCII_BRACKETS = {"<": "<", "(": "<", "[": "<", "{": "<", ">": ">", ")": ")", "]": ")", "}": ")"}


@lru_cache(maxsize=1)
def _graph() -> dict[str, list[str]]:
    from confusable_homoglyphs.confusables import confusables_data

    return {k: [e["c"] for e in v] for k, v in confusables_data.items()}


def _strip_marks(s: str) -> str:
    return "".join(c for c in s if unicodedata.category(c) not in ("Mn", "Me", "Cf"))


def _letter(ch: str) -> str | None:
    m = _LETTER_NAME.search(unicodedata.name(ch, ""))
    return (m.group(1) or m.group(2)).lower() if m else None


def _plain(s: str) -> str | None:
    """`s` as a reading: an ASCII string, or a single Latin letter by name; None when it is neither."""
    s = _strip_marks(unicodedata.normalize("NFKC", s))
    if s and s.isascii():
        return s
    if len(s) == 1:
        return _letter(s)
    return None


def _prototype(ch: str) -> str | None:
    """The nearest ASCII reading of `ch` along the confusables graph (breadth first, 3 steps at most)."""
    graph = _graph()
    seen, todo = {ch}, deque([(ch, 0)])
    while todo:
        cur, depth = todo.popleft()
        for nxt in graph.get(cur, ()):
            reading = _plain(nxt)
            if reading is not None:
                return reading
            nxt = _strip_marks(nxt)
            if depth < 2 and len(nxt) == 1 and nxt not in seen:
                seen.add(nxt)
                todo.append((nxt, depth + 1))
    return None


def _bracket(ch: str) -> str | None:
    if ch in _ASCII_BRACKETS:
        return _ASCII_BRACKETS[ch]
    name, cat = unicodedata.name(ch, ""), unicodedata.category(ch)
    if cat.startswith("L") or not (_BRACKET_NAME.search(name) or cat in ("Ps", "Pe")):
        return None
    if "QUOTATION" in name and "ANGLE" not in name:
        return None
    if cat == "Ps" or _OPENING.search(name):
        return "<"
    return ">" if _ANGLE.search(name) else ")"


@lru_cache(maxsize=65536)
def _fold_char(ch: str) -> str:
    if ch.isascii():
        return _ASCII_BRACKETS.get(ch, ch.lower())
    cat = unicodedata.category(ch)
    if cat in ("Mn", "Me", "Cf") or ch in "\u115f\u1160\u3164\uffa0\u17b4\u17b5\u2800":
        return ""
    if cat.startswith("Z"):
        return " "
    reading = _letter(ch) or _bracket(ch)
    if reading is None:
        name = unicodedata.name(ch, "")
        reading = _prototype(ch) or next((a for p, a in _PUNCT_NAME if p.search(name)), None)
        if reading is None and ch.lower() != ch:
            reading = _prototype(ch.lower())
        if reading is None and ch.upper() != ch and len(ch.upper()) == 1:
            reading = _prototype(ch.upper())
    if reading is None:
        return ch.lower()
    return "".join(_ASCII_BRACKETS.get(c, c.lower()) if c.isascii() else c.lower() for c in reading)


def _unescape(text: str) -> str:
    for _ in range(8):  # each round removes one level of escaping; 8 levels is more than any renderer applies
        nxt = unicodedata.normalize("NFKC", html.unescape(text))
        if nxt == text:
            break
        text = nxt
    return text


def _view(text: str) -> tuple[str, bytearray]:
    """The reader's view and, per view character, 1 when it came from a non-ASCII character."""
    text = _unescape(text)
    parts = [_fold_char(c) for c in text]
    flags = bytearray(b"".join((b"\x00" if c.isascii() else b"\x01") * len(p) for c, p in zip(text, parts)))
    return "".join(parts), flags


def reader_view(text: str) -> str:
    """`text` as a reader sees it (module docstring): unescaped, NFKC, skeleton-mapped, lowercased."""
    return "".join(_fold_char(c) for c in _unescape(text))


def _is_letter(c: str, x: str) -> bool:
    return c == x or (x in "il" and c in "il1|!") or (x == "o" and c == "0")


def _match(view: str, flags: bytearray, i: int, word: str, step: int) -> bool:
    """Does `word` (its letters in order; `step` -1 reads backwards) start at `view[i]`? Up to 3 other
    non-alphanumeric characters between two letters; (len - 1) // 3 of its letters may be read from characters
    that were not ASCII but read as another letter or as none (`ң`, `п`, `ŋ`; CJK and kana excepted)."""
    budget, n, stop = (len(word) - 1) // 3, len(view), ">" if step == 1 else "<"
    for k, x in enumerate(word):
        if k:
            gap = 0
            while 0 <= i < n and gap < 3 and not view[i].isalnum() and view[i] != stop and not _is_letter(view[i], x):
                i, gap = i + step, gap + 1
        if not 0 <= i < n:
            return False
        c = view[i]
        if not _is_letter(c, x):
            if x == "m" and view[i : i + 2 * step : step] == ("rn" if step == 1 else "nr"):
                i += step
            elif budget and flags[i] and (c.isalpha() and unicodedata.east_asian_width(c) not in "WF"):
                budget -= 1
            else:
                return False
        i += step
    return True


@lru_cache(maxsize=32)
def _words(sections: tuple[str, ...], final: str) -> tuple[str, ...]:
    alnum = lambda n: "".join(c for c in n if c.isalnum())  # noqa: E731
    return tuple(sorted({"think", alnum(final), *(alnum(s) for s in sections if not alnum(s).startswith("think"))}))


@lru_cache(maxsize=32)
def _back_words(sections: tuple[str, ...], final: str) -> tuple[str, ...]:
    """Reversed words for the closing-side rule: the full names too (`think-task>`)."""
    alnum = lambda n: "".join(c for c in n if c.isalnum())  # noqa: E731
    return tuple(sorted({w[::-1] for w in (*_words(sections, final), *(alnum(s) for s in sections))}))


_SPECIAL = re.compile(r"<\s*\|[^<>|]{0,64}\|\s*>")


def find_tag_like(text: str, tags: ThinkingTags) -> str | None:
    """The first tag-like construct of `text` (as the reader's view spells it), or None (module docstring)."""
    view, flags = _view(text)
    words = _words(tuple(tags.sections), tags.final)
    back = _back_words(tuple(tags.sections), tags.final)
    special = _SPECIAL.search(view)
    for i, c in enumerate(view):
        if special is not None and special.start() == i:
            return special.group(0)
        if c == "<":  # an opening mark, up to 16 non-alphanumeric characters, a tag word
            j = i + 1
            while j < len(view) and j - i <= 16 and not view[j].isalnum() and view[j] != ">":
                j += 1
            if any(_match(view, flags, j, w, 1) for w in words):
                return view[i : j + 12]
        elif c == ">":  # a tag word, up to 3 non-alphanumeric characters, an angle-type closing mark
            j = i - 1
            while j >= 0 and i - j <= 3 and not view[j].isalnum() and view[j] != "<":
                j -= 1
            if any(_match(view, flags, j, w, -1) for w in back):
                return view[max(0, j - 12) : i + 1]
    return None
