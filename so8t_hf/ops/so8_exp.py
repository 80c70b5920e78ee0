"""Triton kernels of the SO(8) exponential `R_b = exp(theta_b - theta_b^T)` and its gradient, for a whole batch
of 8x8 generators in one launch each, on the GPU, with no host work per block.

Method (scaling and squaring, Higham 2005): `A = theta - theta^T`; `s = max(0, ceil(log2(|A|_F / 0.5)))` per block,
so `|A / 2^s|_2 <= 0.5`; a degree-`DEGREE` Taylor polynomial of `exp(A / 2^s)` by Horner (truncation below
0.5^13 / 13! ~ 2e-14 for DEGREE 12), then `s` squarings. All in fp32 registers, one program per 8x8 block.

Gradient: for `R = exp(A)` and `G = dL/dR`, `dL/dA = L(A^T, G)`, the Frechet derivative of exp at `A^T` in direction
`G`; it is the upper-right block of `exp([[A^T, G], [0, A^T]])` (Najfeld & Havel 1995, as torch's `matrix_exp`
backward computes it). The kernel runs the same scaling, Horner and squaring on the pair `(P, Q)` standing for
`[[P, Q], [0, P]]`: products are `(P1 P2, P1 Q2 + Q1 P2)`. Then `dL/dtheta = dA - dA^T`.

Accuracy: fp32 arithmetic; against float64 `torch.linalg.matrix_exp` the max error is ~1e-6 for generator norms up to
~10 (each squaring can double the rounding error; tests/ops/test_so8_exp.py measures it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 8
DEGREE = 12  # Taylor degree at |A|_2 <= 0.5: remainder < 0.5^13 / 13! ~ 2e-14


# The 8x8 products are written out as broadcast sums (tl.dot needs >= 16 per side): (8, 8) @ (8, 8) is
# tl.sum(a[:, :, None] * b[None, :, :], axis=1), in fp32 registers. They stay inline, not in a helper: Triton's CPU
# interpreter (the tests) pays a large fixed cost per nested jit-function call.


@triton.jit
def _so8_exp_fwd_kernel(THETA, R, DEGREE: tl.constexpr):
    # THETA, R: (n, 8, 8) contiguous; grid (n,): one 8x8 block per program
    blk = tl.program_id(0)
    i = tl.arange(0, 8)[:, None]
    j = tl.arange(0, 8)[None, :]
    a = tl.load(THETA + blk * 64 + i * 8 + j).to(tl.float32) - tl.load(THETA + blk * 64 + j * 8 + i).to(tl.float32)
    norm = tl.sqrt(tl.sum(tl.sum(a * a, axis=1), axis=0))
    s = tl.maximum(tl.ceil(tl.log2(tl.maximum(norm, 1e-30) * 2.0)), 0.0)  # |A| / 2^s <= 0.5
    x = a * tl.exp2(-s)
    eye = (i == j).to(tl.float32)
    p = eye
    for kk in tl.static_range(DEGREE):  # Horner: p = I + x p / k, k = DEGREE .. 1
        p = eye + tl.sum(x[:, :, None] * p[None, :, :], axis=1) * (1.0 / (DEGREE - kk))
    for _ in range(s.to(tl.int32)):
        p = tl.sum(p[:, :, None] * p[None, :, :], axis=1)
    tl.store(R + blk * 64 + i * 8 + j, p)


@triton.jit
def _so8_exp_bwd_kernel(THETA, G, DTHETA, DEGREE: tl.constexpr):
    # THETA, G, DTHETA: (n, 8, 8) contiguous; grid (n,): one 8x8 block per program
    blk = tl.program_id(0)
    i = tl.arange(0, 8)[:, None]
    j = tl.arange(0, 8)[None, :]
    a = tl.load(THETA + blk * 64 + i * 8 + j).to(tl.float32) - tl.load(THETA + blk * 64 + j * 8 + i).to(tl.float32)
    norm = tl.sqrt(tl.sum(tl.sum(a * a, axis=1), axis=0))
    s = tl.maximum(tl.ceil(tl.log2(tl.maximum(norm, 1e-30) * 2.0)), 0.0)
    scale = tl.exp2(-s)
    x = -a * scale  # A^T = -A (skew), scaled
    y = tl.load(G + blk * 64 + i * 8 + j).to(tl.float32) * scale
    eye = (i == j).to(tl.float32)
    p = eye
    q = tl.zeros((8, 8), dtype=tl.float32)
    for kk in tl.static_range(DEGREE):  # (p, q) = (I, 0) + (x, y)(p, q) / k
        c = 1.0 / (DEGREE - kk)
        q = (tl.sum(x[:, :, None] * q[None, :, :], axis=1) + tl.sum(y[:, :, None] * p[None, :, :], axis=1)) * c
        p = eye + tl.sum(x[:, :, None] * p[None, :, :], axis=1) * c
    for _ in range(s.to(tl.int32)):  # (p, q)^2 = (p p, p q + q p)
        q = tl.sum(p[:, :, None] * q[None, :, :], axis=1) + tl.sum(q[:, :, None] * p[None, :, :], axis=1)
        p = tl.sum(p[:, :, None] * p[None, :, :], axis=1)
    tl.store(DTHETA + blk * 64 + i * 8 + j, q - tl.trans(q))


def _check(theta: torch.Tensor) -> None:
    if theta.dim() != 3 or theta.shape[1:] != (BLOCK, BLOCK):
        raise ValueError(f"theta must be (n, 8, 8), got {tuple(theta.shape)}")
    if theta.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"theta has dtype {theta.dtype}; expected float32 (or float16 / bfloat16)")


def so8_exp_forward(theta: torch.Tensor) -> torch.Tensor:
    """R = exp(theta - theta^T) per 8x8 block: theta (n, 8, 8) -> R (n, 8, 8) in fp32."""
    _check(theta)
    theta = theta.contiguous()
    out = torch.empty(theta.shape, device=theta.device, dtype=torch.float32)
    if theta.shape[0]:
        _so8_exp_fwd_kernel[(theta.shape[0],)](theta, out, DEGREE=DEGREE, num_warps=1)
    return out


def so8_exp_backward(theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dL/dtheta (fp32, theta's shape) from dL/dR of R = exp(theta - theta^T)."""
    _check(theta)
    if grad.shape != theta.shape:
        raise ValueError(f"grad {tuple(grad.shape)} and theta {tuple(theta.shape)} differ in shape")
    theta, grad = theta.contiguous(), grad.contiguous()
    out = torch.empty(theta.shape, device=theta.device, dtype=torch.float32)
    if theta.shape[0]:
        _so8_exp_bwd_kernel[(theta.shape[0],)](theta, grad, out, DEGREE=DEGREE, num_warps=1)
    return out
