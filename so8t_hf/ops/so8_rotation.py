"""Triton kernels of the block-diagonal SO(8) rotation `y_b = x_b @ R_b` (forward and backward).

The rotation is memory-bound (8 multiply-adds per element), yet torch's einsum runs it as a batched
matmul with K = 8 between two layout copies: about 6x the memory floor on an H100
(benchmarks/results/attention_h100.md). Here one pass reads x and writes y:

* forward: each program takes a (BLOCK_M rows x BLOCK_C columns) tile of x (BLOCK_C/8 rotation blocks)
  and multiplies it with the matching (BLOCK_C x BLOCK_C) block-diagonal tile of R built in registers;
* backward: one pass over (x, dy) gives `dx = dy @ blockdiag(R)^T` and, per program, fp32 partial sums
  of `dR_b = sum_rows x_b^T dy_b` (only the diagonal 8x8 blocks of the tile's x^T dy are kept); the
  partials of the programs sharing a column tile are summed by torch.

Accumulation is fp32; fp32 inputs use exact ("ieee") products.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .utils import INTERPRET, dot_precision

BLOCK = 8  # the SO(8) block


@triton.jit
def _block_diag_tile(R, col0, n_cols, TRANSPOSE: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_C, BLOCK_C) tile of blockdiag(R) (or its transpose) at columns col0.. of R: (n, 8, 8)."""
    i = tl.arange(0, BLOCK_C)[:, None]
    j = tl.arange(0, BLOCK_C)[None, :]
    gi = col0 + i
    same_block = (i // 8 == j // 8) & (gi < n_cols)
    if TRANSPOSE:
        offs = (gi // 8) * 64 + (j % 8) * 8 + (i % 8)
    else:
        offs = (gi // 8) * 64 + (i % 8) * 8 + (j % 8)
    return tl.load(R + offs, mask=same_block, other=0.0)


@triton.jit(do_not_specialize=["n_rows"])  # a new token count per batch must not compile a new variant
def _rotate_fwd_kernel(
    X, R, Y, n_rows, n_cols, stride_x, stride_y,
    TRANSPOSE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    col0 = tl.program_id(1) * BLOCK_C
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    r = _block_diag_tile(R, col0, n_cols, TRANSPOSE, BLOCK_C).to(x.dtype)
    y = tl.dot(x, r, input_precision=DOT_PRECISION)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "row_step"])
def _rotate_bwd_kernel(
    X, DY, R, DX, DR_PARTIAL, n_rows, n_cols, stride_x, stride_dy, stride_dx, row_step,
    STORE_DX: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    split = tl.program_id(0)
    col0 = tl.program_id(1) * BLOCK_C
    cols = col0 + tl.arange(0, BLOCK_C)
    if STORE_DX:
        r_t = _block_diag_tile(R, col0, n_cols, True, BLOCK_C).to(DY.dtype.element_ty)
    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    for start in range(split * BLOCK_M, n_rows, row_step):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        if STORE_DX:
            dx = tl.dot(dy, r_t, input_precision=DOT_PRECISION)
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        acc += tl.dot(tl.trans(x), dy, input_precision=DOT_PRECISION)
    # keep the diagonal 8x8 blocks: DR_PARTIAL[split, block, i, j] (row-major (splits, n_cols * 8))
    i = tl.arange(0, BLOCK_C)[:, None]
    j = tl.arange(0, BLOCK_C)[None, :]
    gi = col0 + i
    keep = (i // 8 == j // 8) & (gi < n_cols)
    offs = split * n_cols * 8 + (gi // 8) * 64 + (i % 8) * 8 + (j % 8)
    tl.store(DR_PARTIAL + offs, acc, mask=keep)


def _blocks(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps): column tiles of 8 rotation blocks; tl.dot needs >= 16."""
    block_c = max(16, min(64, triton.next_power_of_2(n_cols)))
    if INTERPRET:
        return 16, block_c, 4
    return 128, block_c, 4


@functools.cache
def _sm_count(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index if device_index is not None else 0).multi_processor_count


def _check(x: torch.Tensor, rotation: torch.Tensor) -> None:
    n_cols = x.shape[-1]
    if rotation.dim() != 3 or rotation.shape[1:] != (BLOCK, BLOCK) or rotation.shape[0] * BLOCK != n_cols:
        raise ValueError(f"rotation must be (n, 8, 8) with n * 8 = x.shape[-1] = {n_cols}, got {tuple(rotation.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x has dtype {x.dtype}; expected float16, bfloat16 or float32")
    if x.device != rotation.device:
        raise ValueError(f"x on {x.device}, rotation on {rotation.device}")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("the Triton SO(8) rotation kernel needs CUDA tensors (or TRITON_INTERPRET=1)")


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def rotate_rows(x: torch.Tensor, rotation: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x (M, C) @ blockdiag(rotation) (or its transpose), rotation (C/8, 8, 8); returns (M, C) in x's dtype."""
    n_rows, n_cols = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    block_m, block_c, warps = _blocks(n_cols)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_c))
    _rotate_fwd_kernel[grid](
        x, rotation, y, n_rows, n_cols, x.stride(0), y.stride(0),
        TRANSPOSE=transpose, DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
    )
    return y


def rotate_rows_backward(x: torch.Tensor, dy: torch.Tensor, rotation: torch.Tensor, need_dx: bool):
    """(dx or None, dR in fp32) of y = x @ blockdiag(rotation), from one pass over x and dy."""
    n_rows, n_cols = x.shape
    block_m, block_c, warps = _blocks(n_cols)
    col_tiles = triton.cdiv(n_cols, block_c)
    programs = 4 if INTERPRET or x.device.type != "cuda" else 4 * _sm_count(x.device.index)
    splits = max(1, min(triton.cdiv(n_rows, block_m), triton.cdiv(programs, col_tiles)))
    partial = torch.empty(splits, n_cols // BLOCK, BLOCK, BLOCK, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(dy, memory_format=torch.contiguous_format) if need_dx else dy  # dy: unused pointer
    _rotate_bwd_kernel[(splits, col_tiles)](
        x, dy, rotation, dx, partial, n_rows, n_cols, x.stride(0), dy.stride(0), dx.stride(0), splits * block_m,
        STORE_DX=need_dx, DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
    )
    return (dx if need_dx else None), partial.sum(0)


class So8Rotate(torch.autograd.Function):
    """y = x_b @ R_b over the 8-wide blocks of x's last dim; gradients for x and R."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        _check(x, rotation)
        rotation = rotation.contiguous()
        x_rows = _rows(x)
        ctx.save_for_backward(x_rows, rotation)
        ctx.shape = x.shape
        return rotate_rows(x_rows, rotation).view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_rows, rotation = ctx.saved_tensors
        need_dx, need_dr = ctx.needs_input_grad
        dy_rows = _rows(dy.to(x_rows.dtype))
        if not need_dr:
            return rotate_rows(dy_rows, rotation, transpose=True).view(ctx.shape), None
        dx, dr = rotate_rows_backward(x_rows, dy_rows, rotation, need_dx)
        return (dx.view(ctx.shape) if need_dx else None), dr.to(rotation.dtype)


def so8_rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Block-diagonal SO(8) rotation of x's last dim: (..., n*8) with rotation (n, 8, 8) -> x_b @ R_b."""
    return So8Rotate.apply(x, rotation)
