"""Shared pieces of the Triton kernels: tile load/store helpers, the head-dim
split, block-size configs and the input checks used by both the forward and backward launchers.

Head dims that are not a power of two (Phi-3.5's 96) are split into two power-of-two column
blocks, D0 + D1 (96 = 64 + 32), so no matmul work is wasted on padding; a remainder that is not a
power of two (e.g. 24 = 16 + 8 -> 16 + 16) is padded with masked loads. Setting
``SO8T_ATTN_SPLIT_D=0`` pads to one power-of-two block instead (96 -> 128), for comparison.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634
# scalar kernel arguments that must not multiply compiled variants (value 1 / divisible by 16);
# strides stay specialised: their divisibility lets loads vectorise
NO_SPECIALIZE = ["seqlen_q", "seqlen_k", "num_heads", "num_kv_heads", "group", "seq_bucket"]


def split_head_dim(head_dim: int, split: bool | None = None) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1) with BLOCK_D1 == 0 meaning a single column block."""
    if split is None:
        split = os.environ.get("SO8T_ATTN_SPLIT_D", "1") != "0"
    d0 = max(16, triton.next_power_of_2(head_dim))
    if split and d0 != head_dim and d0 > 16:
        d0 //= 2
        return d0, max(16, triton.next_power_of_2(head_dim - d0))
    return d0, 0


def seq_bucket(n: int) -> int:
    """Autotuning key for a sequence length: its power-of-two bucket (no retune per length)."""
    return min(triton.next_power_of_2(max(int(n), 1)), 16384)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen: bool) -> None:
    """Shape / dtype / device / stride checks shared by the launchers."""
    ndim = 3 if varlen else 4
    layout = "(total, H, D)" if varlen else "(B, T, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dim")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("the Triton attention kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or q.shape[-1] > 256:
        raise ValueError(f"head dims must match and be <= 256: q {q.shape[-1]}, k {k.shape[-1]}")
    if q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"num_heads {q.shape[-2]} is not a multiple of num_kv_heads {k.shape[-2]}")
    if not varlen and (q.shape[0] != k.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}")


def check_cu_seqlens(cu: torch.Tensor, total: int, name: str, device: torch.device) -> None:
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D int32 tensor of n+1 offsets, got {cu.dtype} {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device}, the tensors on {device}")
    if not cu.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    del total  # the last offset is not read back to the host (that would synchronise)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would miss the 1e-4 test tolerance)
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _load_tile(base, rows, n_rows, stride_t, offs_d, HEAD_DIM: tl.constexpr, ROW_MASK: tl.constexpr):
    # (len(rows), len(offs_d)) tile of a row-major (rows, head_dim) slab at `base`; zero-filled
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if ROW_MASK:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_tile(base, x, rows, n_rows, stride_t, offs_d, HEAD_DIM: tl.constexpr):
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    # (q_start, len_q, k_start, len_k) of sequence b: packed offsets, or the dense shape
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        len_q = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        len_k = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = b * 0
        len_q = b * 0 + seqlen_q
        k_start = b * 0
        len_k = b * 0 + seqlen_k
    return q_start, len_q, k_start, len_k


# Block configs: (BLOCK_M, BLOCK_N, num_warps, num_stages, largest BLOCK_D0 + BLOCK_D1 it is for).
# Chosen from sm_90 compiles (ptxas register / spill counts, see benchmarks/NOTES_attention.md);
# the autotuner times the survivors once per (head dim, causal, varlen, dtype, seqlen bucket).
TUNE_KEY = ["HEAD_DIM", "BLOCK_D0", "BLOCK_D1", "IS_CAUSAL", "IS_VARLEN", "DOT_PRECISION", "seq_bucket"]
INTERPRET_BLOCKS = {"fwd": (16, 32), "dkdv": (16, 32), "dq": (32, 16)}  # BLOCK_M != BLOCK_N on purpose
FP32_BLOCKS = {64: (32, 32, 4, 1), 256: (16, 16, 4, 1)}  # fp32 ("ieee" dots): spill-free, not fast


_MAX_BLOCK_D = {}  # (BLOCK_M, BLOCK_N, num_warps, num_stages) -> largest BLOCK_D0 + BLOCK_D1


def _prune(configs, nargs, **kwargs):
    bd = kwargs.get("BLOCK_D0", nargs.get("BLOCK_D0", 0)) + kwargs.get("BLOCK_D1", nargs.get("BLOCK_D1", 0))
    kept = [c for c in configs if bd <= _MAX_BLOCK_D.get(_cfg_key(c), 256)]
    return kept or configs[:1]


def _cfg_key(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def tuned(kernel, shapes):
    configs = []
    for m, n, w, s, max_bd in shapes:
        configs.append(triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s))
        _MAX_BLOCK_D[(m, n, w, s)] = max_bd
    return triton.autotune(configs, key=TUNE_KEY, prune_configs_by={"early_config_prune": _prune})(kernel)


def launch(kernel, tuned_kernel, name, grid, dtype, *args, **kwargs):
    """Interpreter: fixed small blocks; fp32: fixed spill-free blocks; fp16/bf16: autotuned."""
    if INTERPRET:
        m, n = INTERPRET_BLOCKS[name]
        kernel[grid](*args, **kwargs, BLOCK_M=m, BLOCK_N=n)
    elif dtype == torch.float32:
        bd = kwargs["BLOCK_D0"] + kwargs["BLOCK_D1"]
        m, n, w, s = FP32_BLOCKS[64 if bd <= 64 else 256]
        kernel[grid](*args, **kwargs, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
    else:
        tuned_kernel[grid](*args, **kwargs)
