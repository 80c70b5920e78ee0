"""Packed rows with the collator's `cu_seq_lens_q` / `max_length_q`: the auto rule (PyTorch's varlen_attn for packs of
short sequences, our kernel for long ones), the `torch_varlen` wrapper (checked on the CPU against a fake
`varlen_attn` built on the float reference), and no per-layer host work (segment ids are not rebuilt)."""

import copy

import pytest
import torch
from tiny_models import random_ids, randomize_rotations, tiny_so8t

import so8t_hf.integrations.attention as attention
from so8t_hf.integrations.attention import (
    TORCH_VARLEN_MAX_MEAN_LEN,
    force_attention_backend,
    last_backend,
    packed_gpu_choice,
)
from so8t_hf.ops.reference import varlen_attention_reference


def test_packed_gpu_rule_prefers_varlen_attn_for_short_sequences():
    assert packed_gpu_choice(400.0, torch_varlen=True, triton=True)[0] == "torch_varlen"
    assert packed_gpu_choice(TORCH_VARLEN_MAX_MEAN_LEN, torch_varlen=True, triton=True)[0] == "torch_varlen"
    assert packed_gpu_choice(TORCH_VARLEN_MAX_MEAN_LEN + 1, torch_varlen=True, triton=True)[0] == "triton"
    assert packed_gpu_choice(None, torch_varlen=True, triton=True)[0] == "torch_varlen"
    assert packed_gpu_choice(5000.0, torch_varlen=True, triton=False)[0] == "torch_varlen"
    assert packed_gpu_choice(400.0, torch_varlen=False, triton=True)[0] == "triton"
    assert packed_gpu_choice(400.0, torch_varlen=False, triton=False) is None


def _fake_varlen_attn(calls, with_window: bool):
    """A CPU stand-in with PyTorch's varlen_attn signature (either generation) over the float reference."""

    def reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=None, causal_flag=None):
        assert isinstance(max_q, int) and isinstance(max_k, int) and cu_seq_q.dtype == torch.int32
        assert causal_flag
        calls.append(int(cu_seq_q.numel() - 1))
        return varlen_attention_reference(query, key, value, cu_seq_q, cu_seq_k, causal=True, softmax_scale=scale,
                                          compute_dtype=None)

    if with_window:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
            return reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, tuple(window_size) == (-1, 0))
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None):
            return reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, is_causal)
    import inspect

    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _packed_inputs(lengths, seed=0):
    ids = random_ids(1, sum(lengths), seed=seed)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return dict(input_ids=ids, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                max_length_q=max(lengths), max_length_k=max(lengths))


@pytest.mark.parametrize("with_window", [True, False])
def test_torch_varlen_backend_equals_eager_on_a_packed_model_batch(monkeypatch, with_window):
    calls = []
    monkeypatch.setattr(attention, "_torch_varlen_attn", lambda: _fake_varlen_attn(calls, with_window))
    monkeypatch.setattr(attention, "_backend_unavailable_reason", lambda name, query: None)  # CPU tensors allowed
    ref = tiny_so8t(seed=2)  # GQA 4/2: exercises the repeat when varlen_attn has no enable_gqa
    randomize_rotations(ref)
    test = copy.deepcopy(ref)
    ref.config._attn_implementation = "eager"  # run on each sequence alone
    test.config._attn_implementation = "so8t"
    lengths = [5, 9, 3, 7]
    inputs = _packed_inputs(lengths)
    expected = torch.cat([ref(input_ids=part).logits for part in inputs["input_ids"].split(lengths, dim=1)], dim=1)
    with force_attention_backend("torch_varlen"):
        got = test(**inputs).logits
    assert last_backend() == "torch_varlen" and calls == [4, 4]  # both layers, 4 sequences each
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_collator_sequence_starts_need_no_segment_ids_on_varlen_backends(monkeypatch):
    pytest.importorskip("triton")
    if not attention.triton_kernel_available():
        pytest.skip("needs the Triton kernel (CUDA or TRITON_INTERPRET=1)")
    built = []
    original = attention.packed_segments
    monkeypatch.setattr(attention, "packed_segments", lambda *a: built.append(1) or original(*a))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel: CUDA, else Triton's interpreter
    model = tiny_so8t(seed=4).to(device)
    model.config._attn_implementation = "so8t"
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in _packed_inputs([6, 10, 4], seed=3).items()}
    with force_attention_backend("triton"):
        fast = model(**inputs).logits
    assert built == []  # from cu_seq_lens_q directly: no position_ids scan, no host sync per layer
    with force_attention_backend("eager"):
        ref = model(**inputs).logits
    assert len(built) == 2  # the dense reference rebuilds the segment ids (per layer)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_a_pack_of_one_sequence_is_plain_causal_attention():
    model = tiny_so8t(seed=5)
    model.config._attn_implementation = "so8t"
    inputs = _packed_inputs([12], seed=6)
    with force_attention_backend("eager"):
        packed = model(**inputs).logits
        plain = model(input_ids=inputs["input_ids"]).logits
    torch.testing.assert_close(packed, plain)
