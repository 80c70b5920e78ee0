"""The one lexer and the fail-closed reader: every class of disguised thinking tag, a generator of variants, and
property tests (random markers in random positions and spellings never reach a final or a stream)."""

import hashlib
import hmac
import random
import re

import pytest
from disguises import DISGUISE_CLASSES, SECRET, disguised_tag, generation

from so8t_hf.thinking import (
    DEFAULT_TAGS,
    TAG_PRESETS,
    extract_final,
    find_thinking_problems,
    read_final,
    thinking_hash,
    visible_final_prefix,
)
from so8t_hf.thinking.lexer import ROLE_TOKENS, TURN_END_TOKENS, find_specials, find_tags, fold, lex, until_turn_end

GOOD = ("<think-task>Plan.</think-task>\n<think-safety>Fine.</think-safety>\n<think-policy>Short.</think-policy>\n"
        "<final>Hello there.</final>")


def test_folding_maps_lookalikes_and_drops_invisible_characters():
    f = fold("A\u200b\uff1cth\u0456n\u212a\u2011x\u203a")
    assert f.text == "a<think-x>" and f.size == 11
    assert [f.start(i) for i in range(len(f.text))] == [0, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert f.end(2) == 3 and f.end(len(f.text)) == 11 and f.start(len(f.text)) == 11
    assert fold("plain ascii").origin is None and fold("答え").text == "答え"
    assert fold("\ufb01nal").text == "final"  # a ligature expands: the map still points back
    assert fold("\ufb01nal").start(1) == 0 and fold("\ufb01nal").end(2) == 1


@pytest.mark.parametrize("cls, tag", DISGUISE_CLASSES, ids=[c for c, _ in DISGUISE_CLASSES])
def test_every_disguise_class_is_a_thinking_tag_and_withholds_the_final(cls, tag):
    toks = lex(f"{tag}x", DEFAULT_TAGS)
    assert toks[0].kind == "tag" and toks[0].thinking, toks
    inside = f"<final>The answer {tag}{SECRET} is 42</final>"
    reading = read_final(inside)
    assert reading.final == "" and reading.status == "withheld" and SECRET not in reading.final
    before = f"{tag}{SECRET}</think-task><final>ok</final>"  # a disguised tag outside the sections: withheld
    assert read_final(before).reason == "text_outside_sections" and extract_final(before) == ""
    swallowing = f"{tag}{SECRET}<final>fake</final>"  # never closed: everything after it is thinking
    assert extract_final(swallowing) == ""
    assert find_thinking_problems(GOOD.replace("<think-task>", tag, 1))  # training data: reported, never accepted


@pytest.mark.parametrize("text, status, reason", [
    (GOOD, "final", ""),
    ("<final>A</final><think-task>S", "withheld", "text_after_final"),
    ("<final>A <think-task>S", "withheld", "tag_in_final"),
    ("<final>A <think-x>S</think-x> B</final>", "withheld", "tag_in_final"),
    ("<final>a <<final>think-task>S</final>", "withheld", "tag_in_final"),
    ("<think-task>S", "withheld", "unclosed_section"),
    ("<final> </final>", "no_final", "empty_final"),
    ("just text", "withheld", "text_outside_sections"),
    ("", "withheld", "missing_final"),
])
def test_read_final_says_why(text, status, reason):
    reading = read_final(text)
    assert (reading.status, reading.reason) == (status, reason)
    assert reading.final == (extract_final(text)) and (reading.final == "") == (status != "final")


def test_turn_end_and_role_tokens_are_defined_once_and_lexed_as_specials():
    assert TURN_END_TOKENS == ("<|end|>", "<|endoftext|>", "<|user|>", "<|system|>", "</s>")
    assert ROLE_TOKENS == ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    for token in TURN_END_TOKENS:
        assert until_turn_end(f"a{token}b", DEFAULT_TAGS) == "a"
    assert until_turn_end("a<|assistant|>b", DEFAULT_TAGS) == "a<|assistant|>b"
    assert until_turn_end("a\uff1c|end|\uff1eb", DEFAULT_TAGS) == "a"  # a lookalike ends it too (less shown)
    assert find_specials("x <|user|> y < | end | > </s>", DEFAULT_TAGS) == ["<|user|>", "< | end | >", "</s>"]
    assert find_tags("a <final> b \u2039think\u203a c <b>", DEFAULT_TAGS) == ["<final>", "\u2039think\u203a"]


def test_plain_text_with_angle_brackets_is_not_a_tag():
    text = "<final>a < b and b > c, List<int> <b>x</b> x<thanks> if x <= 3: <tin></final>"
    assert extract_final(text) == "a < b and b > c, List<int> <b>x</b> x<thanks> if x <= 3: <tin>"


def test_the_cost_of_failing_closed_is_documented_behaviour():
    """A final that talks about the tags, or `<` followed by a word starting with `think`, is withheld."""
    assert extract_final("<final>Wrap your notes in <think-task> tags.</final>") == ""
    assert extract_final("<final>if t < thinking_time: stop</final>") == ""
    assert extract_final("<final>I think so, 3 < 4.</final>") == "I think so, 3 < 4."


def _check_stream(text: str, tags=DEFAULT_TAGS) -> None:
    """Every prefix shows nothing until the output is over (a turn end after the final); what is shown then is
    the final of the whole text, and nothing is ever shown of a withheld one."""
    full = read_final(text + "<|end|>", tags)
    for i in range(len(text) + 1):
        visible = visible_final_prefix(text[:i], tags)
        assert SECRET not in visible and not any(t.thinking for t in lex(visible, tags)), (text, i, visible)
        assert visible == "", (text, i, visible)  # no turn end yet: anything may still come
    assert visible_final_prefix(text + "<|end|>", tags) == full.final
    assert visible_final_prefix(text, tags, complete=True) == read_final(text, tags).final


def test_generated_variants_never_leak_on_extraction_or_stream():
    rng = random.Random(14)
    counts = {"final": 0, "withheld": 0, "no_final": 0}
    for n in range(1500):
        text, clean = generation(rng)
        reading = read_final(text)
        counts[reading.status] += 1
        assert SECRET not in reading.final, (text, reading)
        assert not any(t.thinking for t in lex(reading.final, DEFAULT_TAGS)), (text, reading)
        if not clean:
            assert reading.status != "final", (text, reading)
        if n < 150:
            _check_stream(text)
    assert counts["final"] > 50 and counts["withheld"] > 300, counts  # 77 grammatical ones shown: not "" everywhere


def test_random_markers_in_random_positions_and_encodings_never_reach_the_final():
    """Property: a disguised thinking marker inserted anywhere into a well-formed answer either sits in
    thinking before the final (hidden), or makes the final withheld; the secret after it never shows."""
    rng = random.Random(1414)
    for _ in range(2000):
        tags = rng.choice([DEFAULT_TAGS, TAG_PRESETS["reasoning4"]])
        base = f"<{tags.sections[0]}>plan</{tags.sections[0]}><final>The answer is forty-two.</final>"
        name = rng.choice([*tags.sections, "think", "thinking"])
        marker = disguised_tag(rng, name, closing=rng.random() < 0.3) + SECRET
        pos = rng.randrange(len(base) + 1)
        text = base[:pos] + marker + base[pos:]
        reading = read_final(text, tags)
        assert SECRET not in reading.final and SECRET not in visible_final_prefix(text, tags), (text, reading)
        final_start, final_end = base.index("<final>") + len("<final>"), base.index("</final>")
        if final_start <= pos <= final_end:
            assert reading.status == "withheld", (text, reading)


def test_stream_hold_back_on_the_disguise_classes():
    for _, tag in DISGUISE_CLASSES:
        _check_stream(f"<think-task>p</think-task><final>The answer {tag}{SECRET} is 42</final>")
        _check_stream(f"{tag}{SECRET}</think-task><final>ok \u2039 fine</final>")


def test_keyed_thinking_digest():
    key = b"server secret"
    canonical = b"<think-task>Plan.</think-task>\n<think-safety>Fine.</think-safety>\n<think-policy>Short.</think-policy>"
    assert thinking_hash(GOOD, key=key) == hmac.new(key, canonical, hashlib.sha256).hexdigest()
    assert thinking_hash(GOOD) == hashlib.sha256(canonical).hexdigest() != thinking_hash(GOOD, key=key)
    verdicts = ["safe", "unsafe", "refuse", "escalate"]  # a low-entropy verdict: guessable without the key only
    target = thinking_hash("<think-safety>unsafe</think-safety><final>x</final>", key=key)
    guesses = [v for v in verdicts if thinking_hash(f"<think-safety>{v}</think-safety>") == target]
    assert guesses == []


def test_the_lexer_is_the_only_tag_grammar():
    """format, validation, metrics and serve hold no tag or special-token regex of their own."""
    from paths import REPO

    for rel in ["so8t_hf/thinking/format.py", "so8t_hf/thinking/validation.py", "so8t_hf/thinking/metrics/scoring.py",
                *[str(p.relative_to(REPO)) for p in (REPO / "so8t_hf/serve").glob("*.py")]]:
        source = (REPO / rel).read_text()
        assert not re.search(r"think\[|<\\\|s\*|<\\\|\[|\(\?:end\|endoftext", source), rel
        assert '"<|end|>"' not in source and "'<|end|>'" not in source, rel
