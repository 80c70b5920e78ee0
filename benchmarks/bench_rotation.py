"""SO(8) output rotation benchmark: our Triton kernels vs torch's einsum, with a per-kernel breakdown.

Phi-3.5-mini's attention output (B x T x 3072, 384 rotation blocks), bf16. Times (median of
triton.testing.do_bench) the forward, the backward kernels alone, and forward + autograd backward, and
lists the CUDA kernels of one forward + backward from torch.profiler, so a slow step can be named.

    PYTHONPATH=$PWD python benchmarks/bench_rotation.py --out benchmarks/results/rotation_h100.md
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import so8t_hf.ops as ops  # noqa: E402
from so8t_hf.ops import so8_rotation as kern  # noqa: E402


def ms(fn, rep=200):
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def kernel_table(fn, top=8) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]
    return [f"| `{e.key[:70]}` | {e.count} | {e.device_time_total / 1e3:.3f} |" for e in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/rotation_h100.md")
    ap.add_argument("--shapes", default="4x2048,1x8192,8x4096", help="BxT list")
    args = ap.parse_args()
    C, dt = 3072, torch.bfloat16
    props = torch.cuda.get_device_properties(0)
    lines = [f"# SO(8) rotation on {props.name} ({props.multi_processor_count} SMs)", "",
             f"torch {torch.__version__}; bf16, C = {C} (384 blocks of 8); median ms of do_bench; "
             "floor = bytes moved / 3.35 TB/s (fwd: read x, write y; bwd: read x and dy, write dx).", "",
             "| B x T | op | fwd ms | bwd kernels ms | fwd+bwd ms | fwd floor ms | bwd floor ms |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    breakdown = []
    for shape in args.shapes.split(","):
        B, T = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        x = torch.randn(B, T, C, device="cuda", dtype=dt, requires_grad=True)
        a = 0.1 * torch.randn(C // 8, 8, 8, device="cuda", dtype=torch.float64)
        R = torch.linalg.matrix_exp(a - a.mT).to(dt).requires_grad_()
        dy = torch.randn_like(x)
        nbytes = x.numel() * x.element_size()
        floor_f, floor_b = 2 * nbytes / 3.35e12 * 1e3, 3 * nbytes / 3.35e12 * 1e3
        x2, dy2, r2 = x.detach().view(-1, C), dy.view(-1, C), R.detach().contiguous()
        cands = {
            "triton (ours)": (lambda: ops.so8_rotate(x, R),
                              lambda: kern.rotate_rows_backward(x2, dy2, r2, need_dx=True)),
            "einsum": (lambda: ops.so8_rotate_reference(x, R), None),
        }
        parts = {  # the fused backward's two halves, each alone
            "dx only (fwd kernel on dy, R^T)": lambda: kern.rotate_rows(dy2, r2, transpose=True),
            "dR only (bwd kernel, no dx store)": lambda: kern.rotate_rows_backward(x2, dy2, r2, need_dx=False),
        }
        for name, fn in parts.items():
            lines.append(f"| {B}x{T} | {name} | n/a | {ms(fn):.3f} | n/a | {floor_f:.3f} | {floor_f:.3f} |")
            print(lines[-1], flush=True)
        for name, (fwd, bwd) in cands.items():
            f = ms(fwd)
            b = ms(bwd) if bwd else None
            fb = ms(lambda: torch.autograd.grad(fwd(), (x, R), dy))
            lines.append(f"| {B}x{T} | {name} | {f:.3f} | {'n/a' if b is None else f'{b:.3f}'} | {fb:.3f} | "
                         f"{floor_f:.3f} | {floor_b:.3f} |")
            print(lines[-1], flush=True)
            if shape == args.shapes.split(",")[0]:
                breakdown += ["", f"### CUDA kernels of one fwd + bwd, {name}, {B}x{T}", "",
                              "| kernel | calls | total ms |", "| --- | ---: | ---: |"]
                breakdown += kernel_table(lambda: torch.autograd.grad(fwd(), (x, R), dy))
    lines += breakdown
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
