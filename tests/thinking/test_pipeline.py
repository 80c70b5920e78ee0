"""The final-only pipeline (`so8t_hf/thinking/pipeline.py`, shipped in every Hub repo) in this process: a string
prompt is one user turn through the chat template and answered as that chat; generation is greedy unless asked
otherwise, so two calls give the same answer. (tests/hub runs the shipped copy in a process without so8t_hf.)"""

import pytest
import torch
from tiny_models import tiny_so8t
from transformers import AutoTokenizer

from so8t_hf.thinking.chat_template import apply_thinking_chat_template
from so8t_hf.thinking.data import tiny_tokenizer_path
from so8t_hf.thinking.pipeline import So8tThinkingPipeline

ANSWER = ("<think-task>SECRET plan</think-task>\n<think-safety>ok</think-safety>\n<think-policy>short</think-policy>\n"
          "<final>Four.</final><|end|>")


@pytest.fixture(scope="module")
def tok():
    return apply_thinking_chat_template(AutoTokenizer.from_pretrained(tiny_tokenizer_path()))


@pytest.fixture
def chat(tok):
    model = tiny_so8t(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      max_position_embeddings=512)
    model.generation_config.pad_token_id = tok.pad_token_id
    return So8tThinkingPipeline(model=model, tokenizer=tok)


def fake_generate(tok, seen):
    """A model that writes ANSWER after whatever it is given, recording what it was given."""
    answer_ids = tok.encode(ANSWER, add_special_tokens=False)

    def generate(input_ids=None, **kwargs):
        seen.append((input_ids[0].tolist(), kwargs))
        return torch.cat([input_ids, torch.tensor([answer_ids] * input_ids.shape[0])], dim=1)

    return generate


def test_a_string_prompt_is_one_user_turn(chat, tok):
    seen = []
    chat.model.generate = fake_generate(tok, seen)
    turn = [{"role": "user", "content": "2+2?"}]
    out = chat("2+2?")[0]["generated_text"]
    templated = tok.apply_chat_template(turn, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert seen[0][0] == templated  # the chat template's prompt, not the bare string
    assert out == [*turn, {"role": "assistant", "content": "Four."}] == chat(turn)[0]["generated_text"]
    assert chat("2+2?", return_full_text=False)[0]["generated_text"] == "Four."
    assert chat(["2+2?", "3+3?"], return_full_text=False) == [[{"generated_text": "Four."}]] * 2
    raw = chat("2+2?", return_raw_text=True)[0]["raw_generated_text"]
    assert "SECRET plan" in raw and "SECRET" not in str(chat("2+2?")[0]["generated_text"])
    # a string the template already rendered is continued as text
    rendered = tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    assert chat(rendered, return_full_text=False)[0]["generated_text"] == "Four."
    assert seen[-1][0] == tok(rendered, add_special_tokens=False)["input_ids"]


def test_generation_is_greedy_unless_asked(chat):
    runs = [chat("Tell me a story.", max_new_tokens=24, return_raw_text=True)[0]["raw_generated_text"] for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) > 0  # a random tiny model: sampling would differ run to run
    assert not chat._prepare_generate_kwargs({}).get("do_sample")
    assert chat._prepare_generate_kwargs({})["max_new_tokens"] == 256
    torch.manual_seed(0)
    sampled = {chat("Tell me a story.", max_new_tokens=24, do_sample=True, return_raw_text=True)[0]
               ["raw_generated_text"] for _ in range(3)}
    assert len(sampled) > 1  # asked to sample, it samples
