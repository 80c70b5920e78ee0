"""The SO(8) output rotation as the `torch.library` op `so8t::so8_rotate` (forward and backward).

SO8T-Phi3 models, remote-code copies included, look the op up (`torch.ops.so8t.so8_rotate`) and fall
back to torch's einsum when it is not registered, so `import so8t_hf` is what turns the Triton kernel on.
As a custom op with a fake (meta) implementation it is also opaque but traceable for `torch.compile`.

Backend per call: the Triton kernel of `so8t_hf.ops.so8_rotation` for CUDA tensors when triton is
installed, else einsum; `SO8T_ROTATION_BACKEND=auto|triton|einsum` overrides (`triton` also runs under
`TRITON_INTERPRET=1` on the CPU, for tests). Each (backend, reason) is logged once at INFO.
"""

from __future__ import annotations

import logging
import os

import torch

from so8t_hf.ops import triton_available

logger = logging.getLogger(__name__)

ROTATION_BACKENDS = ("auto", "triton", "einsum")
_announced: set[tuple[str, str]] = set()


def rotation_backend(x: torch.Tensor) -> str:
    """'triton' or 'einsum' for this input (see the module docstring); logs each new choice once."""
    wanted = os.environ.get("SO8T_ROTATION_BACKEND", "auto")
    if wanted not in ROTATION_BACKENDS:
        raise ValueError(f"SO8T_ROTATION_BACKEND={wanted!r}: use auto, triton or einsum.")
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    kernel_ok = triton_available() and (x.is_cuda or interpreted)
    if wanted == "triton" and not kernel_ok:
        raise RuntimeError(
            "SO8T_ROTATION_BACKEND=triton needs triton and a CUDA tensor (or TRITON_INTERPRET=1); "
            f"got a {x.device.type} tensor. Unset it to use einsum."
        )
    if wanted != "auto":
        backend, reason = wanted, f"SO8T_ROTATION_BACKEND={wanted}"
    elif kernel_ok and x.is_cuda:
        backend, reason = "triton", "CUDA tensor"
    else:
        backend, reason = "einsum", "no CUDA tensor" if triton_available() or not x.is_cuda else "triton not installed"
    if (backend, reason) not in _announced:
        _announced.add((backend, reason))
        logger.info("SO(8) rotation: %s (%s)", backend, reason)
    return backend


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
