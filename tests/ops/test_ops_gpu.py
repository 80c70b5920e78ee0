"""The Triton flash-attention kernels on a CUDA GPU at real sizes, bf16 (run with `pytest -m gpu`).

Tolerance rule of DESIGN.md (flash-attention's): for the output and each gradient, the kernel's
max error against an fp32 reference is at most 2x the error of plain PyTorch attention computed
in bf16 against the same reference, plus a small epsilon.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from so8t_hf.ops import (  # noqa: E402
    attention_reference,
    flash_attn_func,
    flash_attn_varlen_func,
    varlen_attention_reference,
)

DTYPE = torch.bfloat16


def _grads(fn, tensors, dout):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, dout.to(out.dtype))


def _assert_rule(fn, ref_fn, tensors, dout, eps=1e-3, names=("out", "dq", "dk", "dv")):
    """fn: our kernel; ref_fn(*tensors, compute_dtype): PyTorch attention in that precision."""
    out, grads = _grads(fn, tensors, dout)
    ref, ref_grads = _grads(lambda *t: ref_fn(*[x.float() for x in t], compute_dtype=torch.float32), tensors, dout)
    pt, pt_grads = _grads(lambda *t: ref_fn(*t, compute_dtype=None), tensors, dout)  # bf16 throughout
    report = []
    for name, a, r, p in zip(names, (out, *grads), (ref, *ref_grads), (pt, *pt_grads)):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err = (a.float() - r).abs().max().item()
        err_pt = (p.float() - r).abs().max().item()
        tol = 2 * err_pt + eps * r.abs().max().item()
        report.append(f"{name}: {err:.2e} (bf16 torch {err_pt:.2e})")
        assert err <= tol, f"{name}: kernel err {err:.3e} > 2 x bf16-torch err {err_pt:.3e} + eps"
    print("; ".join(report))


@pytest.mark.parametrize(
    "B, T, H, Hkv, D, causal",
    [
        (2, 1024, 32, 32, 96, True),  # Phi-3.5-mini
        (2, 1024, 32, 8, 128, True),  # GQA 4:1
        (2, 1000, 16, 4, 64, False),  # T not a multiple of any block
    ],
)
def test_dense_bf16_tolerance_rule(B, T, H, Hkv, D, causal):
    torch.manual_seed(1000 + D)
    dev = "cuda"
    q = torch.randn(B, T, H, D, device=dev, dtype=DTYPE)
    k = torch.randn(B, T, Hkv, D, device=dev, dtype=DTYPE)
    v = torch.randn(B, T, Hkv, D, device=dev, dtype=DTYPE)
    dout = torch.randn(B, T, H, D, device=dev, dtype=DTYPE)
    _assert_rule(
        lambda a, b, c: flash_attn_func(a, b, c, causal=causal),
        lambda a, b, c, compute_dtype: attention_reference(a, b, c, causal=causal, compute_dtype=compute_dtype),
        (q, k, v),
        dout,
    )


def test_varlen_bf16_tolerance_rule():
    gen = torch.Generator().manual_seed(7)
    lens = torch.randint(1, 900, (9,), generator=gen).tolist() + [1024]  # ~5k tokens, one full-length
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    H, Hkv, D, total = 32, 8, 96, sum(lens)
    q = torch.randn(total, H, D, device="cuda", dtype=DTYPE)
    k = torch.randn(total, Hkv, D, device="cuda", dtype=DTYPE)
    v = torch.randn(total, Hkv, D, device="cuda", dtype=DTYPE)
    dout = torch.randn(total, H, D, device="cuda", dtype=DTYPE)
    _assert_rule(
        lambda a, b, c: flash_attn_varlen_func(a, b, c, cu, cu, max(lens), max(lens), causal=True),
        lambda a, b, c, compute_dtype: varlen_attention_reference(
            a, b, c, cu, cu, causal=True, compute_dtype=compute_dtype
        ),
        (q, k, v),
        dout,
    )


def test_varlen_equals_dense_per_sequence():
    # the packed kernel on [s0, s1] gives what the dense kernel gives on each sequence alone
    torch.manual_seed(3)
    cu = torch.tensor([0, 700, 1033], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1033, 8, 96, device="cuda", dtype=DTYPE) for _ in range(3))
    packed = flash_attn_varlen_func(q, k, v, cu, cu, 700, 700, causal=True)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        one = [t[None, s:e] for t in (q, k, v)]
        dense = flash_attn_func(*one, causal=True)[0]
        # the autotuner may pick other block sizes for the packed and the dense launch, so the two can differ by
        # bf16 rounding only: no more than plain PyTorch's own bf16 error against the fp32 reference, twice
        ref = attention_reference(*[t.float() for t in one], causal=True, compute_dtype=torch.float32)[0]
        err_pt = (attention_reference(*one, causal=True, compute_dtype=None)[0].float() - ref).abs().max().item()
        diff = (packed[s:e].float() - dense.float()).abs().max().item()
        assert diff <= 2 * err_pt, f"sequence {s}:{e}: packed vs dense {diff:.2e} > 2 x bf16 torch error {err_pt:.2e}"


def test_fp32_inputs_on_gpu():
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 300, 4, 64, device="cuda") for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True, compute_dtype=torch.float64)
    assert (out.double() - ref).abs().max().item() < 1e-4


def test_so8_rotation_bf16_tolerance_rule():
    # Phi-3.5-mini attention output (B4 x T2048 x 3072), 384 SO(8) blocks: y, dx, dR
    from so8t_hf.ops import so8_rotate, so8_rotate_reference

    torch.manual_seed(5)
    theta = torch.randn(384, 8, 8, device="cuda", dtype=torch.float64) * 0.3
    rotation = torch.linalg.matrix_exp(theta - theta.transpose(-1, -2))
    x = torch.randn(4, 2048, 3072, device="cuda", dtype=DTYPE)
    dy = torch.randn_like(x)
    _assert_rule(
        lambda a, r: so8_rotate(a, r),
        lambda a, r, compute_dtype: so8_rotate_reference(a, r.to(compute_dtype or a.dtype)),
        (x, rotation.to(DTYPE)),
        dy,
        names=("y", "dx", "dR"),
    )
