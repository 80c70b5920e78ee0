"""The exported GGUF file on a real engine, where `llama-cpp-python` is installed (not in CI: it builds llama.cpp
from source; run on the device machine): llama.cpp tokenizes the chat prompt and the thinking tags as HF does,
prints the tags as text (a raw chat shows the thinking) and not `<|end|>`, gives HF's logits and greedy tokens,
and the final-only wrapper shows what `read_final` reads; `llama-quantize` (where on PATH) makes a Q4_K_M
file that loads."""

import itertools
import shutil

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from so8t_hf.cli import main  # noqa: E402
from so8t_hf.integrations.llama_cpp import FinalOnlyLlama  # noqa: E402
from so8t_hf.thinking.format import DEFAULT_TAGS, read_final  # noqa: E402

# LongRoPE: llama.cpp takes the long factors when its context (padded to 256) exceeds the original 64 positions,
# HF when the sequence does; a prompt of more than 64 tokens gets the long factors in both
N_CTX = 256


def load(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, logits_all=True, verbose=False, n_threads=4, seed=0)


@pytest.fixture(scope="module")
def engine(tiny_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "tiny-f16.gguf"
    assert main(["export", str(tiny_run.out), "--format", "gguf", "--out", str(path)]) == 0
    return load(path)


def chat_prompt(tokenizer, content):
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return text, tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def prompt(tiny_run):
    return chat_prompt(tiny_run.tokenizer, "What is 2+2?")


@pytest.fixture(scope="module")
def long_prompt(tiny_run):
    text, ids = chat_prompt(tiny_run.tokenizer, "What is 2+2? " * 12)
    assert 64 < len(ids) <= N_CTX - 16
    return text, ids


def test_llama_cpp_tokenizes_like_hf_and_prints_the_tags(engine, tiny_run, prompt):
    text, ids = prompt
    assert engine.tokenize(text.encode(), add_bos=False, special=True) == ids
    tok = tiny_run.tokenizer
    sample = "<think-task>plan</think-task><final>four</final>"
    assert engine.tokenize(sample.encode(), add_bos=False, special=False) == tok.encode(sample, add_special_tokens=False)
    # llama.cpp right-strips whitespace after every added token of a model named Phi-3 (the role tokens need it,
    # as HF's have rstrip=True), the tags too (HF's do not): only prompts holding tag text differ
    spaced = "</think-task>\n<final>"
    assert engine.tokenize(spaced.encode(), add_bos=False, special=False) == tok.encode("</think-task><final>", add_special_tokens=False)
    for tag in DEFAULT_TAGS.tokens:  # single tokens, printed as text: a raw chat shows the thinking
        (tid,) = tok.encode(tag, add_special_tokens=False)
        assert engine.detokenize([tid]) == tag.encode()
    end = tok.convert_tokens_to_ids("<|end|>")
    assert engine.detokenize([end]) == b"" and engine.token_eos() in (tok.eos_token_id, end)


def test_llama_cpp_logits_and_16_greedy_tokens_equal_hf(engine, plain_fp32, long_prompt):
    text, ids = long_prompt
    assert engine.tokenize(text.encode(), add_bos=False, special=True) == ids
    hf = type(plain_fp32)(plain_fp32.config).eval()
    hf.load_state_dict({k: v.half().float() if v.ndim == 2 else v for k, v in plain_fp32.state_dict().items()})
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
        greedy = hf.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(ids):]
    engine.reset()
    engine.eval(ids)
    got = np.asarray(engine.scores[: len(ids)])
    assert np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max(), np.abs(got - ref).max()
    engine.reset()
    tokens = list(itertools.islice(engine.generate(ids, top_k=1, temp=0.0, reset=True), 16))
    assert tokens == greedy.tolist()


def test_final_only_wrapper_on_the_engine(engine, prompt):
    text, _ = prompt
    raw = engine.create_completion(text, max_tokens=16, temperature=0.0)["choices"][0]["text"]
    engine.reset()
    shown = FinalOnlyLlama(engine).create_completion(text, max_tokens=16, temperature=0.0)["choices"][0]
    assert shown["text"] == read_final(raw).final and shown["outcome"] == read_final(raw).status


@pytest.mark.skipif(shutil.which("llama-quantize") is None, reason="llama-quantize is not on PATH")
def test_q4_k_m_through_llama_quantize_loads(tiny_run, tmp_path, prompt):
    out = tmp_path / "tiny-q4_k_m.gguf"
    assert main(["export", str(tiny_run.out), "--format", "gguf", "--quant", "q4_k_m", "--out", str(out)]) == 0
    import gguf

    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert not (tmp_path / "tiny-q4_k_m-f16.gguf").exists()
    model = load(out)
    assert model.tokenize(prompt[0].encode(), add_bos=False, special=True) == prompt[1]
    model.eval(prompt[1])
    assert np.isfinite(np.asarray(model.scores[: len(prompt[1])])).all()


def test_chat_through_the_embedded_template_streams_the_final_only(engine):
    """llama-cpp-python renders the file's chat template (Jinja2, no `{% generation %}`) for a chat."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    assert engine.chat_format == "chat_template.default" and "endgeneration" not in engine.metadata["tokenizer.chat_template"]
    engine.reset()
    raw = engine.create_chat_completion(messages, max_tokens=16, temperature=0.0)["choices"][0]["message"]["content"]
    engine.reset()
    chunks = list(FinalOnlyLlama(engine).create_chat_completion(messages, max_tokens=16, temperature=0.0, stream=True))
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert chunks[-1]["choices"][0]["outcome"] == read_final(raw).status
    assert streamed == read_final(raw).final or read_final(raw).status == "withheld"
