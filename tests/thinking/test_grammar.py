"""The positive grammar (`thinking.grammar`): every reason code, the token-id front end on the real Phi-3.5
tokenizer (a tag is its id, never a spelling), the screen of the final's text, and its cost on long outputs."""

import time

import pytest
from paths import PHI35_TOKENIZER
from transformers import AutoTokenizer

from so8t_hf.thinking import DEFAULT_TAGS, TAG_PRESETS, read_final
from so8t_hf.thinking.chat_template import add_thinking_tokens
from so8t_hf.thinking.grammar import REASONS, IdReader, IdTable, read_ids, read_text
from so8t_hf.thinking.screen import find_tag_like

S = "<think-task>plan</think-task>\n<think-policy>short</think-policy>\n"

CASES = [  # (text, status, reason)
    (S + "<final>Hello.</final>", "final", ""),
    ("\n <final>Hello.</final>\n<|end|><|endoftext|>", "final", ""),  # sections may be left out
    (S + "<final>Hello.</final><|end|>\n", "final", ""),
    ("so: " + S + "<final>x</final>", "withheld", "text_outside_sections"),
    (S + "<think-task>again</think-task><final>x</final>", "withheld", "section_order"),
    ("<think-policy>p</think-policy><think-task>t</think-task><final>x</final>", "withheld", "section_order"),
    ("</think-task><final>x</final>", "withheld", "stray_closing_tag"),
    ("<think-task>a<think-safety>b</think-safety></think-task><final>x</final>", "withheld", "nested_tag"),
    ("<think-task>draft <final>x</final></think-task><final>x</final>", "withheld", "final_in_section"),
    ("<think-task>never closed <final>x</final>", "withheld", "final_in_section"),
    ("<think-task>never closed", "withheld", "unclosed_section"),
    ("<think-task>ended<|end|>", "withheld", "unclosed_section"),
    (S, "withheld", "missing_final"),
    (S + "<final>cut off", "withheld", "truncated"),
    (S + "<final>ended<|end|>", "withheld", "unclosed_final"),
    (S + "<final>a <think-task>b</think-task></final>", "withheld", "tag_in_final"),
    (S + "<final>a [think]b[/think]</final>", "withheld", "tag_in_final"),
    (S + "<final>a <|placeholder1|></final>", "withheld", "special_in_final"),
    (S + "<final>a</final><final>b</final>", "withheld", "second_final"),
    (S + "<final>a</final> and more", "withheld", "text_after_final"),
    (S + "<final>a</final><|end|>more", "withheld", "text_after_final"),
    (S + "<final>  </final>", "no_final", "empty_final"),
]


@pytest.fixture(scope="module")
def phi35():
    if not (PHI35_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"real Phi-3.5 tokenizer fixture not found at {PHI35_TOKENIZER}")
    tok = AutoTokenizer.from_pretrained(PHI35_TOKENIZER)
    add_thinking_tokens(tok)
    return tok


def test_every_reason_code_is_documented_and_reached():
    assert {r for _, _, r in CASES} - {""} == set(REASONS)
    for text, status, reason in CASES:
        reading = read_final(text)
        assert (reading.status, reading.reason) == (status, reason), (text, reading)
        assert (reading.final != "") == (status == "final")


@pytest.mark.parametrize("text, status, reason", CASES)
def test_token_ids_read_like_the_text_when_tags_are_tokens(phi35, text, status, reason):
    table = IdTable.of(phi35, DEFAULT_TAGS)
    ids = phi35.encode(text, add_special_tokens=False)
    assert [t for t in ids if t in table.tag_of] and table.tag_of  # the tags are single ids
    reading = read_ids(ids, table)
    assert (reading.status, reading.reason) == (status, reason), (text, reading)
    assert reading.final == read_text(text, DEFAULT_TAGS).final


