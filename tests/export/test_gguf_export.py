"""`so8t-hf export OUTPUT_DIR --format gguf`: the trained tiny run read back with `gguf.GGUFReader`: architecture
`phi3` and its rope-scaling keys, every tensor name and shape, every weight equal to the merged HF weight (f16
exactly as rounded from fp32; q8_0 within its block scale), the vocabulary (thinking tags single USER_DEFINED
tokens, `<|end|>` the end-of-turn id), the chat template; q4_k_m with and without `llama-quantize`."""

import math
import os
import re
import stat
import sys

import jinja2
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from so8t_hf.cli import main  # noqa: E402
from so8t_hf.thinking.format import DEFAULT_TAGS  # noqa: E402

HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
         "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name):
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER[rest.removesuffix('.weight')]}.weight"


def field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def f16_file(tiny_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    assert main(["export", str(tiny_run.out), "--format", "gguf", "--out", str(path)]) == 0
    return gguf.GGUFReader(path)


def test_architecture_and_rope_scaling_keys(f16_file, tiny_run, plain_fp32):
    config = plain_fp32.config
    assert field(f16_file, "general.architecture") == "phi3"
    assert "phi-3" in field(f16_file, "general.name").lower()  # llama.cpp's rule for the role tokens' right-strip
    assert field(f16_file, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    expect = {"context_length": 256, "rope.scaling.original_context_length": 64, "embedding_length": 64,
              "feed_forward_length": 128, "block_count": 2, "attention.head_count": 4, "attention.head_count_kv": 2,
              "rope.dimension_count": 16, "attention.sliding_window": 0}
    for key, value in expect.items():
        assert field(f16_file, f"phi3.{key}") == value, key
    assert field(f16_file, "phi3.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert field(f16_file, "phi3.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert field(f16_file, "phi3.rope.scaling.attn_factor") == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)))
    tensors = {t.name: t for t in f16_file.tensors}
    for name, key in (("rope_factors_long.weight", "long_factor"), ("rope_factors_short.weight", "short_factor")):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(tensors[name].data, np.asarray(config.rope_parameters[key], dtype=np.float32))


def test_every_weight_is_the_merged_hf_weight_in_f16(f16_file, plain_fp32):
    state = plain_fp32.state_dict()
    tensors = {t.name: t for t in f16_file.tensors}
    assert set(tensors) == {gguf_name(k) for k in state} | {"rope_factors_long.weight", "rope_factors_short.weight"}
    for hf_name, weight in state.items():
        t = tensors[gguf_name(hf_name)]
        w = weight.float().numpy()
        assert list(t.shape) == list(reversed(w.shape)), hf_name  # GGUF lists dims innermost first
        if w.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(t.data, w)
        else:  # fused qkv and gate_up as in HF: llama.cpp does not permute Phi-3's q / k
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            np.testing.assert_array_equal(t.data.reshape(w.shape), w.astype(np.float16), err_msg=hf_name)
    o_proj = state["model.layers.0.self_attn.o_proj.weight"].numpy()
    assert np.abs(tensors["blk.0.attn_output.weight"].data.astype(np.float32) - o_proj).max() <= 1e-3


