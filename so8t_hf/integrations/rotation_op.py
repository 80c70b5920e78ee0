"""The SO(8) output rotation as the `torch.library` ops `so8t::so8_rotate` (forward and backward) and
`so8t::so8_exp` (the rotations R = exp(theta - theta^T) of a batch of generators, forward and backward).

SO8T-Phi3 models, remote-code copies included, look the op up (`torch.ops.so8t.so8_rotate`) and fall
back to torch's einsum when it is not registered, so `import so8t_hf` is what turns the Triton kernel on.
As a custom op with a fake (meta) implementation it is also opaque but traceable for `torch.compile`.

Backend per call: the Triton kernel of `so8t_hf.ops.so8_rotation` for CUDA tensors when triton is
installed, else einsum; `SO8T_ROTATION_BACKEND=auto|triton|einsum` overrides (`triton` also runs under
`TRITON_INTERPRET=1` on the CPU, for tests). Each (backend, reason) is logged once at INFO.

`so8t::so8_exp`: the Triton scaling-and-squaring kernel of `so8t_hf.ops.so8_exp` (fp32, one launch for every block
of every layer) for CUDA tensors, else float64 `torch.linalg.matrix_exp`; `SO8T_ROTATION_EXP=auto|triton|torch`
overrides. SO8T-Phi3 computes all its layers' rotations through it once per training forward, outside the
checkpointed layers.
"""

from __future__ import annotations

import logging
import os

import torch

from so8t_hf.ops import triton_available

logger = logging.getLogger(__name__)

ROTATION_BACKENDS = ("auto", "triton", "einsum")
EXP_BACKENDS = ("auto", "triton", "torch")
_announced: set[tuple[str, str]] = set()


def _choose(x: torch.Tensor, variable: str, choices: tuple[str, ...], fallback: str, what: str) -> str:
    """'triton' or `fallback` for this input, `variable` overriding; logs each new (choice, reason) once."""
    wanted = os.environ.get(variable, "auto")
    if wanted not in choices:
        raise ValueError(f"{variable}={wanted!r}: use {', '.join(choices[:-1])} or {choices[-1]}.")
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    kernel_ok = triton_available() and (x.is_cuda or interpreted)
    if wanted == "triton" and not kernel_ok:
        raise RuntimeError(
            f"{variable}=triton needs triton and a CUDA tensor (or TRITON_INTERPRET=1); "
            f"got a {x.device.type} tensor. Unset it to use {fallback}."
        )
    if wanted != "auto":
        backend, reason = wanted, f"{variable}={wanted}"
    elif kernel_ok and x.is_cuda:
        backend, reason = "triton", "CUDA tensor"
    else:
        backend, reason = fallback, "no CUDA tensor" if triton_available() or not x.is_cuda else "triton not installed"
    if (what, backend, reason) not in _announced:
        _announced.add((what, backend, reason))
        logger.info("%s: %s (%s)", what, backend, reason)
    return backend


def rotation_backend(x: torch.Tensor) -> str:
    """'triton' or 'einsum' for the rotation of this input (see the module docstring)."""
    return _choose(x, "SO8T_ROTATION_BACKEND", ROTATION_BACKENDS, "einsum", "SO(8) rotation")


def exp_backend(theta: torch.Tensor) -> str:
    """'triton' or 'torch' for the exponential of these generators (see the module docstring)."""
    return _choose(theta, "SO8T_ROTATION_EXP", EXP_BACKENDS, "torch", "SO(8) exponential")


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


@torch.library.custom_op("so8t::so8_rotate", mutates_args=())
def so8_rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x (..., n*8) -> x_b @ R_b for each 8-wide block b; rotation (n, 8, 8) in x's dtype."""
    if rotation_backend(x) == "triton":
        from so8t_hf.ops.so8_rotation import rotate_rows

        return rotate_rows(_rows(x), rotation.contiguous()).view(x.shape)
    blocks = x.unflatten(-1, (-1, 8))  # (..., n*8) -> (..., n, 8)
    return torch.einsum("...ni,nij->...nj", blocks, rotation).flatten(-2)


@so8_rotate.register_fake
def _(x, rotation):
    return torch.empty_like(x)


@torch.library.custom_op("so8t::so8_rotate_backward", mutates_args=())
def so8_rotate_backward(x: torch.Tensor, grad: torch.Tensor, rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dR) of y = x_b @ R_b: dx_b = dy_b @ R_b^T, dR_b = sum over rows of x_b^T dy_b (fp32 sums)."""
    grad = grad.to(x.dtype)
    if rotation_backend(x) == "triton":
        from so8t_hf.ops.so8_rotation import rotate_rows_backward

        dx, dr = rotate_rows_backward(_rows(x), _rows(grad), rotation.contiguous(), need_dx=True)
        return dx.view(x.shape), dr.to(rotation.dtype)
    xb, gb = x.unflatten(-1, (-1, 8)), grad.unflatten(-1, (-1, 8))  # (..., n, 8)
    dx = torch.einsum("...nj,nij->...ni", gb, rotation).flatten(-2)
    dr = torch.einsum("...ni,...nj->nij", xb.float(), gb.float())
    return dx, dr.to(rotation.dtype)


@so8_rotate_backward.register_fake
def _(x, grad, rotation):
    return torch.empty_like(x), torch.empty_like(rotation)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, rotation = ctx.saved_tensors
    dx, dr = torch.ops.so8t.so8_rotate_backward(x, grad, rotation)
    return dx, dr


so8_rotate.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- R = exp(theta - theta^T)


@torch.library.custom_op("so8t::so8_exp", mutates_args=())
def so8_exp(theta: torch.Tensor) -> torch.Tensor:
    """theta (n, 8, 8) -> R = exp(theta_b - theta_b^T) per block, fp32, exactly orthogonal to fp32 rounding."""
    if exp_backend(theta) == "triton":
        from so8t_hf.ops.so8_exp import so8_exp_forward

        return so8_exp_forward(theta)
    theta = theta.double()
    return torch.linalg.matrix_exp(theta - theta.transpose(-1, -2)).float()


@so8_exp.register_fake
def _(theta):
    return torch.empty(theta.shape, device=theta.device, dtype=torch.float32)


@torch.library.custom_op("so8t::so8_exp_backward", mutates_args=())
def so8_exp_backward(theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dL/dtheta of R = exp(theta - theta^T) from dL/dR (fp32)."""
    if exp_backend(theta) == "triton":
        from so8t_hf.ops.so8_exp import so8_exp_backward as kernel

        return kernel(theta, grad)
    theta = theta.double()
    a_t = theta.transpose(-1, -2) - theta  # A^T
    block = torch.cat([torch.cat([a_t, grad.double()], -1), torch.cat([torch.zeros_like(a_t), a_t], -1)], -2)
    da = torch.linalg.matrix_exp(block)[..., :8, 8:]  # Frechet derivative L(A^T, G): (n, 8, 8)
    return (da - da.transpose(-1, -2)).float()


@so8_exp_backward.register_fake
def _(theta, grad):
    return torch.empty(theta.shape, device=theta.device, dtype=torch.float32)


def _exp_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _exp_backward(ctx, grad):
    (theta,) = ctx.saved_tensors
    return torch.ops.so8t.so8_exp_backward(theta, grad).to(theta.dtype)


so8_exp.register_autograd(_exp_backward, setup_context=_exp_setup_context)
