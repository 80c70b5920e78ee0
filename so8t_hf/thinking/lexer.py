"""The one lexer of the thinking format: tags, `<|...|>` role / turn-end tokens, and a reader's folding.

What: `lex(text, tags)` splits text into text, tag and special tokens (spans in the original text);
`fold(text)` is the view it compares against. The strict parser of training data (`format`), `validation`,
`metrics.scoring` and `thinking_hash` use this module; what a user may see is decided by the positive grammar
(`grammar`, `screen`), not by this lexer. The turn-end and role tokens are defined here once (`TURN_END_TOKENS`,
`ROLE_TOKENS`).

A tag is recognised the way a reader sees it. Each character is folded on its own: compatibility
decomposition (NFKD, so NFKC's full-width and styled forms count), combining marks, zero-width and other
format characters (soft hyphen, ZWSP, ZWJ, BOM, tag characters) and Hangul fillers removed, Unicode
TR39 confusables mapped to their ASCII prototype (Cyrillic `і`, the Kelvin sign, Greek `Τ`; data:
`confusable_homoglyphs`), decorated Latin letters to their base letter (`ʈ` -> `t`, by Unicode name), a few
Cyrillic lowercase lookalikes that TR39 omits (`п к т н`), dash and bracket lookalikes mapped to `-`, `<` and `>` (`‹ › « » ＜ ＞ 〈 〉 ...`),
then lowercased. On the folded text:
- a *thinking tag* is `<`, up to 16 characters that are not letters or digits (spaces, `/`, quotes...),
  then the letters of `think` (or of a section name not starting with `think`) with up to 3 such
  characters between letters (`i` may also be `l`, `1`, `|` or `!`), then ANY characters up to `>`,
  the next `<`, or the end. So `<think-safety="1">`, `<think!>`, `<think-task[1]>`, `<thinking>`,
  `< /T h i n k >` and `<|think|>` are thinking tags; a `/` before the name makes it a closing tag;
- a *final tag* is `<`, optional `/`, the final name, then anything up to `>` (`<final class="x">`);
- a *special* is `<|name|>`, `<s>` or `</s>`; `TURN_END_TOKENS` end a generation.
The per-character folding never lets a later character change an earlier one, so a growing text lexes
the same way up to its last `<` (the property the streaming rule relies on).

Limits: the rule is deliberately wide (it fails closed): prose such as `x < thinking time` or
`<think>` quoted in an answer is a thinking tag. A word that means thinking without looking like
`think` (`<reasoning>`) is not recognised unless it is a configured section name; nor is plain prose.

Origin: written for this project after an attack review (issue 14) of the ASCII-only lexer of 0.2.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import NamedTuple, Protocol


class ThinkingTags(Protocol):  # `format.ThinkingTags` (hashable): the names the lexer needs
    sections: tuple[str, ...]
    final: str

__all__ = [
    "ROLE_TOKENS",
    "TURN_END_TOKENS",
    "Folded",
    "Tok",
    "find_specials",
    "find_tags",
    "fold",
    "lex",
    "partial_tag_start",
    "until_turn_end",
]

TURN_END_TOKENS = ("<|end|>", "<|endoftext|>", "<|user|>", "<|system|>", "</s>")  # a generation ends at the first
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # the Phi-3 chat template's turn markers
_TURN_END_NAMES = frozenset(t.strip("<>|") for t in TURN_END_TOKENS)  # end, endoftext, user, system, /s

# ----------------------------------------------------------------------------------------- folding
_BRACKETS = {"<": "‹«〈〈《⟨⟪❬❰❮⦑⧼≺⋖≪˂ᐸ﹤＜⊰", ">": "›»〉〉》⟩⟫❭❱❯⦒⧽≻⋗≫˃ᐳ﹥＞⊱", "/": "⁄∕⧸╱⟋／", "|": "∣｜ǀ￨"}
_EXTRA = {c: a for a, chars in _BRACKETS.items() for c in chars}
# Lowercase Cyrillic letters that read as Latin in most fonts but are not TR39 confusables of them.
_EXTRA.update({"п": "n", "к": "k", "т": "t", "н": "h", "ћ": "h", "ђ": "h"})
_IGNORABLE = frozenset("\u115f\u1160\u3164\uffa0\u17b4\u17b5\u2800")  # fillers and blanks drawn as nothing
_ASCII_TARGETS = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ<>/|-"


@lru_cache(maxsize=1)
def _confusables() -> dict[str, str]:
    """Non-ASCII character -> the ASCII character it is a TR39 confusable of (letters before digits/punct)."""
    from confusable_homoglyphs.confusables import confusables_data

    table: dict[str, str] = {}
    for target in _ASCII_TARGETS:
        for entry in confusables_data.get(target, ()):
            glyph = entry["c"].strip("\u200e\u200f")
            if len(glyph) == 1 and not glyph.isascii():
                table.setdefault(glyph, target)
    return table


_LATIN_NAME = re.compile(r"LATIN (?:SMALL |CAPITAL )?LETTER (?:SMALL CAPITAL )?([A-Z])(?: WITH .*)?")


def _latin_base(ch: str) -> str | None:
    """`t` for LATIN SMALL LETTER T WITH RETROFLEX HOOK and the like (a decorated Latin letter reads as itself)."""
    m = _LATIN_NAME.fullmatch(unicodedata.name(ch, ""))
    return m.group(1) if m else None


def _ignorable(ch: str) -> bool:
    return unicodedata.category(ch) in ("Mn", "Me", "Cf") or ch in _IGNORABLE


def _fold_char(ch: str) -> str:
    if ch.isascii():
        return ch.lower()
    if ch in _EXTRA:
        return _EXTRA[ch]
    out = []
    for c in unicodedata.normalize("NFKD", ch):
        if c.isascii():
            out.append(c.lower())
        elif not _ignorable(c):
            table = _confusables()
            mapped = _EXTRA.get(c) or table.get(c) or table.get(c.lower()) or table.get(c.upper()) or _latin_base(c)
            out.append((mapped or c).lower())
    return "".join(out)


class _FoldTable(dict):
    def __missing__(self, ch: str) -> str:
        self[ch] = folded = _fold_char(ch)
        return folded


_FOLD = _FoldTable()


class Folded(NamedTuple):
    """`text` folded for comparison; `origin[i]` is the index in the original of folded character i."""

    text: str
    origin: list[int] | None  # None: the identity (every character folded to exactly one)
    size: int  # length of the original

    def start(self, i: int) -> int:
        """Original index where folded position `i` starts."""
        if self.origin is None:
            return i
        return self.origin[i] if i < len(self.text) else self.size

    def end(self, i: int) -> int:
        """Original index just after the character that produced folded position `i - 1`."""
        if self.origin is None or i == 0:
            return i
        return self.origin[i - 1] + 1


def fold(text: str) -> Folded:
    """The reader's view of `text` (module docstring), with a map back to the original."""
    if text.isascii():
        return Folded(text.lower(), None, len(text))
    parts = [_FOLD[c] for c in text]
    folded = "".join(parts)
    if len(folded) == len(text) and all(len(p) == 1 for p in parts):
        return Folded(folded, None, len(text))
    return Folded(folded, [i for i, p in enumerate(parts) for _ in p], len(text))


