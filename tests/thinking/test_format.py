"""The thinking format: tags, render/parse/validate, extract_final (adversarial), thinking_hash,
tag tokens on the real Phi-3.5 tokenizer, the chat template, and loss labels."""

import hashlib
import random
import re
import time

import pytest
import torch
from paths import PHI35_TOKENIZER
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
)

from so8t_hf.thinking import (
    DEFAULT_TAGS,
    ThinkingFormatError,
    ThinkingTags,
    extract_final,
    find_thinking_problems,
    get_tag_preset,
    parse_thinking,
    render_thinking,
    thinking_hash,
    validate_thinking,
)
from so8t_hf.thinking.chat_template import (
    PHI3_THINKING_CHAT_TEMPLATE,
    add_thinking_tokens,
    apply_thinking_chat_template,
    thinking_labels,
)

SECTIONS = {"task": "Plan the reply.", "safety": "Nothing unsafe.", "policy": "Answer briefly."}
THINKING = (
    "<think-task>Plan the reply.</think-task>\n<think-safety>Nothing unsafe.</think-safety>\n"
    "<think-policy>Answer briefly.</think-policy>"
)
GOOD = THINKING + "\n<final>Hello there.</final>"


@pytest.fixture
def phi35():
    if not (PHI35_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"real Phi-3.5 tokenizer fixture not found at {PHI35_TOKENIZER} (set SO8T_PHI35_TOKENIZER)")
    return AutoTokenizer.from_pretrained(PHI35_TOKENIZER)


def tiny_phi3(vocab_size: int) -> Phi3ForCausalLM:
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=32000)
    return Phi3ForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------------- tags


def test_presets_and_tag_strings():
    assert DEFAULT_TAGS.keys == ("task", "safety", "policy")
    assert DEFAULT_TAGS.tokens == ("<think-task>", "</think-task>", "<think-safety>", "</think-safety>",
                                   "<think-policy>", "</think-policy>", "<final>", "</final>")
    r4 = get_tag_preset("reasoning4")
    assert r4.sections == ("think-logic", "think-ethics", "think-practical", "think-creative")
    assert r4.keys == ("logic", "ethics", "practical", "creative") and r4.final == "final"
    assert get_tag_preset("default") is DEFAULT_TAGS
    with pytest.raises(ValueError, match="unknown tag preset 'nope'"):
        get_tag_preset("nope")


@pytest.mark.parametrize("sections, final, word", [
    (("Think-Task",), "final", "invalid tag name"), (("think task",), "final", "invalid tag name"),
    (("think-a", "think-a"), "final", "duplicate"), (("think-a", "a"), "final", "duplicate"),
    (("think-a",), "think-final", "must not start with 'think'"), ((), "final", "at least one"),
])
def test_custom_tags_are_validated(sections, final, word):
    with pytest.raises(ValueError, match=word):
        ThinkingTags(sections, final)


# ------------------------------------------------------------------- render / parse / validate


def test_render_exact_and_round_trip():
    assert render_thinking({k: f"  {v}\n" for k, v in SECTIONS.items()}, " Hello there. ") == GOOD
    assert parse_thinking(GOOD) == (SECTIONS, "Hello there.")
    assert find_thinking_problems(GOOD) == []
    validate_thinking(GOOD, row=1)
    r4 = get_tag_preset("reasoning4")
    secs = {"logic": "a\nb", "ethics": "c", "practical": "d", "creative": "e"}
    assert parse_thinking(render_thinking(secs, "答えは42です。", r4), r4) == (secs, "答えは42です。")
    custom = ThinkingTags(("reason",), "answer")
    assert render_thinking({"reason": "r"}, "x", custom) == "<reason>r</reason>\n<answer>x</answer>"


def test_parse_tolerates_whitespace_between_blocks_only():
    spaced = "\n  " + GOOD.replace("\n", "\n\n  ") + "\n"
    assert parse_thinking(spaced) == (SECTIONS, "Hello there.")


