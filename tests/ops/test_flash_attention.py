"""The Triton flash-attention kernels on the CPU, through the Triton interpreter (TRITON_INTERPRET=1).

Forward and dQ, dK, dV against a float64 reference at small odd sizes: sequence lengths that are
not a multiple of the block, GQA, head dims that are not a power of two, packed varlen batches
with several segments, causal (also with seqlen_q != seqlen_k) and not.

The kernel modules are loaded in interpreter mode for this file only (and taken out of
sys.modules again), so GPU tests collected in the same session still get compiled kernels.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from so8t_hf.ops import (  # noqa: E402
    attention_reference,
    triton_available,
    varlen_attention_reference,
)

_KERNEL_MODULES = ["so8t_hf.ops.utils", "so8t_hf.ops.flash_attention_bwd", "so8t_hf.ops.flash_attention"]


def _load_interpreted():
    saved = {name: sys.modules.pop(name, None) for name in _KERNEL_MODULES}
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module("so8t_hf.ops.flash_attention")
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = prev
        for name in _KERNEL_MODULES:
            if saved[name] is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved[name]


fa = _load_interpreted()
RTOL = 1e-4  # fp32 kernel vs float64 reference, relative to the reference's largest entry


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _max_rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite values in the kernel's output"
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _check(out, grads, ref, ref_grads, rtol=RTOL):
    names = ["out", "dq", "dk", "dv"]
    for name, a, r in zip(names, (out, *grads), (ref, *ref_grads)):
        err = _max_rel_err(a, r)
        assert err < rtol, f"{name}: max rel err {err:.2e} >= {rtol:.0e}"


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float32).requires_grad_()


def _ref_grads(ref_fn, tensors, dout):
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    ref = ref_fn(*leaves)
    return ref, torch.autograd.grad(ref, leaves, dout.double())


@pytest.mark.parametrize(
    "B, T, S, H, Hkv, D, causal",
    [
        (2, 37, 37, 4, 2, 16, True),  # GQA, 3 partial query blocks
        (2, 37, 37, 4, 2, 16, False),
        (1, 19, 19, 4, 4, 24, True),  # head dim 24 = 16 + 16 (8 masked)
        (1, 37, 37, 2, 1, 32, False),  # MQA
        (1, 19, 37, 4, 2, 32, True),  # causal, bottom-right aligned, T < S
        (1, 37, 19, 4, 2, 32, True),  # T > S: the first 18 query rows see no key -> 0
        (1, 33, 33, 2, 2, 96, True),  # Phi-3.5 head dim, 64 + 32
    ],
)
def test_dense_matches_float64_reference(B, T, S, H, Hkv, D, causal):
    q, k, v = _leaf(B, T, H, D), _leaf(B, S, Hkv, D), _leaf(B, S, Hkv, D)
    out = fa.flash_attn_func(q, k, v, causal=causal)
    assert out.shape == (B, T, H, D) and out.dtype == q.dtype
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_grads = _ref_grads(
        lambda a, b, c: attention_reference(a, b, c, causal=causal, compute_dtype=torch.float64), (q, k, v), dout
    )
    _check(out, grads, ref, ref_grads)


def test_padded_head_dim_mode_and_softmax_scale(monkeypatch):
    monkeypatch.setenv("SO8T_ATTN_SPLIT_D", "0")  # 24 -> one masked block of 32
    assert fa.split_head_dim(24) == (32, 0) and fa.split_head_dim(96) == (128, 0)
    monkeypatch.delenv("SO8T_ATTN_SPLIT_D")
    assert fa.split_head_dim(96) == (64, 32) and fa.split_head_dim(128) == (128, 0)
    monkeypatch.setenv("SO8T_ATTN_SPLIT_D", "0")
    q, k, v = _leaf(2, 21, 2, 24), _leaf(2, 21, 2, 24), _leaf(2, 21, 2, 24)
    out = fa.flash_attn_func(q, k, v, causal=True, softmax_scale=0.3)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_grads = _ref_grads(
        lambda a, b, c: attention_reference(a, b, c, causal=True, softmax_scale=0.3, compute_dtype=torch.float64),
        (q, k, v),
        dout,
    )
    _check(out, grads, ref, ref_grads)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize(
    "lens_q, lens_k, H, Hkv, D, causal",
    [
        ([5, 37, 1, 20], [5, 37, 1, 20], 4, 2, 24, True),
        ([5, 37, 1, 20], [5, 37, 1, 20], 4, 2, 24, False),
        ([5, 30, 3, 20], [9, 17, 0, 33], 4, 2, 32, True),  # lengths differ, an empty key segment
        ([17, 0, 40], [17, 6, 40], 2, 1, 16, False),  # an empty query segment
    ],
)
def test_varlen_matches_float64_reference(lens_q, lens_k, H, Hkv, D, causal):
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q, k, v = _leaf(sum(lens_q), H, D), _leaf(sum(lens_k), Hkv, D), _leaf(sum(lens_k), Hkv, D)
    out = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    assert out.shape == q.shape
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_grads = _ref_grads(
        lambda a, b, c: varlen_attention_reference(a, b, c, cu_q, cu_k, causal=causal, compute_dtype=torch.float64),
        (q, k, v),
        dout,
    )
    _check(out, grads, ref, ref_grads)


def test_varlen_does_not_attend_across_sequences():
    # changing the second sequence must leave the first sequence's outputs and gradients alone
    cu = _cu([13, 21])
    q, k, v = _leaf(34, 2, 16), _leaf(34, 2, 16), _leaf(34, 2, 16)
    out1 = fa.flash_attn_varlen_func(q, k, v, cu, cu, 21, 21, causal=False)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[13:] += torch.randn(21, 2, 16)
    v2[13:] += torch.randn(21, 2, 16)
    out2 = fa.flash_attn_varlen_func(q, k2, v2, cu, cu, 21, 21, causal=False)
    torch.testing.assert_close(out1[:13], out2[:13], rtol=0, atol=0)
    assert (out1[13:] - out2[13:]).abs().max() > 1e-3


def test_strided_inputs_match_contiguous():
    # HF passes q as a (B, H, T, D) -> (B, T, H, D) transposed view
    q, k, v = (torch.randn(2, h, 23, 32).transpose(1, 2).requires_grad_() for h in (4, 2, 2))
    out = fa.flash_attn_func(q, k, v, causal=True)
    dout = torch.randn(2, 23, 4, 32).transpose(1, 2).contiguous().transpose(1, 2)  # another layout
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_grads = _ref_grads(
        lambda a, b, c: attention_reference(a, b, c, causal=True, compute_dtype=torch.float64), (q, k, v), dout
    )
    _check(out, grads, ref, ref_grads)


def test_input_validation():
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="dropout"):
        fa.flash_attn_func(q, k, k, dropout_p=0.1)
    with pytest.raises(ValueError, match="multiple"):
        fa.flash_attn_func(q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16))
    with pytest.raises(TypeError, match="dtype"):
        fa.flash_attn_func(q.double(), k.double(), k.double())
    with pytest.raises(ValueError, match="head dims"):
        fa.flash_attn_func(q, torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 32))
    cu = torch.tensor([0, 8], dtype=torch.int64)
    with pytest.raises(ValueError, match="int32"):
        fa.flash_attn_varlen_func(q[0], k[0], k[0], cu, cu, 8, 8)


def test_triton_available_and_missing_triton(monkeypatch):
    assert triton_available()  # triton imports and TRITON_INTERPRET=1
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import so8t_hf.ops as ops\n"
        "assert not ops.triton_available()\n"
        "import torch\n"
        "try:\n"
        "    ops.flash_attn_func(torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16))\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no RuntimeError without triton')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_fp16_tolerance_rule():
    # DESIGN.md rule in 16-bit (fp16: the interpreter's bf16 dot multiplies raw bits, so bf16 is GPU-only):
    # kernel error vs an fp32 reference <= 2x the error of plain PyTorch computed in fp16, plus epsilon
    cu = _cu([23, 41, 9])
    q, k, v = (torch.randn(73, h, 96, dtype=torch.float16) for h in (4, 2, 2))
    dout = torch.randn(73, 4, 96, dtype=torch.float16)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return (out, *torch.autograd.grad(out, leaves, dout.to(out.dtype)))

    def ref(a, b, c, compute_dtype):
        return varlen_attention_reference(a, b, c, cu, cu, causal=True, compute_dtype=compute_dtype)

    ours = run(lambda a, b, c: fa.flash_attn_varlen_func(a, b, c, cu, cu, 41, 41, causal=True), torch.float16)
    exact = run(lambda a, b, c: ref(a, b, c, torch.float32), torch.float32)
    plain = run(lambda a, b, c: ref(a, b, c, None), torch.float16)
    for name, a, r, p in zip(("out", "dq", "dk", "dv"), ours, exact, plain):
        assert a.dtype == torch.float16
        err, err_pt = (a.float() - r).abs().max().item(), (p.float() - r).abs().max().item()
        assert err <= 2 * err_pt + 1e-3 * r.abs().max().item(), f"{name}: {err:.2e} vs fp16 torch {err_pt:.2e}"
