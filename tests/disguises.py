"""Disguised thinking tags and generations that hide a secret in thinking (tests of the fail-closed reader).

`DISGUISE_CLASSES`: one hand-written example per class of disguise that the review of issue 14 used, plus
more; `disguised_tag(rng, name, closing)`: a random combination of them; `generation(rng)`: a generation
whose thinking (and only its thinking) holds `SECRET`, with thinking tags in random positions and spellings.
"""

from __future__ import annotations

import random

SECRET = "SECRETTHOUGHT"

HYPHENS = "\u2010\u2011\u2012\u2013\u2212\uff0d\ufe63\u2043"
INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e\u034f\u2063\U000e0041"
BRACKETS = [("\uff1c", "\uff1e"), ("\u2039", "\u203a"), ("\u00ab", "\u00bb"), ("\u3008", "\u3009"),
            ("\u27e8", "\u27e9"), ("\ufe64", "\ufe65"), ("\u276e", "\u276f"), ("\u02c2", "\u02c3"), ("<", ">")]
# letter of "think" -> lookalikes: Cyrillic, Greek, Kelvin sign, full-width, mathematical, digit / pipe / l for i
LOOKALIKES = {
    "t": ["\u0442", "\u03c4", "\uff54", "\U0001d42d", "T", "\u0163", "\u0288"],
    "h": ["\u04bb", "\u043d", "\uff48", "\U0001d421", "H", "\u210e", "\u0570"],
    "i": ["\u0456", "\u03b9", "\u0131", "\uff49", "\U0001d422", "I", "1", "l", "|", "\u2170", "\u00ed", "\u04c0"],
    "n": ["\u043f", "\u0578", "\uff4e", "\U0001d427", "N", "\u0144", "\u0272"],
    "k": ["\u212a", "\u03ba", "\u043a", "\uff4b", "\U0001d424", "K", "\u0137"],
}

# One example per class: (class, tag as a model might print it)
DISGUISE_CLASSES = [
    ("attribute", '<think-safety="1">'),
    ("punctuation after the name", "<think!>"),
    ("brackets after the name", "<think-task[1]>"),
    ("space attribute", "<think-task id=1>"),
    ("hyphen U+2010", "<think\u2010task>"),
    ("hyphen U+2011", "<think\u2011task>"),
    ("minus U+2212", "<think\u2212task>"),
    ("full-width hyphen U+FF0D", "<think\uff0dtask>"),
    ("zero-width space", "<th\u200bink-task>"),
    ("zero-width joiner", "<thi\u200dnk-task>"),
    ("soft hyphen", "<thin\u00adk-task>"),
    ("word joiner and BOM", "<\u2060think\ufeff-task>"),
    ("Cyrillic i", "<th\u0456nk-task>"),
    ("Kelvin sign", "<thin\u212a-task>"),
    ("Greek iota and kappa", "<th\u03b9n\u03ba-task>"),
    ("Cyrillic te, shha, pe", "<\u0442\u04bbi\u043fk>"),
    ("dotless i", "<th\u0131nk>"),
    ("combining accent", "<thi\u0301nk-task>"),
    ("full-width letters", "<\uff54\uff48\uff49\uff4e\uff4b>"),
    ("mathematical letters", "<\U0001d42d\U0001d421\U0001d422\U0001d427\U0001d424>"),
    ("full-width brackets", "\uff1cthink-task\uff1e"),
    ("angle quotes", "\u2039think-task\u203a"),
    ("guillemets", "\u00abthink-task\u00bb"),
    ("CJK angle brackets", "\u3008think-task\u3009"),
    ("small form brackets", "\ufe64think-task\ufe65"),
    ("upper case", "<THINK-TASK>"),
    ("spaces", "< think-task >"),
    ("spaced letters", "<t h i n k>"),
    ("dashed letters", "<t-h-i-n-k>"),
    ("digit for i", "<th1nk>"),
    ("pipe for i", "<TH|NK>"),
    ("other think word", "<thinking>"),
    ("underscore", "<think_task>"),
    ("special-token form", "<|think|>"),
    ("no closing bracket", "<think-task "),
    ("quote before the name", '<"think">'),
]


def disguise_name(rng: random.Random, name: str) -> str:
    """`name` with some letters of its `think` swapped for lookalikes, invisible characters and hyphen lookalikes."""
    out = []
    for ch in name:
        if ch in LOOKALIKES and rng.random() < 0.3:
            ch = rng.choice(LOOKALIKES[ch])
        elif ch == "-" and rng.random() < 0.5:
            ch = rng.choice(HYPHENS)
        elif rng.random() < 0.2:
            ch = ch.upper()
        out.append(ch)
        if rng.random() < 0.15:
            out.append(rng.choice(INVISIBLE))
    return "".join(out)


def disguised_tag(rng: random.Random, name: str = "think-task", closing: bool = False) -> str:
    """A random spelling of `<name>` / `</name>` that a reader still reads as that tag."""
    lt, gt = rng.choice(BRACKETS) if rng.random() < 0.5 else ("<", ">")
    junk = rng.choice(["", "", "", '="1"', "!", "[1]", " id=2", " /", "?", ":x", " data-x='y'"])
    space = rng.choice(["", "", " ", "\t", "\u3000"])
    slash = rng.choice(["/", "\u2044", "\uff0f", "\u2215"]) if closing else ""
    tail = "" if rng.random() < 0.05 else gt  # an unterminated tag now and then
    return f"{lt}{space}{slash}{space}{disguise_name(rng, name)}{junk}{space}{tail}"


def thinking_block(rng: random.Random, closed: bool = True) -> str:
    name = rng.choice(["think-task", "think-safety", "think-policy", "think", "thinking", "think-x"])
    body = f" {SECRET}{rng.randrange(10**6)} "
    return disguised_tag(rng, name) + body + (disguised_tag(rng, name, closing=True) if closed else "")


def generation(rng: random.Random) -> tuple[str, bool]:
    """(text, whether its final holds no thinking): thinking blocks in random places, finals with an answer."""
    clean = True
    parts: list[str] = []
    if rng.random() < 0.7:
        parts.append(thinking_block(rng, closed=rng.random() < 0.9))
    parts.append(rng.choice(["<final>", "\n<final>", "< final >", "<FINAL>"]))
    answer = [f"ANSWER{rng.randrange(100)}", "a < b and c > d", "plain words", "List<int>", "2 > 1", "\u7b54\u3048"]
    for _ in range(rng.randrange(1, 5)):
        if rng.random() < 0.25:
            parts.append(thinking_block(rng, closed=rng.random() < 0.7))
            clean = False
        else:
            parts.append(" " + rng.choice(answer))
    if rng.random() < 0.8:
        parts.append("</final>")
    if rng.random() < 0.2:
        parts.append(thinking_block(rng, closed=rng.random() < 0.5))
    return "".join(parts), clean