def test_vocabulary_tags_end_of_turn_and_chat_template(f16_file, tiny_run):
    tok = tiny_run.tokenizer
    tokens = field(f16_file, "tokenizer.ggml.tokens")
    types = field(f16_file, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == tiny_run.rows
    assert field(f16_file, "tokenizer.ggml.model") == "gpt2" and field(f16_file, "tokenizer.ggml.pre") == "gpt-2"
    assert len(field(f16_file, "tokenizer.ggml.merges")) > 0
    for tag in DEFAULT_TAGS.tokens:
        (tid,) = tok.encode(tag, add_special_tokens=False)
        assert tokens[tid] == tag and types[tid] == gguf.TokenType.USER_DEFINED, tag
        assert tokens.count(tag) == 1
    end = tok.convert_tokens_to_ids("<|end|>")
    assert field(f16_file, "tokenizer.ggml.eot_token_id") == end and types[end] == gguf.TokenType.CONTROL
    assert field(f16_file, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field(f16_file, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert all(t == gguf.TokenType.UNUSED for t in types[len(tok):])
    assert tokens[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    template = field(f16_file, "tokenizer.chat_template")
    marker = re.compile(r"\{%-?\s*(end)?generation")  # transformers' own marker, unknown to llama.cpp's Jinja
    assert marker.search(tok.chat_template) and not marker.search(template)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<final>4</final>"}, {"role": "user", "content": "3+3?"}]
    rendered = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True,
                                                                  eos_token=tok.eos_token)
    assert rendered == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_q8_0_weights_dequantize_within_the_block_scale(tiny_run, plain_fp32, tmp_path):
    path = tmp_path / "tiny-q8.gguf"
    assert main(["export", str(tiny_run.out), "--format", "gguf", "--quant", "q8_0", "--out", str(path)]) == 0
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    tensors = {t.name: t for t in reader.tensors}
    for hf_name, weight in plain_fp32.state_dict().items():
        t, w = tensors[gguf_name(hf_name)], weight.float().numpy()
        if w.ndim == 1:
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, hf_name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        blocks = np.abs(w).reshape(w.shape[0], -1, 32).max(axis=-1, keepdims=True)  # Q8_0: 32 values, one scale
        err = np.abs(got - w).reshape(blocks.shape[0], -1, 32)
        assert (err <= blocks / 127 * 0.5 + blocks * 1e-3 + 1e-7).all(), hf_name  # half a step (+ f16 scale)
        assert err.max() > 0  # really quantised


def test_q4_k_m_without_llama_quantize_writes_f16_and_says_the_command(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "tiny-q4.gguf"
    assert main(["export", str(tiny_run.out), "--format", "gguf", "--quant", "q4_k_m", "--out", str(out)]) == 0
    f16 = tmp_path / "tiny-q4-f16.gguf"
    assert not out.exists() and f16.is_file()
    assert f"llama-quantize {f16} {out} Q4_K_M" in capsys.readouterr().out
    assert field(gguf.GGUFReader(f16), "general.file_type") == gguf.LlamaFileType.MOSTLY_F16


def test_q4_k_m_runs_llama_quantize_when_on_path(tiny_run, tmp_path, monkeypatch):
    tools = tmp_path / "bin"
    tools.mkdir()
    fake = tools / "llama-quantize"  # records its arguments and copies the input, as a stand-in of the real tool
    fake.write_text(f"#!{sys.executable}\nimport shutil, sys\nopen(sys.argv[2] + '.args', 'w').write(' '.join(sys.argv[1:]))\n"
                    "shutil.copy(sys.argv[1], sys.argv[2])\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "tiny-q4.gguf"
    assert main(["export", str(tiny_run.out), "--format", "gguf", "--quant", "q4_k_m", "--out", str(out)]) == 0
    assert out.is_file() and not (tmp_path / "tiny-q4-f16.gguf").exists()
    assert (tmp_path / "tiny-q4.gguf.args").read_text() == f"{tmp_path / 'tiny-q4-f16.gguf'} {out} Q4_K_M"


def test_bad_requests_fail_with_the_reason(tiny_run, tmp_path):
    with pytest.raises(SystemExit, match="--quant is for --format gguf"):
        main(["export", str(tiny_run.out), "--quant", "q8_0", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="neither final/config.json"):
        main(["export", str(tmp_path), "--format", "gguf", "--out", str(tmp_path / "x.gguf")])
    with pytest.raises(SystemExit, match="not both"):
        main(["export", str(tiny_run.out), "--model", str(tiny_run.final), "--out", str(tmp_path / "x")])


def test_without_the_gguf_package_the_error_names_the_extra(tiny_run, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "gguf" or m.startswith(("gguf.", "so8t_hf.export"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(SystemExit, match=r"pip install 'so8t-hf\[gguf\]'"):
        main(["export", str(tiny_run.out), "--format", "gguf", "--out", str(tmp_path / "x.gguf")])