# ----------------------------------------------------------------------------------------- lexing
_SEP = r"[^a-z0-9<>]{0,3}"
_LETTER = {"i": "[il1|!]"}


def _word(name: str) -> str:
    """A pattern for `name`'s letters and digits in order, up to 3 other characters between two of them."""
    alnum = [c for c in name if c.isalnum()]
    return _SEP.join(_LETTER.get(c, re.escape(c)) for c in alnum)


def _alnum(name: str) -> str:
    return "".join(c for c in name if c.isalnum())


@lru_cache(maxsize=32)
def _thinking_words(tags: ThinkingTags) -> tuple[str, ...]:
    """The words that start a thinking tag: `think`, and each section name that does not start with it."""
    return ("think", *sorted({_alnum(n) for n in tags.sections if not _alnum(n).startswith("think")}))


@lru_cache(maxsize=32)
def _pattern(tags: ThinkingTags) -> re.Pattern[str]:
    words = "|".join(_word(w) for w in _thinking_words(tags))
    return re.compile(
        rf"<(?P<tpre>[^a-z0-9<>]{{0,16}})(?P<tname>{words})(?P<trest>[^<>]*)(?P<tgt>>|(?=<)|\Z)"
        r"|(?P<special><\s*\|(?P<sname>[^<>|]{0,64})\|\s*>|<\s*(?:/\s*)?s\s*>)"
        rf"|<\s*(?:(?P<fclose>/)\s*)?(?P<fname>{re.escape(tags.final)})(?=[\s/>]|<|\Z)(?P<frest>[^<>]*)(?P<fgt>>|(?=<)|\Z)"
    )