def test_a_tag_is_its_id_never_a_spelling(phi35):
    table = IdTable.of(phi35, DEFAULT_TAGS)
    tag = {v: k for k, v in phi35.get_vocab().items()}
    spelled = phi35.convert_tokens_to_ids(["<", "/", "th", "ink", "-", "task", ">"])  # ordinary pieces
    assert all(0 < i < 32000 for i in spelled)
    ids = [phi35.convert_tokens_to_ids("<think-task>"), *phi35.encode("SECRET", add_special_tokens=False), *spelled,
           phi35.convert_tokens_to_ids("<final>"), *phi35.encode("ok", add_special_tokens=False),
           phi35.convert_tokens_to_ids("</final>")]
    text = phi35.decode(ids)
    assert "</think-task><final>" in text and read_text(text, DEFAULT_TAGS).final == "ok"  # text: a valid shape
    reading = read_ids(ids, table)
    assert (reading.status, reading.reason) == ("withheld", "final_in_section")  # ids: the section never closed
    # a final spelled in pieces is text: outside the sections it is text_outside_sections
    pieces = phi35.convert_tokens_to_ids(["<", "final", ">"]) + phi35.encode("SECRET", add_special_tokens=False)
    assert read_ids(pieces, table).reason == "text_outside_sections" and tag[ids[0]] == "<think-task>"


def test_a_tokenizer_without_tag_tokens_is_refused_with_the_fix():
    tok = AutoTokenizer.from_pretrained(PHI35_TOKENIZER) if (PHI35_TOKENIZER / "tokenizer.json").is_file() else None
    if tok is None:
        pytest.skip("no Phi-3.5 tokenizer fixture")
    with pytest.raises(ValueError, match="add_thinking_tokens"):
        IdTable.of(tok, DEFAULT_TAGS)


def test_custom_tag_sets_follow_the_configured_order():
    r4 = TAG_PRESETS["reasoning4"]
    good = "<think-logic>a</think-logic><think-creative>b</think-creative><final>ok</final>"
    assert read_text(good, r4).final == "ok"
    assert read_text(good.replace("logic", "x-logic"), r4).reason == "text_outside_sections"
    assert read_text("<think-creative>b</think-creative><think-logic>a</think-logic><final>ok</final>",
                     r4).reason == "section_order"
    assert read_text("<think-logic>a</think-logic><final>see [think-ethics]</final>", r4).reason == "tag_in_final"


@pytest.mark.parametrize("final, hit", [
    ("a < b and c > d, List<int> <b>x</b> if x <= 3", False), ("I think so (3 < 4).", False),
    ("答えは42です。「はい」", False), ("(I think) that's fine", False), ("Привет (мир)", False),
    ("x &lt;think&gt; y", True), ("&amp;lt;think&amp;gt;", True), ("&#60;final&#62;", True),
    ("[think]", True), ("{think-task}", True), ("(think twice)", True), ("\u2264think>", True),
    ("<\u1d1b\u029c\u026a\u0274\u1d0b>", True), ("<th\u00a1nk>", True), ("<thin\u049b>", True),
    ("<\u04adhink>", True), ("<t\u04a3ink>", True), ("<thin\u0138>", True), ("<thi\u03b7k>", True),
    ("<\U0001f183\U0001f177\U0001f178\U0001f17d\U0001f17a>", True), ("\u00abfinal\u00bb", True),
    ("think-task>", True), ("<|end|>", True),
])
def test_the_screen_reads_tags_the_way_a_reader_does(final, hit):
    assert (find_tag_like(final, DEFAULT_TAGS) is not None) == hit, final


def test_the_cost_is_linear_on_a_4k_token_output(phi35):
    """Per token the engine feeds one id (O(1)); the final is decoded and screened once at the end."""
    table = IdTable.of(phi35, DEFAULT_TAGS)
    body = phi35.encode("word " * 2000, add_special_tokens=False)
    ids = [phi35.convert_tokens_to_ids("<think-task>"), *body, phi35.convert_tokens_to_ids("</think-task>"),
           phi35.convert_tokens_to_ids("<final>"), *body, phi35.convert_tokens_to_ids("</final>")]
    assert len(ids) >= 4000
    t0 = time.perf_counter()
    reader = IdReader(table)
    for tid in ids:
        reader.feed(tid)
    per_token = (time.perf_counter() - t0) / len(ids)
    t1 = time.perf_counter()
    reading = reader.reading()
    at_end = time.perf_counter() - t1
    print(f"\n{len(ids)} tokens: {per_token * 1e6:.2f} us per token fed, {at_end * 1e3:.1f} ms to decode + screen")
    assert reading.status == "final" and per_token < 1e-4 and at_end < 2.0
