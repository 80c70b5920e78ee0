"""The Triton SO(8) exponential (scaling and squaring, fp32) and its gradient against float64 `matrix_exp` on the CPU
(Triton's interpreter), over generator norms from 0 to far past one squaring, and the `so8t::so8_exp` op's backends."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from so8t_hf.ops import triton_available  # noqa: E402

if not triton_available():
    pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from so8t_hf.ops.so8_exp import so8_exp_backward, so8_exp_forward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(theta: torch.Tensor, grad: torch.Tensor):
    t = theta.double().clone().requires_grad_()
    r = torch.linalg.matrix_exp(t - t.transpose(-1, -2))
    (dt,) = torch.autograd.grad(r, t, grad.double())
    return r.detach(), dt


@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.2, 1.0, 4.0, 20.0])
def test_exp_and_gradient_match_float64_matrix_exp(scale):
    g = torch.Generator().manual_seed(int(scale * 100) + 1)
    theta = torch.randn(13, 8, 8, generator=g, dtype=torch.float64) * scale
    grad = torch.randn(13, 8, 8, generator=g, dtype=torch.float64)
    r_ref, d_ref = _reference(theta, grad)
    r = torch.full((13, 8, 8), float("nan"))  # poisoned: every element must be written
    r = so8_exp_forward(theta.float().to(DEVICE)).cpu().double()
    d = so8_exp_backward(theta.float().to(DEVICE), grad.float().to(DEVICE)).cpu().double()
    assert torch.isfinite(r).all() and torch.isfinite(d).all()
    # fp32 rounding, doubled by each of the ~log2(|A|) squarings: 1e-6 * (1 + |A|)
    norm = (theta - theta.transpose(-1, -2)).norm(dim=(-1, -2)).max().item()
    assert (r - r_ref).abs().max().item() < 2e-6 * (1 + norm)
    assert ((d - d_ref).abs().max() / d_ref.abs().max()).item() < 2e-6 * (1 + norm)
    eye = torch.eye(8, dtype=torch.float64)
    assert (r.transpose(-1, -2) @ r - eye).abs().max().item() < 2e-6 * (1 + norm)  # orthogonal
    assert (torch.linalg.det(r) - 1).abs().max().item() < 16e-6 * (1 + norm)  # det +1 (8 x the element error)


def test_gradient_is_skew_and_zero_generators_give_identity():
    theta = torch.zeros(3, 8, 8, device=DEVICE)
    r = so8_exp_forward(theta)
    assert torch.equal(r.cpu(), torch.eye(8).expand(3, 8, 8))
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(3, 8, 8, generator=g).to(DEVICE)
    d = so8_exp_backward(theta, grad).cpu()
    torch.testing.assert_close(d, grad.cpu() - grad.cpu().transpose(-1, -2))  # exp'(0) = identity map, skewed


def test_shape_and_dtype_errors_are_clear():
    with pytest.raises(ValueError, match=r"theta must be \(n, 8, 8\)"):
        so8_exp_forward(torch.zeros(4, 8, 4, device=DEVICE))
    with pytest.raises(TypeError, match="expected float32"):
        so8_exp_forward(torch.zeros(2, 8, 8, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_op_and_its_autograd_on_each_backend(monkeypatch, backend):
    import so8t_hf  # noqa: F401  (registers so8t::so8_exp)

    monkeypatch.setenv("SO8T_ROTATION_EXP", backend)
    g = torch.Generator().manual_seed(9)
    theta = (torch.randn(6, 8, 8, generator=g) * 0.7).to(DEVICE).requires_grad_()
    grad = torch.randn(6, 8, 8, generator=g)
    r = torch.ops.so8t.so8_exp(theta)
    assert r.dtype == torch.float32
    r.backward(grad.to(DEVICE))
    r_ref, d_ref = _reference(theta.detach().cpu(), grad)
    torch.testing.assert_close(r.detach().cpu().double(), r_ref, rtol=0, atol=5e-6)
    torch.testing.assert_close(theta.grad.cpu().double(), d_ref, rtol=0, atol=5e-6 * d_ref.abs().max().item())


def test_unknown_exp_backend_is_a_clear_error(monkeypatch):
    import so8t_hf  # noqa: F401

    monkeypatch.setenv("SO8T_ROTATION_EXP", "fast")
    with pytest.raises(ValueError, match="SO8T_ROTATION_EXP='fast': use auto, triton or torch"):
        torch.ops.so8t.so8_exp(torch.zeros(1, 8, 8))
