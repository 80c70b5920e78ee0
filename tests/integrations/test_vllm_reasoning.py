"""The vLLM reasoning parser's logic (`So8tReasoning`) without vLLM: clean, disguised and truncated outputs, in
one piece and as streaming deltas of real Phi-3.5 token ids; content is the clean final or nothing, never a
thinking marker."""

import random

import pytest
from paths import PHI35_TOKENIZER
from transformers import AutoTokenizer

from so8t_hf.integrations import vllm_reasoning
from so8t_hf.integrations.vllm_reasoning import So8tReasoning
from so8t_hf.thinking.chat_template import add_thinking_tokens

SECRET = "SECRETVLLM"
SECTIONS = f"<think-task>{SECRET} plan</think-task>\n<think-safety>fine</think-safety>\n"
OUTPUTS = {  # text -> the content vLLM may show
    SECTIONS + "<final>Four.</final>": "Four.",
    SECTIONS + f"<final>Four. [think]{SECRET}[/think]</final>": None,
    SECTIONS + f"<final>Four. &lt;think&gt;{SECRET}</final>": None,
    SECTIONS + f"<final>Four. <th\u0456nk>{SECRET}</final>": None,
    f"<think-task>{SECRET} <final>draft {SECRET}</final>": None,  # a draft final inside an open section
    f"<th\u0456nk-task>{SECRET}</think-task><final>Four.</final>": None,  # a disguised opener outside
    SECTIONS + "<final>Four, and then": None,  # truncated
    SECTIONS + f"<final>Four.</final> {SECRET}": None,  # text after the final
}


@pytest.fixture(scope="module")
def parser():
    if not (PHI35_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("no Phi-3.5 tokenizer fixture")
    tok = AutoTokenizer.from_pretrained(PHI35_TOKENIZER)
    add_thinking_tokens(tok)
    return tok, So8tReasoning(tok)


@pytest.mark.parametrize("text, content", list(OUTPUTS.items()))
def test_non_streaming_content_is_the_clean_final_or_none(parser, text, content):
    tok, p = parser
    reasoning, got = p.extract(text)
    assert got == content
    if content is not None:
        assert SECRET in reasoning and "<final>" not in reasoning and content not in reasoning
    else:
        assert reasoning == text  # withheld: the whole output is reasoning, nothing is content


@pytest.mark.parametrize("text, content", list(OUTPUTS.items()))
def test_streaming_deltas_give_the_same_content_at_the_end_only(parser, text, content):
    tok, p = parser
    end = tok.convert_tokens_to_ids("<|end|>")
    ids = tok.encode(text, add_special_tokens=False) + [end]
    rng = random.Random(len(text))
    for _ in range(5):  # random chunkings of the deltas
        cuts = sorted(rng.sample(range(1, len(ids)), 4))
        prev, contents = [], []
        for a, b in zip([0, *cuts], [*cuts, len(ids)]):
            delta = ids[a:b]
            out = p.stream(tok.decode(prev), tok.decode(prev + delta), tok.decode(delta), prev, prev + delta, delta)
            if out is not None and out[1] is not None:
                assert b == len(ids), "content before the turn end"
                contents.append(out[1])
            prev = prev + delta
        assert contents == ([content] if content else [])
        for c in contents:
            assert SECRET not in c and "<" not in c
    assert p.is_reasoning_end(ids) == (tok.convert_tokens_to_ids("<final>") in ids)
    content_ids = p.extract_content_ids(ids)
    assert (tok.decode(content_ids).strip() if content_ids else None) == content


def test_the_vllm_class_is_only_defined_with_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert vllm_reasoning.ReasoningParser is None and not hasattr(vllm_reasoning, "So8tReasoningParser")
    else:  # pragma: no cover - an environment with vLLM
        from vllm.reasoning import ReasoningParserManager

        assert ReasoningParserManager.get_reasoning_parser("so8t") is vllm_reasoning.So8tReasoningParser
