"""The one generation path (`so8t_hf.inference.generation`): batched greedy generation with left padding gives
the text of one-row-at-a-time generation, stops each row at the stop tokens, and shows a progress bar."""

import pytest
from tiny_models import randomize_rotations, tiny_so8t

from so8t_hf import force_attention_backend
from so8t_hf.inference.generation import generate_replies, generate_reply, prompt_ids, stop_token_ids
from so8t_hf.sft.config import SO8TModelConfig
from so8t_hf.sft.pipeline import build_tokenizer
from so8t_hf.thinking import DEFAULT_TAGS
from so8t_hf.thinking.data import load_thinking_dataset, sample_data_dir
from so8t_hf.training.callbacks import prompt_and_reference


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(SO8TModelConfig(), DEFAULT_TAGS)[0]  # the tiny tokenizer as the recipe completes it


@pytest.fixture(scope="module")
def model(tokenizer):
    # initializer_range 0.2: logits far enough apart that greedy choices are not near-ties (the test compares
    # token choices, not logits); random rotations so the SO(8) path is not the identity
    model = tiny_so8t(seed=0, vocab_size=-(-len(tokenizer) // 64) * 64, initializer_range=0.2,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    model.config._attn_implementation = "so8t"
    randomize_rotations(model)
    return model


@pytest.fixture(scope="module")
def conversations():
    rows = load_thinking_dataset([sample_data_dir()])["messages"]
    return [[{"role": "user", "content": "hi"}]] + [prompt_and_reference(m)[0] for m in rows[:42:6]]


@pytest.mark.parametrize("backend", ["auto", "eager", "chunked"])
def test_batched_greedy_generation_equals_one_row_at_a_time(model, tokenizer, conversations, backend):
    lengths = [len(prompt_ids(tokenizer, c)) for c in conversations]
    assert len(set(lengths)) > 4  # prompts of many lengths: most rows of a batch are left-padded
    with force_attention_backend(backend):
        batched = generate_replies(model, tokenizer, conversations, max_new_tokens=24, batch_size=8)
        single = [generate_reply(model, tokenizer, c, max_new_tokens=24) for c in conversations]
    assert batched == single
    assert [n for _, n, _ in batched] == lengths
    stops = set(stop_token_ids(tokenizer, model))
    generated = [n for _, _, n in batched]
    assert min(generated) < 24 and max(generated) == 24  # a row stopped early while others ran on (padding after it dropped)
    early = batched[generated.index(min(generated))][0]
    assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize(early))[-1] in stops


def test_batch_size_does_not_change_the_text_and_the_bar_counts_rows(model, tokenizer, conversations, capsys):
    by_three = generate_replies(model, tokenizer, conversations, max_new_tokens=12, batch_size=3, progress=True)
    err = capsys.readouterr().err
    assert "Generating" in err and f"{len(conversations)}/{len(conversations)}" in err
    assert by_three == generate_replies(model, tokenizer, conversations, max_new_tokens=12, batch_size=len(conversations))
    generate_replies(model, tokenizer, conversations[:2], max_new_tokens=2)
    assert "Generating" not in capsys.readouterr().err  # no bar unless asked


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-4])
def test_every_tiny_positive_temperature_decodes_greedily(model, tokenizer, temperature):
    """chat, evaluation and serving share one rule: below GREEDY_BELOW is greedy (1e-300 used to overflow)."""
    messages = [{"role": "user", "content": "hi"}]
    greedy = generate_reply(model, tokenizer, messages, max_new_tokens=6)
    assert generate_reply(model, tokenizer, messages, max_new_tokens=6, temperature=temperature) == greedy