class Tok(NamedTuple):
    """A token; `start`/`end` index the original text, `raw` is its original spelling."""

    kind: str  # "text" | "tag" | "special"
    start: int
    end: int
    raw: str
    name: str = ""  # folded: a tag's name run ([a-z0-9_.:-]*), a special's name without spaces ("end", "/s")
    closing: bool = False
    self_closing: bool = False
    thinking: bool = False  # a thinking tag (opening, closing or self-closing)

    @property
    def turn_end(self) -> bool:
        return self.kind == "special" and self.name in _TURN_END_NAMES


_NAME_RUN = re.compile(r"[a-z0-9_.:-]*")


def lex(text: str, tags: ThinkingTags) -> list[Tok]:
    """Text, tag and special tokens of `text`, in order, covering it whole (linear time)."""
    f = fold(text)
    toks: list[Tok] = []
    pos = 0
    for m in _pattern(tags).finditer(f.text):
        start, end = max(pos, f.start(m.start())), f.end(m.end())
        if start > pos:
            toks.append(Tok("text", pos, start, text[pos:start]))
        raw = text[start:end]
        if m.group("special"):
            name = m.group("sname") if m.group("sname") is not None else m.group("special")[1:-1]
            toks.append(Tok("special", start, end, raw, re.sub(r"\s", "", name)))
        elif m.group("tname") is not None:
            name = _NAME_RUN.match(f.text, m.start("tname")).group(0)
            self_closing = m.group("trest").rstrip().endswith("/") and m.group("tgt") == ">"
            toks.append(Tok("tag", start, end, raw, name, "/" in m.group("tpre"), self_closing, True))
        else:
            name = m.group("fname")
            self_closing = m.group("frest").rstrip().endswith("/") and m.group("fgt") == ">"
            toks.append(Tok("tag", start, end, raw, name, bool(m.group("fclose")), self_closing))
        pos = end
    if pos < len(text):
        toks.append(Tok("text", pos, len(text), text[pos:]))
    return toks


def until_turn_end(text: str, tags: ThinkingTags) -> str:
    """`text` up to its first turn-ending token (the generation proper)."""
    for tok in lex(text, tags):
        if tok.turn_end:
            return text[: tok.start]
    return text


def find_specials(text: str, tags: ThinkingTags) -> list[str]:
    """Every `<|...|>`, `<s>` or `</s>` in `text`, as written, in order."""
    return [t.raw for t in lex(text, tags) if t.kind == "special"]


def find_tags(text: str, tags: ThinkingTags) -> list[str]:
    """Every thinking or final tag in `text` (exact or disguised), as written, in order."""
    return [t.raw for t in lex(text, tags) if t.kind == "tag"]


def partial_tag_start(text: str, tags: ThinkingTags) -> int | None:
    """Where an unfinished tag begins at the very end of `text` (`</fin`, `<|en`, `<thi`, `‹`), else None.

    The last `<` with no `>` after it starts one when what follows could still become a thinking tag,
    a final tag or a special (its letters are a beginning of `think`, a section or the final name).
    """
    f = fold(text)
    lt = f.text.rfind("<")
    if lt < 0 or ">" in f.text[lt:]:
        return None
    tail = f.text[lt + 1 :]
    bare = "".join(tail.split())
    if bare in ("", "/", "s", "/s") or (bare.startswith("|") and "|" not in bare[1:]):
        return f.start(lt)
    letters = [c for c in tail if c.isalnum() or c in "|!"]
    for word in (*_thinking_words(tags), _alnum(tags.final)):
        if len(letters) < len(word) and all(c == w or (w == "i" and c in "l1|!") for c, w in zip(letters, word)):
            return f.start(lt)
    return None