@pytest.mark.parametrize("sections, final, message", [
    ({"task": "a", "safety": "b"}, "x", "missing ['policy']"),
    ({**SECTIONS, "mood": "m"}, "x", "unknown ['mood']"),
    (SECTIONS, "   ", "empty final"),
    ({**SECTIONS, "task": "a</think-task><think-task>b"}, "x", "duplicate <think-task>"),
    (SECTIONS, "see <|end|>", "special token"),
])
def test_render_rejects_bad_input(sections, final, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        render_thinking(sections, final)


BAD = [
    (GOOD.replace("</think-safety>", ""), "unclosed tag <think-safety>"),
    (GOOD.replace("Plan the reply.", "Plan <think-safety>x</think-safety>"),
     "nested tag <think-safety> inside <think-task>"),
    (GOOD.replace("<think-task>Plan the reply.</think-task>\n", "") + "\n<think-task>t</think-task>",
     "out-of-order <think-task> after <final>"),
    (GOOD.replace("think-policy", "think-mood"), "unknown tag '<think-mood>'"),
    (THINKING + "\n<think-policy>again</think-policy>\n<final>x</final>", "duplicate <think-policy>"),
    (THINKING, "missing <final>"),
    (GOOD.replace("\n<final>", "\nso: <final>"), "text outside tags: 'so:'"),
    (GOOD + " trailing", "text outside tags: 'trailing'"),
    (THINKING + "\n<final> \n </final>", "empty final"),
    (GOOD.replace("<think-task>", "<THINK-TASK>"), "malformed tag '<THINK-TASK>' (write '<think-task>')"),
    (GOOD.replace("</final>", "</final ><|end|>"), "special token '<|end|>'"),
    (GOOD.replace("<think-safety>Nothing unsafe.</think-safety>\n", ""), "missing section <think-safety>"),
    ("</think-task>" + GOOD, "closing tag </think-task> without an opening tag"),
]


@pytest.mark.parametrize("text, problem", BAD)
def test_each_validation_error_names_row_and_problem(text, problem):
    with pytest.raises(ThinkingFormatError) as err:
        validate_thinking(text, row=12)
    assert str(err.value).startswith("row 12: ") and problem in str(err.value)
    assert err.value.row == 12 and any(problem in p for p in err.value.problems)
    with pytest.raises(ThinkingFormatError, match=r"^data\.jsonl:7: "):
        parse_thinking(text, row="data.jsonl:7")


def test_problem_list_reports_everything():
    text = "hi <think-safety>s</think-safety><think-task>t<final>f</final>"
    assert find_thinking_problems(text) == [
        "text outside tags: 'hi'", "nested tag <final> inside <think-task>", "unclosed tag <think-task>",
        "missing section <think-policy>",
    ]


# ----------------------------------------------------------------------------- extract_final

ADVERSARIAL = [
    (GOOD, "Hello there."),
    ("no tags at all, just an answer", ""),
    (THINKING, ""),
    ("<think-task>S never closed <final>fake</final>", ""),
    ("<final>A <think-task>S never closed", ""),  # unterminated thinking: withheld
    ("<final>A <think-safety>S</think-safety>B</final>", ""),  # thinking inside the final: withheld
    ("<final>A <think-task>x<think-task>y</think-task> S</think-task> B</final>", ""),
    ("<think-task>x<think-task>y</think-task> S</think-task><final>A</final>", ""),  # nested: withheld (grammar)
    (THINKING + "\n<final>still going", ""),  # truncated: withheld
    ("<final>first</final><final>second</final>", ""),  # second final
    ("<think-task>S <final>fake</final> S</think-task>\n<final>real</final>", ""),  # final in a section
    ("<THINK-TASK>S</THINK-TASK>< final >ok</ FINAL >", ""),  # tags are exact
    ("< think-task >S</ think-task ><Final>ok</final>", ""),
    ('<think-task id="1">S</think-task><final class="x">ok</final>', ""),
    ("<think-task S <final>fake</final>", ""),
    ("<think>S</think><final>ok</final>", ""),  # not a configured section
    ("<thinking>S</thinking><think-logic>S</think-logic><final>ok</final>", ""),
    ("<think-task/>S<final>fake</final>", ""),
    ("preamble <final>ok</final>", ""),  # text outside the sections
    ("<|assistant|><final><|placeholder1|>ok</final><|end|><|endoftext|>", ""),
    ("<final><|placeholder1|>ok</final><|end|><|endoftext|>", ""),  # a special in the final
    ("\n <final> ok </final>\n<|end|><|endoftext|>", "ok"),
    ("<final>ok<|end|><|user|>next<|assistant|><final>more", ""),  # turn end inside the final
    ("<final>ok<|endoftext|><think-task>S", ""),
    ("<final>ok</final><|endoftext|><think-task>S", ""),  # text after the final's turn end
    ("<|end|><final>late</final>", ""),
    ("<final>ok</s><final>x</final>", ""),
    ("<final>A</fin", ""),  # cut off: withheld
    ("<final>A<|en", ""),
    ("<final>A <thi", ""),
    ("<final>a < b and b > c, List<int> <b>x</b></final>", "a < b and b > c, List<int> <b>x</b>"),
    ("<final>stray </think-task>tags<final> gone</final>", ""),  # a thinking closer in the final
    ("<final>stray <final>tags</ b> gone</final>", ""),
    ("</think-task><final>ok</final>", ""),  # a stray closer: withheld
    ("<final>a <<final>think-task>S</final>", ""),  # dropping <final> would form a thinking tag
    ("<final/>ok", ""),
    ("<think-task>S</think-task><final>答えは<think-policy>S</think-policy>42です。</final>", ""),
    ("<think-task>S</think-task><final>答えは42です。</final>", "答えは42です。"),
    ("<final>ok</final><think-task>S", ""),  # an unterminated thinking section anywhere: withheld
]


@pytest.mark.parametrize("text, expected", ADVERSARIAL)
def test_extract_final_adversarial(text, expected):
    assert extract_final(text) == expected


def test_extract_final_custom_tags():
    tags = ThinkingTags(("reason",), "answer")
    assert extract_final("<reason>S</reason>\n<answer>ok</answer>", tags) == "ok"
    assert extract_final("<reason>S <answer>fake</answer>", tags) == ""
    assert extract_final("<final>not this set's final</final>", tags) == ""
    assert extract_final("<answer>a<think-task>S</think-task>b</answer>", tags) == ""
    assert extract_final("<answer>a <reasoning>S</reasoning></answer>", tags) == ""  # section name as a prefix
    with pytest.raises(ValueError, match="starts with the section name"):
        ThinkingTags(("fin",), "final")


def _adversarial_generation(rng: random.Random) -> str:
    """Random mix of tag fragments, specials and text; secrets only ever inside thinking."""
    openers = ["<think-task>", "<think-safety>", "<think-policy>", "<THINK-TASK>", "< think-safety >",
               "<Think-Policy >", "<think-task id='1'>", "<think-task/>", "<think>", "<thinking>",
               "<think-logic>", "<think-unknown>", "<think-task "]
    closers = ["</think-task>", "</think-safety>", "</ think-policy >", "</THINK-TASK>", "</think>",
               "</think-unknown>", ""]
    finals = ["<final>", "<FINAL>", "< final >", "<final >", "</final>", "</FINAL>", "</ final>", "<final/>"]
    noise = ["<|end|>", "<|endoftext|>", "<|assistant|>", "<|user|>", "<s>", "</s>", "<|placeholder1|>", "<",
             ">", "</fin", "<thi", "\n", " ", "a < b > c", "<b>x</b>", "think about it", "final words"]

    def secret() -> str:
        return f" SECRETTHOUGHT{rng.randrange(10**6)} "

    def thinking(depth: int) -> str:
        s = rng.choice(openers) + rng.choice(["", " ", "\n"]) + secret()
        while rng.random() < 0.6:
            pick = rng.random()
            s += (thinking(depth + 1) if pick < 0.2 and depth < 2 else secret() if pick < 0.5
                  else rng.choice(finals + noise))
        return s + rng.choice(closers)

    parts = []
    for _ in range(rng.randrange(1, 9)):
        pick = rng.random()
        parts.append(thinking(0) if pick < 0.35 else rng.choice(finals) if pick < 0.6
                     else f" ANSWER{rng.randrange(100)} " if pick < 0.8 else rng.choice(noise))
    return "".join(parts)


def test_extract_final_never_leaks_randomized():
    rng = random.Random(20240607)
    answered = 0
    residue = re.compile(r"<\s*/?\s*(think|final\b)|<\s*\|[^<>|]*\|\s*>|SECRETTHOUGHT", re.IGNORECASE)
    for n in range(3000):
        text = _adversarial_generation(rng)
        if n % 4 == 0:  # a grammatical output, noise and secrets inside its sections only: it must be shown
            noise = "".join(rng.choice(["<thi", "</fin", "<final", " SECRETTHOUGHT1 ", "<|placeholder1|>", "<"]) for _ in range(3))
            text = f"<think-task>{noise}</think-task>\n<think-policy>{noise}</think-policy><final> ANSWER{n} </final>"
        out = extract_final(text)
        assert residue.search(out) is None, (text, out)
        answered += "ANSWER" in out
        # the thinking of the same text never changes the answer: drop all secrets, same output
        assert extract_final(re.sub(r"SECRETTHOUGHT\d+", "", text)) == out
    assert answered >= 750  # every grammatical one: the property is not met by returning "" everywhere


def test_lenient_reader_is_linear_on_pathological_text():
    """A server runs this on untrusted generations: no regex backtracking blow-up."""
    texts = ["<" + " " * 50_000 + "x", "< /" * 20_000, "<think" * 20_000, "<final>" + "< " * 50_000, "<|" * 50_000]
    start = time.perf_counter()
    for text in texts:
        extract_final(text), thinking_hash(text), find_thinking_problems(text)
    assert time.perf_counter() - start < 5.0  # ~0.5 s; a quadratic pattern takes minutes


# ----------------------------------------------------------------------------- thinking_hash


def test_thinking_hash_definition_and_stability():
    expected = hashlib.sha256(THINKING.encode()).hexdigest()
    assert thinking_hash(GOOD) == expected
    reformatted = THINKING.replace(">", "> ", 3).replace("\n", "\n\n") + "<final>other answer</final>"
    assert thinking_hash(reformatted) == expected
    assert thinking_hash("<final>no thinking</final>") == thinking_hash("") == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    only_task = hashlib.sha256(b"<think-task>S</think-task>").hexdigest()
    assert thinking_hash("<final>A</final><think-task> S ") == only_task  # unterminated: runs to the end
    assert thinking_hash("<THINK-Task>S</think-task><|end|><think-safety>after the turn") == only_task


@pytest.mark.parametrize("change", [
    lambda t: t.replace("Plan the reply.", "Plan the reply!"),
    lambda t: t.replace("Nothing unsafe.", "Nothing  unsafe."),
    lambda t: t.replace("<think-task>Plan the reply.</think-task>\n", "")
    + "<think-task>Plan the reply.</think-task>",
    lambda t: t.replace("<final>", "<think-task>x</think-task><final>"),
])
def test_thinking_hash_sensitivity(change):
    assert thinking_hash(change(GOOD)) != thinking_hash(GOOD)


# ------------------------------------------------------------------- tokens (real Phi-3.5)


def test_tags_are_single_spare_ids_on_phi35(phi35):
    summary = add_thinking_tokens(phi35)
    assert summary["token_ids"] == {t: 32011 + i for i, t in enumerate(DEFAULT_TAGS.tokens)}
    assert summary["new_ids"] == list(range(32011, 32019)) and summary["resized"] is False
    for tag, tid in summary["token_ids"].items():
        assert phi35.encode(tag, add_special_tokens=False) == [tid]
    ids = phi35.encode(GOOD, add_special_tokens=False)
    assert phi35.decode(ids) == GOOD
    assert phi35.decode(ids, skip_special_tokens=True) == GOOD  # non-special tags: skip_special_tokens keeps them
    assert add_thinking_tokens(phi35)["new_ids"] == []  # idempotent
    r4 = add_thinking_tokens(phi35, tags=get_tag_preset("reasoning4"))
    assert all(32019 <= i < 32064 for t, i in r4["token_ids"].items() if t not in DEFAULT_TAGS.tokens)
    assert len(phi35) == 32027 <= 32064


def test_spare_rows_used_without_resize(phi35):
    model = tiny_phi3(32064)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    summary = add_thinking_tokens(phi35, model)
    assert summary["resized"] is False and summary["num_embeddings"] == 32064
    assert model.config.vocab_size == 32064
    for now, before in ((model.get_input_embeddings().weight, before_in),
                        (model.get_output_embeddings().weight, before_out)):
        new = slice(32011, 32019)
        torch.testing.assert_close(now[new], before[:32011].mean(0).expand(8, -1))
        torch.testing.assert_close(now[:32011], before[:32011], rtol=0, atol=0)
        torch.testing.assert_close(now[32019:], before[32019:], rtol=0, atol=0)
    trained = model.get_input_embeddings().weight.detach().clone()
    add_thinking_tokens(phi35, model)  # second call leaves the rows alone
    torch.testing.assert_close(model.get_input_embeddings().weight, trained, rtol=0, atol=0)


def test_small_vocab_model_is_resized(phi35):
    model = tiny_phi3(32011)
    summary = add_thinking_tokens(phi35, model)
    assert summary["resized"] is True and summary["num_embeddings"] == len(phi35) == 32019
    assert model.get_output_embeddings().weight.shape[0] == 32019
    ids = torch.tensor([phi35.encode(GOOD, add_special_tokens=False)])
    assert model(ids).logits.shape == (1, ids.shape[1], 32019)


# ----------------------------------------------------------------------------- chat template

CONVO = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": GOOD},
    {"role": "user", "content": "And again?"},
    {"role": "assistant", "content": GOOD.replace("Hello there.", "Yes.")},
]


