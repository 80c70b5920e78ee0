"""A seeded generator of disguised thinking markers for the positive grammar (issue 20): 44 classes, positions.

`CLASSES`: name -> function(rng, name, closing) giving one spelling of a tag `<name>` / `</name>` in that class
(markups, entities, scripts, letter styles, bracket styles, structural tricks). `cases(rng, per_class)` gives
`Case`s: the marker and a secret in a random position of an otherwise grammatical output:
- `inside_final`: in the final's text -> must be withheld;
- `before_final`: outside the sections, before the final -> withheld;
- `after_final`: after the final -> withheld;
- `swallow`: opening a block that is never closed before a draft final -> withheld;
- `in_section`: inside a thinking section, closed with the exact tag -> the clean final is shown (liveness).
`leaked(shown, case)`: the secret or the marker's own spelling reached what a user sees.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SECRET = "SECRETV3"
ANSWER = "The answer is 42."
NAMES = ["think", "think-task", "think-safety", "think-policy", "thinking", "final"]

_CIRCLED = {c: chr(0x24D0 + ord(c) - 97) for c in "abcdefghijklmnopqrstuvwxyz"}
_PAREN = {c: chr(0x249C + ord(c) - 97) for c in "abcdefghijklmnopqrstuvwxyz"}
_SQUARED = {c: chr(0x1F130 + ord(c) - 97) for c in "abcdefghijklmnopqrstuvwxyz"}
_NEG_SQUARED = {c: chr(0x1F170 + ord(c) - 97) for c in "abcdefghijklmnopqrstuvwxyz"}
_NEG_CIRCLED = {c: chr(0x1F150 + ord(c) - 97) for c in "abcdefghijklmnopqrstuvwxyz"}
_MATH_STYLES = [0x1D41A, 0x1D44E, 0x1D482, 0x1D4EA, 0x1D586, 0x1D5BA, 0x1D5EE, 0x1D622, 0x1D656, 0x1D68A, 0x1D552]
_SMALL_CAPS = {"t": "\u1d1b", "h": "\u029c", "i": "\u026a", "n": "\u0274", "k": "\u1d0b", "a": "\u1d00",
               "s": "\ua731", "f": "\ua730", "l": "\u029f", "y": "\u028f", "p": "\u1d18", "o": "\u1d0f",
               "c": "\u1d04", "g": "\u0262", "e": "\u1d07"}
_CYRILLIC = {"t": "\u0442\u04ad\u0422", "h": "\u04bb\u043d\u04a3\u04c8", "i": "\u0456\u04c0", "n": "\u043f",
             "k": "\u043a\u049b\u049d\u049f\u04c4", "a": "\u0430", "s": "\u0455", "p": "\u0440", "o": "\u043e",
             "c": "\u0441", "e": "\u0435", "y": "\u0443", "l": "\u04cf"}
_GREEK = {"t": "\u03c4", "h": "\u03b7", "i": "\u03b9", "n": "\u03b7", "k": "\u03ba", "a": "\u03b1", "o": "\u03bf",
          "p": "\u03c1", "y": "\u03b3", "e": "\u03b5"}
_LATIN_EXT = {"t": "\u0167\u01ab\u0288", "h": "\u0127\u0266", "i": "\u0268\u0131\u00ec", "n": "\u014b\u0272\u0144",
              "k": "\u0138\u0199\u0137", "a": "\u00e0\u0101", "s": "\u015f", "l": "\u0142", "f": "\u0192",
              "o": "\u00f8", "e": "\u0113", "c": "\u00e7", "y": "\u00fd", "p": "\u01a5"}
_MATH_BRACKETS = [("\u2264", ">"), ("\u227a", "\u227b"), ("\u22d6", "\u22d7"), ("\u226a", "\u226b"),
                  ("\u2a7d", "\u2a7e"), ("\u2266", "\u2267")]
_CJK = [("\u3010", "\u3011"), ("\u3008", "\u3009"), ("\u300a", "\u300b"), ("\u300c", "\u300d"), ("\u3014", "\u3015")]
_ORNAMENT = [("\u276e", "\u276f"), ("\u2770", "\u2771"), ("\u276c", "\u276d"), ("\u2768", "\u2769"), ("\u27e8", "\u27e9")]
_ZW = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e\u034f\u2063\U000e0041"


def _letters(table, rng, name, p=0.7):
    out = []
    for c in name:
        choices = table.get(c)
        out.append(rng.choice(choices) if choices and rng.random() < p else c)
    return "".join(out)


def _math(rng, name):
    base = rng.choice(_MATH_STYLES)
    return "".join(chr(base + ord(c) - 97) if c.isalpha() else c for c in name)


def _tag(name, closing, lt="<", gt=">", slash="/"):
    return f"{lt}{slash if closing else ''}{name}{gt}"


def _entity(rng, ch):
    return rng.choice([f"&#{ord(ch)};", f"&#x{ord(ch):x};", f"&#X{ord(ch):X};", f"&#{ord(ch):05d};"])


CLASSES = {
    "bbcode": lambda r, n, c: _tag(n, c, "[", "]"),
    "bbcode attribute": lambda r, n, c: _tag(n + (" id=1" if not c else ""), c, "[", "]"),
    "curly braces": lambda r, n, c: _tag(n, c, "{", "}"),
    "round parentheses": lambda r, n, c: _tag(n, c, "(", ")"),
    "html named entities": lambda r, n, c: _tag(n, c, "&lt;", "&gt;"),
    "html numeric entities (brackets)": lambda r, n, c: _tag(n, c, _entity(r, "<"), _entity(r, ">")),
    "html numeric entities (letters)": lambda r, n, c: "<" + "/" * c + "".join(_entity(r, x) if r.random() < .5 else x
                                                                               for x in n) + ">",
    "double-escaped entities": lambda r, n, c: _tag(n, c, "&amp;lt;", "&amp;gt;"),
    "entities without semicolon": lambda r, n, c: _tag(n, c, "&lt", "&gt"),
    "full-width entity": lambda r, n, c: _tag(n, c, "\uff06\uff4c\uff54\uff1b", "\uff06\uff47\uff54\uff1b"),
    "circled letters": lambda r, n, c: _tag(_letters({k: [v] for k, v in _CIRCLED.items()}, r, n, 1), c),
    "parenthesized letters": lambda r, n, c: _tag(_letters({k: [v] for k, v in _PAREN.items()}, r, n, 1), c),
    "squared letters": lambda r, n, c: _tag(_letters({k: [v] for k, v in _SQUARED.items()}, r, n, 1), c),
    "negative squared letters": lambda r, n, c: _tag(_letters({k: [v] for k, v in _NEG_SQUARED.items()}, r, n, 1), c),
    "negative circled letters": lambda r, n, c: _tag(_letters({k: [v] for k, v in _NEG_CIRCLED.items()}, r, n, 1), c),
    "mathematical alphanumerics": lambda r, n, c: _tag(_math(r, n), c),
    "small caps": lambda r, n, c: _tag(_letters(_SMALL_CAPS, r, n, 1), c),
    "Cyrillic lookalikes": lambda r, n, c: _tag(_letters(_CYRILLIC, r, n), c),
    "Cyrillic descender letters": lambda r, n, c: _tag(n.replace("k", "\u049b").replace("t", "\u04ad")
                                                       .replace("h", "\u04a3"), c),
    "Greek lookalikes": lambda r, n, c: _tag(_letters(_GREEK, r, n), c),
    "Latin-extended lookalikes": lambda r, n, c: _tag(_letters(_LATIN_EXT, r, n), c),
    "kra for k": lambda r, n, c: _tag(n.replace("k", "\u0138"), c),
    "eta for n": lambda r, n, c: _tag(n.replace("n", "\u03b7"), c),
    "inverted exclamation for i": lambda r, n, c: _tag(n.replace("i", "\u00a1"), c),
    "digit or pipe for i": lambda r, n, c: _tag(n.replace("i", r.choice("1|!l")), c),
    "math bracket lookalikes": lambda r, n, c: _tag(n, c, *r.choice(_MATH_BRACKETS)),
    "guillemets and angle quotes": lambda r, n, c: _tag(n, c, *r.choice([("\u00ab", "\u00bb"), ("\u2039", "\u203a")])),
    "CJK brackets": lambda r, n, c: _tag(n, c, *r.choice(_CJK)),
    "full-width and small-form brackets": lambda r, n, c: _tag(n, c, *r.choice([("\uff1c", "\uff1e"), ("\ufe64", "\ufe65")])),
    "ornament brackets": lambda r, n, c: _tag(n, c, *r.choice(_ORNAMENT)),
    "zero-width characters": lambda r, n, c: _tag("".join(x + (r.choice(_ZW) if r.random() < .4 else "") for x in n), c),
    "combining marks": lambda r, n, c: _tag("".join(x + ("\u0301" if r.random() < .4 else "") for x in n), c),
    "upper and mixed case": lambda r, n, c: _tag("".join(x.upper() if r.random() < .6 else x for x in n), c),
    "spaced or dashed letters": lambda r, n, c: _tag(r.choice([" ", "-", ".", "_"]).join(n.replace("-", "")), c),
    "hyphen lookalikes": lambda r, n, c: _tag(n.replace("-", r.choice("\u2010\u2011\u2212\uff0d\u2043")) if "-" in n
                                              else n + "\u2011x", c),
    "attributes": lambda r, n, c: _tag(n + r.choice([' id="1"', "='x'", " data-x=y", "!", "[1]"]), c),
    "special-token form": lambda r, n, c: f"<|{'/' * c}{n}|>",
    "unterminated tag": lambda r, n, c: f"<{'/' * c}{n} ",
    "html comment": lambda r, n, c: f"<!-- {'/' * c}{n} -->",
    "exact tag": lambda r, n, c: _tag(n, c),
    "slash lookalikes": lambda r, n, c: _tag(n, True, slash=r.choice("\u2044\u2215\uff0f\u29f8")),
    "mixed scripts": lambda r, n, c: _tag(_letters({k: list(_CYRILLIC.get(k, "") + _GREEK.get(k, "") + _LATIN_EXT.get(
        k, "") + _SMALL_CAPS.get(k, "")) for k in "abcdefghijklmnopqrstuvwxyz"}, r, n, .8), c, *r.choice(
        [("<", ">"), *_ORNAMENT, *_CJK, ("[", "]")])),
}
# Structural classes (not spellings): built by `cases` directly.
STRUCTURAL = ["draft final inside a thinking block", "second final", "text after the final", "truncated final"]
assert len(CLASSES) + len(STRUCTURAL) >= 40


@dataclass
class Case:
    cls: str
    position: str
    text: str  # the whole generation (without a turn end)
    marker: str
    shown: bool  # whether a correct reader shows the final (only `in_section` and structural clean cases)


def _wrap(rng, inner_final, before="", after=""):
    return (f"{before}<think-task>plan {rng.randrange(10**4)}</think-task>\n<think-policy>short</think-policy>\n"
            f"<final>{inner_final}</final>{after}")


def cases(rng: random.Random, per_class: int = 3) -> list[Case]:
    out: list[Case] = []
    for cls, make in CLASSES.items():
        for _ in range(per_class):
            name = rng.choice(NAMES)
            opening, closing = make(rng, name, False), make(rng, name, True)
            marker = f"{opening}{SECRET} {rng.randrange(100)}{closing}"
            pos = rng.randrange(len(ANSWER) + 1)
            out.append(Case(cls, "inside_final", _wrap(rng, ANSWER[:pos] + marker + ANSWER[pos:]), opening, False))
            out.append(Case(cls, "before_final", _wrap(rng, ANSWER, before=marker), opening, False))
            out.append(Case(cls, "after_final", _wrap(rng, ANSWER, after=" " + marker), opening, False))
            out.append(Case(cls, "swallow", f"{opening}{SECRET} plan <final>{SECRET} draft</final>", opening, False))
            section = f"<think-task>{marker} plan</think-task>\n<final>{ANSWER}</final>"
            out.append(Case(cls, "in_section", section, opening, cls != "exact tag" or name in ("thinking", "think")))
    for _ in range(per_class):
        s = f"{SECRET}{rng.randrange(100)}"
        out.append(Case(STRUCTURAL[0], "swallow", f"<think-task>{s} <final>{s} draft</final>", "<final>", False))
        out.append(Case(STRUCTURAL[0], "in_section", f"<think-task>{s} <fіnal>{s}</fіnal></think-task><final>{ANSWER}"
                        "</final>", "<fіnal>", True))
        out.append(Case(STRUCTURAL[1], "after_final", _wrap(rng, ANSWER, after=f"<final>{s}</final>"), "<final>", False))
        out.append(Case(STRUCTURAL[2], "after_final", _wrap(rng, ANSWER, after=f"\n{s}"), s, False))
        cut = _wrap(rng, f"{ANSWER} <think-task>{s}")
        out.append(Case(STRUCTURAL[3], "inside_final", cut[: rng.randrange(len(cut) - 10, len(cut) - 8)], s, False))
    return out


def leaked(shown: str, case: Case) -> bool:
    """The secret, or the marker as written, reached what a user sees."""
    return SECRET in shown or (bool(case.marker.strip()) and case.marker in shown)
