"""The positive grammar of what a user may see: an output is shown only if it parses as the canonical shape.

What: `read_text(text, tags)` (decoded text) and `read_ids(ids, IdTable.of(tokenizer, tags))` (token ids)
read a generation into a `FinalReading`. Both feed one state machine (`FinalGrammar`, incremental: `feed`
a piece at a time, `reading()` at the end). The only output shown (status `final`) is

    whitespace, then the configured sections, each at most once and in their configured order, each as
    exactly `<name>` ... `</name>`; then one `<final>` ... `</final>` whose text passes the screen
    (`screen.find_tag_like`: nothing in it reads as a tag, in any script, markup or entity); then nothing but
    whitespace and turn-end tokens (`<|end|>`, `<|endoftext|>`, `<|user|>`, `<|system|>`, `</s>`, EOS).

A section may be left out (training data renders every one, `render_thinking`; a missing one makes the serve
outcome `malformed`, never a leak). On text, a tag is its exact string; on ids, a tag is its single vocabulary
id (`chat_template.add_thinking_tokens`) and never a spelling: `<`, `final`, `>` as ordinary pieces are text.
Anything else is status `withheld` (final "") with the first rule broken as `reason` (`REASONS`); a valid
output whose final is only whitespace is `no_final` (`empty_final`).

Limits: a final is shown only once the output is complete, so a stream shows the final in one piece at the
end (`visible_final_prefix`): any later token could still withhold it. Plain-prose thinking inside a final
cannot be recognised. Stdlib + `screen` + `lexer` (its turn-end tokens) only: shipped beside the Hub pipeline.

Origin: written for this project (issue 20): allow, don't deny; replaces the lexer-based reader of issue 14.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, NamedTuple, Protocol

from .lexer import TURN_END_TOKENS  # relative: grammar, screen and lexer are shipped beside the pipeline
from .screen import find_tag_like

__all__ = ["REASONS", "STREAMING_API", "TURN_END_TOKENS", "FinalGrammar", "FinalOnlyStreamer", "FinalReading",
           "IdReader", "IdTable", "read_ids", "read_text"]


REASONS = {  # reason code -> what broke the grammar (the first rule broken, reading left to right)
    "text_outside_sections": "non-whitespace text (or a tag spelled any other way) before or between the blocks",
    "section_order": "a section opened again, or after a later one (configured order, each at most once)",
    "stray_closing_tag": "a closing tag with no block open",
    "nested_tag": "a section tag inside another section",
    "final_in_section": "a final tag inside a thinking section",
    "unclosed_section": "the output ended (end of text or a turn-end token) inside a thinking section",
    "missing_final": "the output ended without a final",
    "truncated": "the text ended inside the final (no closing final tag: cut by a length limit or a stream)",
    "unclosed_final": "a turn-end token inside the final",
    "tag_in_final": "the final holds a tag: exact, or tag-like in any spelling, script, markup or entity",
    "special_in_final": "the final holds a special or role token (`<|...|>`, an added token id)",
    "second_final": "a second final after the first",
    "text_after_final": "non-whitespace text or a tag after the final (only turn-end tokens may follow)",
    "empty_final": "a well-formed output whose final is empty (status no_final, not withheld)",
}


class ThinkingTags(Protocol):  # `format.ThinkingTags` (hashable)
    sections: tuple[str, ...]
    final: str


class FinalReading(NamedTuple):
    """How a generation reads: the final users may see, and why it is what it is."""

    final: str  # the answer to show: stripped; "" when there is none or it is withheld
    status: str  # "final" | "no_final" | "withheld"
    reason: str  # a `REASONS` code: why it is withheld ("empty_final" for no_final, "" for a final)
    draft: str  # the final's text so far (between its tags, unstripped); "" without one
    closed: bool  # the final was closed by its tag in grammatical position
    regions: tuple[tuple[str, str], ...]  # the thinking sections read: (name, raw inner text)
    detail: str = ""  # the tag or text that broke the rule (for developers and logs, never for users)


class FinalGrammar:
    """The grammar as a state machine. Feed pieces in order: `open(name)`, `close(name)`, `text(s)`, `end()`
    (a turn-end token), `special(s)` (any other control token); `reading()` any time (the end of the input
    counts as the end of the output). `done` is True once nothing fed later can change the reading except a
    text-after-final violation (the final closed) or the reading is withheld (`failed`)."""

    def __init__(self, tags: ThinkingTags) -> None:
        self.tags = tags
        self._order = {name: i for i, name in enumerate(tags.sections)}
        self.state = "between"  # between | section | final | after
        self.section = ""
        self.next = 0  # index of the first section that may still open
        self.reason = self.detail = ""
        self._parts: list[str] = []
        self._final: list[str] = []
        self.regions: list[tuple[str, str]] = []

    @property
    def failed(self) -> bool:
        return bool(self.reason)

    @property
    def done(self) -> bool:
        return self.failed or self.state == "after"

    def _fail(self, reason: str, detail: str) -> None:
        if not self.reason:
            self.reason, self.detail = reason, detail[:80]

    def open(self, name: str) -> None:
        if self.reason:
            return
        tag = f"<{name}>"
        if self.state == "between":
            if name == self.tags.final:
                self.state = "final"
            elif self._order[name] < self.next:
                self._fail("section_order", tag)
            else:
                self.state, self.section, self.next, self._parts = "section", name, self._order[name] + 1, []
        elif self.state == "section":
            self._fail("final_in_section" if name == self.tags.final else "nested_tag", tag)
        elif self.state == "final":
            self._fail("tag_in_final", tag)
        else:
            self._fail("second_final" if name == self.tags.final else "text_after_final", tag)

    def close(self, name: str) -> None:
        if self.reason:
            return
        tag = f"</{name}>"
        if self.state == "section":
            if name == self.section:
                self.regions.append((name, "".join(self._parts)))
                self.state = "between"
            else:
                self._fail("final_in_section" if name == self.tags.final else "nested_tag", tag)
        elif self.state == "final":
            if name == self.tags.final:
                self.state = "after"
            else:
                self._fail("tag_in_final", tag)
        elif self.state == "between":
            self._fail("stray_closing_tag", tag)
        else:
            self._fail("text_after_final", tag)

    def text(self, s: str) -> None:
        if self.reason or not s:
            return
        if self.state == "section":
            self._parts.append(s)
        elif self.state == "final":
            self._final.append(s)
        elif s.strip():
            self._fail("text_outside_sections" if self.state == "between" else "text_after_final", "")

    def special(self, s: str) -> None:
        if self.reason:
            return
        if self.state == "section":
            self._parts.append(s)
        else:
            self._fail({"between": "text_outside_sections", "final": "special_in_final"}.get(self.state,
                                                                                              "text_after_final"), s)

    def end(self, s: str = "<|end|>") -> None:
        if self.reason:
            return
        if self.state == "section":
            self._fail("unclosed_section", s)
        elif self.state == "final":
            self._fail("unclosed_final", s)
        elif self.state == "between":
            self._fail("missing_final", s)

    def set_final_text(self, text: str) -> None:
        """Replace the final's text pieces by `text` (ids: the final's ids decoded together, spaces right)."""
        self._final = [text]

    def set_region_texts(self, texts: list[str]) -> None:
        self.regions = [(name, t) for (name, _), t in zip(self.regions, texts)]

    def reading(self) -> FinalReading:
        draft = "".join(self._final)
        regions = tuple(self.regions)
        if self.state == "section":
            regions += ((self.section, "".join(self._parts)),)
        closed = self.state == "after" or (self.reason in ("text_after_final", "second_final"))
        reason, detail = self.reason, self.detail
        if not reason:
            if self.state == "section":
                reason, detail = "unclosed_section", f"<{self.section}>"
            elif self.state == "final":
                reason, detail = "truncated", draft[-20:]
            elif self.state == "between":
                reason = "missing_final"
            else:
                hit = find_tag_like(draft, self.tags)
                if hit is not None:
                    reason, detail = "tag_in_final", hit
        if reason:
            return FinalReading("", "withheld", reason, draft, closed, regions, detail)
        shown = draft.strip()
        if not shown:
            return FinalReading("", "no_final", "empty_final", draft, True, regions)
        return FinalReading(shown, "final", "", draft, True, regions)


# ------------------------------------------------------------------------------------------------ text
@lru_cache(maxsize=32)
def _text_pattern(sections: tuple[str, ...], final: str) -> re.Pattern[str]:
    tags = [f"<{'/' * c}{n}>" for n in (*sections, final) for c in (0, 1)]
    return re.compile("|".join(re.escape(t) for t in sorted({*tags, *TURN_END_TOKENS, "<s>"}, key=len, reverse=True))
                      + r"|<\|[^<>|\s]{1,64}\|>")


def feed_text(grammar: FinalGrammar, text: str) -> None:
    """Feed decoded text: exact tag strings are tags, turn-end strings end the turn, `<|...|>` are specials."""
    names = {*grammar.tags.sections, grammar.tags.final}
    pos = 0
    for m in _text_pattern(tuple(grammar.tags.sections), grammar.tags.final).finditer(text):
        grammar.text(text[pos : m.start()])
        tok = m.group(0)
        name = tok[1:-1].lstrip("/")
        if tok in TURN_END_TOKENS:
            grammar.end(tok)
        elif name in names:
            (grammar.close if tok.startswith("</") else grammar.open)(name)
        else:
            grammar.special(tok)
        pos = m.end()
        if grammar.failed:
            return
    grammar.text(text[pos:])


def read_text(text: str, tags: ThinkingTags) -> FinalReading:
    """Read decoded text under the grammar (module docstring)."""
    grammar = FinalGrammar(tags)
    feed_text(grammar, text)
    return grammar.reading()


# ------------------------------------------------------------------------------------------------- ids
class IdTable(NamedTuple):
    """What each control id of a tokenizer is: tag ids, turn-end ids, other added / special ids."""

    tags: Any  # ThinkingTags
    tag_of: dict[int, tuple[str, bool]]  # id -> (tag name, closing)
    ends: frozenset[int]
    specials: frozenset[int]
    tokenizer: Any

    @classmethod
    def of(cls, tokenizer: Any, tags: ThinkingTags, stop_ids: Any = ()) -> IdTable:
        """The table for `tokenizer`; raises ValueError when a tag is not one token (add_thinking_tokens)."""
        vocab = tokenizer.get_vocab()
        tag_of = {}
        for name in (*tags.sections, tags.final):
            for closing in (False, True):
                tag = f"<{'/' * closing}{name}>"
                tid = vocab.get(tag)
                if tid is None or list(tokenizer.encode(tag, add_special_tokens=False)) != [tid]:
                    raise ValueError(f"{tag!r} is not a single token of this tokenizer: add the tags with "
                                     "so8t_hf.thinking.chat_template.add_thinking_tokens, or read decoded text")
                tag_of[tid] = (name, closing)
        ends = {vocab[t] for t in TURN_END_TOKENS if t in vocab} | {int(i) for i in stop_ids}
        eos = getattr(tokenizer, "eos_token_id", None)
        ends |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        specials = {int(i) for i in decoder} | set(getattr(tokenizer, "all_special_ids", []) or [])
        return cls(tags, tag_of, frozenset(ends), frozenset(specials - ends - set(tag_of)), tokenizer)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class IdReader:
    """Incremental reading of token ids: `feed(id)` per generated token (O(1) each, one short decode for text
    between blocks), `reading()` decodes the final's and the sections' ids together at the end."""

    def __init__(self, table: IdTable) -> None:
        self.table, self.grammar = table, FinalGrammar(table.tags)
        self._final_ids: list[int] = []
        self._region_ids: list[list[int]] = []

    def feed(self, tid: int) -> None:
        g, t = self.grammar, self.table
        if g.failed:
            return
        if tid in t.tag_of:
            name, closing = t.tag_of[tid]
            before = g.state
            (g.close if closing else g.open)(name)
            if before == "between" and g.state == "section":
                self._region_ids.append([])
        elif tid in t.ends:
            g.end(t.decode([tid]))
        elif tid in t.specials:
            g.special(t.decode([tid]))
            if g.state == "section" and not g.failed:
                self._region_ids[-1].append(tid)
        elif g.state == "final":
            self._final_ids.append(tid)
            g.text("\x00")  # placeholder: the final's text is decoded as a whole in `reading`
        elif g.state == "section":
            self._region_ids[-1].append(tid)
        else:
            g.text(t.decode([tid]))

    def reading(self) -> FinalReading:
        g = self.grammar
        g.set_final_text(self.table.decode(self._final_ids) if self._final_ids else "")
        g.set_region_texts([self.table.decode(ids) for ids in self._region_ids])
        g._parts = [self.table.decode(self._region_ids[-1])] if g.state == "section" and self._region_ids else g._parts
        return g.reading()


def read_ids(ids: Any, table: IdTable) -> FinalReading:
    """Read generated token ids under the grammar: a tag is its id, never a spelling (module docstring)."""
    reader = IdReader(table)
    for tid in ids:
        reader.feed(int(tid))
        if reader.grammar.failed:
            break
    return reader.reading()


# -------------------------------------------------------------------------------------------- streamers
STREAMING_API = ("so8t_hf's final-only streams: `so8t-hf serve` (/think and /v1/chat/completions with "
                 "\"stream\": true), or a transformers TextStreamer / TextIteratorStreamer given to the "
                 "So8tThinkingPipeline or so8t_hf.inference.generate_reply")


class FinalOnlyStreamer:
    """Wraps a transformers `TextStreamer` / `TextIteratorStreamer` (anything with `on_finalized_text`) for
    `generate(streamer=...)`: the token ids go to the grammar, never to the wrapped streamer; at the end the
    wrapped streamer receives the final (what `read_ids` shows: "" when withheld) in one piece, then its end.
    The first `put` is the prompt (as `generate` sends it) and is skipped; batch size 1 only."""

    def __init__(self, streamer: Any, table: IdTable) -> None:
        if not callable(getattr(streamer, "on_finalized_text", None)):
            raise TypeError(f"{type(streamer).__name__} is not a TextStreamer: it would receive the raw token ids, "
                            f"thinking included. Use {STREAMING_API}.")
        self.streamer, self.reader, self._prompt_seen = streamer, IdReader(table), False
        self.reading: FinalReading | None = None

    def put(self, value: Any) -> None:
        rows = value.tolist() if hasattr(value, "tolist") else list(value)
        rows = rows if rows and isinstance(rows[0], list) else [rows]
        if len(rows) > 1:
            raise ValueError("a final-only streamer takes batch size 1 (as TextStreamer does)")
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for tid in rows[0]:
            self.reader.feed(int(tid))

    def end(self) -> None:
        self.reading = self.reader.reading()
        self.streamer.on_finalized_text(self.reading.final, stream_end=True)