def test_chat_template_renders_phi3_format(phi35):
    apply_thinking_chat_template(phi35)
    assert phi35.chat_template == PHI3_THINKING_CHAT_TEMPLATE
    expected = ("<|system|>\nBe kind.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n" + GOOD + "<|end|>\n"
                "<|user|>\nAnd again?<|end|>\n<|assistant|>\n" + GOOD.replace("Hello there.", "Yes.")
                + "<|end|>\n<|endoftext|>")
    assert phi35.apply_chat_template(CONVO, tokenize=False, keep_earlier_thinking=True) == expected
    # by default the earlier turn is its final text, as training renders it (drop_earlier_thinking)
    earlier = expected.replace(GOOD + "<|end|>\n<|user|>", "Hello there.<|end|>\n<|user|>")
    assert phi35.apply_chat_template(CONVO, tokenize=False) == earlier != expected
    assert phi35.apply_chat_template(CONVO[:2], tokenize=False, add_generation_prompt=True) == (
        "<|system|>\nBe kind.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n")
    original = (PHI35_TOKENIZER / "chat_template.jinja").read_text()
    trained = [*CONVO[:2], {"role": "assistant", "content": "Hello there."}, *CONVO[3:]]  # the history as trained
    for convo, gen in ((trained, False), (trained[:4], True), ([{"role": "system", "content": ""}] + CONVO[1:3], False)):
        assert phi35.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen) == (
            phi35.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen, chat_template=original))
    with pytest.raises(Exception, match="no role tool"):
        phi35.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_assistant_mask_covers_exactly_the_assistant_content(phi35):
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    add_thinking_tokens(phi35)
    apply_thinking_chat_template(phi35)
    out = phi35.apply_chat_template(CONVO, return_dict=True, return_assistant_tokens_mask=True,
                                    keep_earlier_thinking=True)  # both turns whole, as drop_earlier_thinking=False
    ids, mask = out["input_ids"], out["assistant_masks"]
    spans, i = [], 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            spans.append(phi35.decode(ids[i:j]))
            i = j
        i += 1
    assert spans == [m["content"] + "<|end|>" for m in CONVO if m["role"] == "assistant"]
    assert [int(lab != -100) for lab in thinking_labels(ids, phi35)] == mask
    final_only = thinking_labels(ids, phi35, "final_only")
    assert phi35.decode([t for t in final_only if t != -100]) == (
        "<final>Hello there.</final><|end|><final>Yes.</final><|end|>")
    assert is_chat_template_stop_token_trained(phi35)


