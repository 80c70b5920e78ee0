"""The Triton SO(8) rotation kernels (forward, dx, dR) against a float64 einsum reference.

On the CPU they run under Triton's interpreter (conftest sets TRITON_INTERPRET=1) in fp32, at sizes
whose row count is not a multiple of the row block and whose width is not a multiple of the
64-column tile, so every mask is exercised.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from so8t_hf.ops import so8_rotate, so8_rotate_reference, triton_available  # noqa: E402

if not triton_available():
    pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rotations(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, 8, 8, generator=g, dtype=torch.float64)
    return torch.linalg.matrix_exp(theta - theta.transpose(-1, -2))


@pytest.mark.parametrize("shape", [(3, 7, 24), (37, 64), (2, 5, 80), (1, 136)])
def test_forward_and_gradients_match_float64(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    rotation = _rotations(shape[-1] // 8, seed=len(shape))
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)

    x_ref, r_ref = x.clone().requires_grad_(), rotation.clone().requires_grad_()
    y_ref = so8_rotate_reference(x_ref, r_ref)
    dx_ref, dr_ref = torch.autograd.grad(y_ref, (x_ref, r_ref), dy)

    x_k = x.float().to(DEVICE).requires_grad_()
    r_k = rotation.float().to(DEVICE).requires_grad_()
    y = so8_rotate(x_k, r_k)
    dx, dr = torch.autograd.grad(y, (x_k, r_k), dy.float().to(DEVICE))

    assert y.shape == x.shape and y.dtype == torch.float32
    assert dr.shape == rotation.shape and dr.dtype == torch.float32
    for got, want in ((y, y_ref), (dx, dx_ref), (dr, dr_ref)):
        err = (got.double().cpu() - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item(), err
    # the rotation is orthogonal, so it keeps every block's norm
    norms = lambda t: t.unflatten(-1, (-1, 8)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(norms(y.detach().cpu().double()), norms(x), rtol=1e-5, atol=1e-5)


def test_gradient_of_x_only_and_of_rotation_only():
    x = torch.randn(19, 48, dtype=torch.float64)
    rotation = _rotations(6, seed=3)
    dy = torch.randn(19, 48, dtype=torch.float64)
    dx_ref = dy @ torch.block_diag(*rotation).T
    dr_ref = torch.stack([x[:, 8 * b : 8 * b + 8].T @ dy[:, 8 * b : 8 * b + 8] for b in range(6)])

    x_k = x.float().to(DEVICE).requires_grad_()
    (dx,) = torch.autograd.grad(so8_rotate(x_k, rotation.float().to(DEVICE)), x_k, dy.float().to(DEVICE))
    r_k = rotation.float().to(DEVICE).requires_grad_()
    (dr,) = torch.autograd.grad(so8_rotate(x.float().to(DEVICE), r_k), r_k, dy.float().to(DEVICE))
    torch.testing.assert_close(dx.double().cpu(), dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dr.double().cpu(), dr_ref, rtol=1e-5, atol=1e-5)


def test_identity_rotation_is_exact():
    x = torch.randn(2, 9, 32).to(DEVICE)
    eye = torch.eye(8).expand(4, 8, 8).to(DEVICE)
    assert torch.equal(so8_rotate(x, eye), x)


def test_non_contiguous_input():
    base = torch.randn(6, 40, 2, dtype=torch.float32)
    x = base[..., 0].to(DEVICE)  # last-dim stride 2
    rotation = _rotations(5, seed=1).float().to(DEVICE)
    torch.testing.assert_close(so8_rotate(x, rotation), so8_rotate_reference(x, rotation), rtol=1e-5, atol=1e-5)


def test_bad_shapes_raise():
    x = torch.randn(4, 24).to(DEVICE)
    with pytest.raises(ValueError, match=r"rotation must be \(n, 8, 8\) with n \* 8 = x.shape\[-1\] = 24"):
        so8_rotate(x, torch.eye(8).expand(2, 8, 8).to(DEVICE))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        so8_rotate(x.double(), torch.eye(8, dtype=torch.float64).expand(3, 8, 8).to(DEVICE))


def test_model_rotation_backend_triton_equals_einsum(monkeypatch, caplog):
    """The whole SO8T-Phi3 model: logits and SO(8) gradients equal on both rotation backends."""
    import logging

    from tiny_models import random_ids, randomize_rotations, tiny_so8t

    model = tiny_so8t(seed=0).float().to(DEVICE)
    randomize_rotations(model)
    ids = random_ids(2, 11).to(DEVICE)

    def run(backend):
        monkeypatch.setenv("SO8T_ROTATION_BACKEND", backend)
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "so8_rotation" in n}
        return out.logits.detach(), grads

    with caplog.at_level(logging.INFO):
        logits_e, grads_e = run("einsum")
        logits_t, grads_t = run("triton")
    assert "SO(8) rotation: triton (SO8T_ROTATION_BACKEND=triton)" in caplog.text
    assert grads_e and grads_e.keys() == grads_t.keys()
    torch.testing.assert_close(logits_t, logits_e, rtol=1e-5, atol=1e-5)
    for name in grads_e:
        assert grads_e[name].abs().max() > 0, name
        torch.testing.assert_close(grads_t[name], grads_e[name], rtol=1e-4, atol=1e-6)


def test_forced_triton_rotation_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from tiny_models import random_ids, tiny_so8t

    model = tiny_so8t(seed=0)
    monkeypatch.setenv("SO8T_ROTATION_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="SO8T_ROTATION_BACKEND=triton needs .* a CUDA tensor"):
        model(input_ids=random_ids(1, 5))
    monkeypatch.setenv("SO8T_ROTATION_BACKEND", "sideways")
    with pytest.raises(ValueError, match="use auto, triton or einsum"):
        model(input_ids=random_ids(1, 5))