# ------------------------------------------------------------------------------- loss labels


@pytest.fixture
def word_tokenizer():
    """A whitespace word-level tokenizer with the Phi-3 role tokens (no fixture needed)."""
    specials = ["<unk>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {w: i for i, w in enumerate(specials + "q a t s f x y".split())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", extra_special_tokens=specials[2:])
    add_thinking_tokens(tok)
    return tok


# Packed sequences: a full conversation, one cut inside its answer, one whose 2nd turn has no final.
PACKED = ("<|system|> s <|end|> <|user|> q <|end|> <|assistant|> <think-task> t </think-task> <final> a </final> "
          "<|end|> <|endoftext|> <|user|> q <|end|> <|assistant|> <think-task> t <final> a "
          "<|user|> q <|end|> <|assistant|> <final> x y </final> <|end|> <|user|> q <|end|> <|assistant|> t")
EXPECTED = {
    "assistant": "0 0 0 0 0 0 0 1 1 1 1 1 1 1 0 0 0 0 0 1 1 1 1 0 0 0 0 1 1 1 1 1 0 0 0 0 0",  # last: no tag, context
    "final_only": "0 0 0 0 0 0 0 0 0 0 1 1 1 1 0 0 0 0 0 0 0 1 1 0 0 0 0 1 1 1 1 1 0 0 0 0 0",
    "all": " ".join(["1"] * 37),
}


@pytest.mark.parametrize("mode", ["assistant", "final_only", "all"])
def test_labels_exact_per_mode(word_tokenizer, mode):
    ids = word_tokenizer.encode(PACKED, add_special_tokens=False)
    assert len(ids) == 37 == len(PACKED.split())
    expected = [t if flag == "1" else -100 for t, flag in zip(ids, EXPECTED[mode].split(), strict=True)]
    assert thinking_labels(ids, word_tokenizer, mode) == expected
    batch = torch.tensor([ids, ids[::-1]])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    labels = thinking_labels(batch, word_tokenizer, mode, attention_mask=mask)
    assert labels.dtype == torch.long and labels.shape == batch.shape
    assert labels[0].tolist() == [-100] * 3 + expected[3:]
    assert labels[1].tolist() == thinking_labels(ids[::-1], word_tokenizer, mode)


def test_labels_reject_unknown_mode_and_missing_tags(word_tokenizer):
    with pytest.raises(ValueError, match="unknown loss mode 'thinking'"):
        thinking_labels([1, 2], word_tokenizer, "thinking")
    with pytest.raises(ValueError, match="'<answer>' is not a single token"):
        thinking_labels([1, 2], word_tokenizer, tags=ThinkingTags(("reason",), "answer"))
