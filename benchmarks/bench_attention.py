"""Attention kernel benchmark: so8t_hf's Triton flash attention vs PyTorch SDPA backends and FlexAttention.

One run, side by side, bf16, causal: median of repeated timings (triton.testing.do_bench, L2
flushed between calls), TFLOP/s for forward and forward+backward (causal FLOPs counted as half of
dense: fwd = 2 * 2 * B*H*T*S*D / 2, fwd+bwd = 3.5 x fwd), and the peak extra memory of one
forward+backward. Also: a packed batch of a realistic length mix through our varlen kernel vs
the same sequences padded to the longest through SDPA (tokens/s counts real tokens only), and the
cost of the SO(8) output rotation as a separate op: our Triton kernel vs torch's einsum (the question
whether fusing it into the attention kernel would pay).

    PYTHONPATH=$PWD python benchmarks/bench_attention.py --out benchmarks/results/attention_h100.md
    python benchmarks/bench_attention.py --smoke   # CPU, interpreter, tiny sizes: checks the script only
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton defines any kernel
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from triton.testing import do_bench  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
try:
    import so8t_hf.ops as ops  # noqa: E402
except ImportError:  # the package's __init__ needs libraries the benchmark does not: load ops alone
    import types

    pkg = types.ModuleType("so8t_hf")
    pkg.__path__ = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "so8t_hf")]
    sys.modules["so8t_hf"] = pkg
    import so8t_hf.ops as ops  # noqa: E402

DEV, DT = ("cpu", torch.float32) if SMOKE else ("cuda", torch.bfloat16)
SDPA = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-mem-eff": SDPBackend.EFFICIENT_ATTENTION}


def ms(fn, rep: int) -> float:
    if SMOKE:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def peak_mib(fn) -> float:
    """Peak memory of one call above what was allocated before it."""
    if SMOKE:
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fwd_bwd(attn, q, k, v, dout):
    def run():
        out = attn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)
    return run


def make_flex(T, causal=True, doc=None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, qi, ki):
        m = qi >= ki if causal else qi >= 0
        return m if doc is None else m & (doc[qi] == doc[ki])

    torch._dynamo.reset()  # one compiled variant per shape; never hit dynamo's recompile limit (it falls back unfused)
    block_mask = create_block_mask(mask_mod, None, None, T, T, device=DEV)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def dense_rows(B, T, H, D, rep, with_flex=True):
    """(backend, fwd ms, fwd+bwd ms, peak MiB, max |out - cuDNN out|) at one causal shape."""
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(B, T, H, D, device=DEV, dtype=DT) for _ in range(4))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    qh, kh, vh, douth = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v, dout))
    backends = {
        "triton (ours)": (lambda a, b, c: ops.flash_attn_func(a, b, c, causal=True), (q, k, v, dout)),
        "triton, D padded to pow2": (lambda a, b, c: ops.flash_attn_func(a, b, c, causal=True), (q, k, v, dout)),
    }
    if D & (D - 1) == 0:
        backends.pop("triton, D padded to pow2")
    backends["sdpa (torch's default choice)"] = (
        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), (qh, kh, vh, douth)
    )
    for name, be in SDPA.items():
        backends[name] = (
            (lambda be: lambda a, b, c: _sdpa(be, a, b, c))(be), (qh, kh, vh, douth)
        )
    if with_flex:
        backends["flex-attention"] = (None, (qh, kh, vh, douth))
    ref = None
    rows = []
    for name, (attn, (a, b, c, d)) in backends.items():
        os.environ["SO8T_ATTN_SPLIT_D"] = "0" if "padded" in name else "1"
        try:
            t0 = time.time()
            if name == "flex-attention":
                attn = make_flex(T)
            with torch.no_grad():
                out = attn(a, b, c)
            out = out if out.shape[1] == T else out.transpose(1, 2)  # -> (B, T, H, D)
            f = ms(lambda: attn(a, b, c), rep)
            fb = ms(fwd_bwd(attn, a, b, c, d), rep)
            mem = peak_mib(fwd_bwd(attn, a, b, c, d))
            if name == "sdpa-cudnn":
                ref = out.float()
            rows.append([name, f, fb, mem, out.float(), time.time() - t0])
        except Exception as e:  # a backend that does not support the shape
            rows.append([name, None, None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}", 0.0])
    os.environ["SO8T_ATTN_SPLIT_D"] = "1"
    for r in rows:
        if isinstance(r[4], torch.Tensor):
            r[4] = (r[4] - ref).abs().max().item() if ref is not None else float("nan")
    return rows


def _sdpa(be, q, k, v):
    with sdpa_kernel(be):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def packed_rows(H, D, total, lo, hi, rep, with_flex=True):
    gen = torch.Generator().manual_seed(0)
    lens = []
    while sum(lens) < total:  # log-uniform lengths in [lo, hi]: many short, some long
        lens.append(int(math.exp(torch.empty(1).uniform_(math.log(lo), math.log(hi), generator=gen).item())))
    lens[-1] -= sum(lens) - total
    if lens[-1] < lo:
        last = lens.pop()
        lens[-1] += last
    n, L = len(lens), max(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(total, H, D, device=DEV, dtype=DT) for _ in range(4))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    rows = []

    def add(name, attn, a, b, c, d):
        try:
            f, fb = ms(lambda: attn(a, b, c), rep), ms(fwd_bwd(attn, a, b, c, d), rep)
            rows.append([name, f, fb, total / fb * 1e3, peak_mib(fwd_bwd(attn, a, b, c, d))])
        except Exception as e:
            rows.append([name, None, None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"])

    add("triton varlen (ours), packed", lambda a, b, c: ops.flash_attn_varlen_func(a, b, c, cu, cu, L, L, causal=True),
        q, k, v, dout)
    pad = [torch.zeros(n, L, H, D, device=DEV, dtype=DT) for _ in range(4)]
    for p, t in zip(pad, (q, k, v, dout)):
        for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            p[i, : e - s] = t[s:e]
    ph = [p.transpose(1, 2).contiguous().requires_grad_() for p in pad]  # right-padded: causal hides the pads
    for name in ("sdpa-flash", "sdpa-cudnn"):
        add(f"{name}, padded to {L}", (lambda be: lambda a, b, c: _sdpa(be, a, b, c))(SDPA[name]), *ph)
    if with_flex:
        doc = torch.repeat_interleave(torch.arange(n, device=DEV), torch.tensor(lens, device=DEV))
        qf = [t.detach().transpose(0, 1)[None].contiguous().requires_grad_() for t in (q, k, v, dout)]
        try:
            add("flex-attention, packed (document mask)", make_flex(total, doc=doc), *qf)
        except Exception as e:
            rows.append(["flex-attention, packed", None, None, None, f"{type(e).__name__}: {e}"[:90]])
    return lens, rows


def rotation_rows(B, T, H, D, rep):
    """The SO(8) rotation as a separate op on the attention output, (B, T, H*D/8, 8) x (H*D/8, 8, 8):
    our Triton kernel (so8t_hf.ops.so8_rotate), torch's einsum (the model's fallback) and a broadcast
    matmul. fwd: y; fwd+bwd: dx and dR."""
    G = H * D // 8
    x = torch.randn(B, T, H * D, device=DEV, dtype=DT, requires_grad=True)
    A = 0.1 * torch.randn(G, 8, 8, device=DEV)
    R = torch.linalg.matrix_exp(A - A.mT).to(DT).requires_grad_()  # (G, 8, 8) rotations
    dy = torch.randn(B, T, H * D, device=DEV, dtype=DT)
    ops_ = {
        "triton kernel (ours)": lambda: ops.so8_rotate(x, R),
        'einsum("...ni,nij->...nj")': lambda: torch.einsum("...ni,nij->...nj", x.view(B, T, G, 8), R).reshape(B, T, -1),
        "(x.view(B,T,G,1,8) @ R)": lambda: (x.view(B, T, G, 1, 8) @ R).view(B, T, H * D),
    }
    rows = []
    for name, rot in ops_.items():
        f = ms(rot, rep)
        fb = ms(lambda: torch.autograd.grad(rot(), (x, R), dy), rep)
        rows.append((name, f, fb))
    floor_ms = 2 * x.numel() * x.element_size() / 3.0e12 * 1e3  # fwd: read x + write y at ~3 TB/s
    return rows, floor_ms


def _sdpa_priority() -> str:
    try:
        order = torch._C._get_sdp_priority_order()
        return ", ".join(SDPBackend(i).name for i in order)
    except Exception as e:  # private API: report, do not fail the benchmark
        return f"unknown ({type(e).__name__})"


def fmt(x, spec="{:.3f}"):
    return "n/a" if x is None else spec.format(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/attention_h100.md")
    ap.add_argument("--rep", type=int, default=200, help="ms of repeated timing per measurement")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--quick", action="store_true", help="first shape and the packed batch only")
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny sizes: test the script")
    args = ap.parse_args()
    H, total, lo, hi = 32, 16384, 64, 4096
    shapes = [(4, 2048, 96), (1, 8192, 96), (1, 16384, 96), (4, 2048, 128)]
    if args.quick:
        shapes = shapes[:1]
    if SMOKE:
        H, total, lo, hi, shapes, args.no_flex = 2, 300, 16, 128, [(1, 40, 96), (1, 33, 128)], True
    import triton

    props = None if SMOKE else torch.cuda.get_device_properties(0)
    gpu = "CPU (smoke test)" if SMOKE else f"{props.name} ({props.multi_processor_count} SMs)"
    lines = [f"# Attention kernels on {gpu}", "",
             f"torch {torch.__version__}, triton {triton.__version__}, bf16, causal, H={H}; median of "
             f"do_bench over {args.rep} ms; TFLOP/s with causal FLOPs halved; peak = extra MiB of one fwd+bwd; "
             "err = max |out - cuDNN out|.", "",
             f"torch's SDPA priority order here: {_sdpa_priority()}.", ""]

    def flush():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    lines += ["| shape | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak MiB | err | wall s |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    first_fb = {}  # backend -> fwd+bwd ms at the first shape (to size the rotation against)
    for B, T, D in shapes:
        flops = 4 * B * H * T * T * D / 2
        for name, f, fb, mem, err, wall in dense_rows(B, T, H, D, args.rep, not args.no_flex):
            if (B, T, D) == shapes[0]:
                first_fb[name] = fb
            tf = None if f is None else flops / f * 1e-9
            tfb = None if fb is None else 3.5 * flops / fb * 1e-9
            e = err if isinstance(err, str) else f"{err:.1e}"
            lines.append(f"| B{B} S{T} D{D} | {name} | {fmt(f)} | {fmt(tf, '{:.0f}')} | {fmt(fb)} | "
                         f"{fmt(tfb, '{:.0f}')} | {fmt(mem, '{:.0f}')} | {e} | {wall:.0f} |")
            print(lines[-1], flush=True)
        flush()

    lens, rows = packed_rows(H, 96, total, lo, hi, args.rep, not args.no_flex)
    n, L = len(lens), max(lens)
    lines += ["", f"## Packed batch: {n} sequences, {sum(lens)} tokens, lengths {sorted(lens)} "
              f"(log-uniform {lo}..{hi}, seed 0), H{H} D96 causal", "",
              f"Padded: {n} x {L} = {n * L} token slots ({100 * (1 - sum(lens) / (n * L)):.0f}% padding); causal "
              f"attention FLOPs padded / packed = {n * L * L / sum(x * x for x in lens):.2f}.", "",
              "| method | fwd ms | fwd+bwd ms | tokens/s (fwd+bwd) | peak MiB |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, f, fb, tps, mem in rows:
        lines.append(f"| {name} | {fmt(f)} | {fmt(fb)} | {fmt(tps, '{:,.0f}')} | "
                     f"{mem if isinstance(mem, str) else fmt(mem, '{:.0f}')} |")
        print(lines[-1], flush=True)
    flush()

    rot_rows, floor_ms = rotation_rows(*((1, 40) if SMOKE else (4, 2048)), H, 96, args.rep)
    lines += ["", f"## SO(8) output rotation as a separate op, H{H} D96 at the first shape", "",
              f"Memory-bound floor of the forward (read x + write y at 3 TB/s): {floor_ms:.3f} ms; fwd+bwd "
              "(dx = dy R^T, dR = sum x^T dy) about 3x that.", "",
              "| op | fwd ms | fwd+bwd ms |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {f:.3f} | {fb:.3f} |" for name, f, fb in rot_rows]
    for rot_name, _, rot_fb in rot_rows[:2]:
        for be in ("triton (ours)", "sdpa-cudnn"):
            if first_fb.get(be):
                lines.append(f"\nRotation ({rot_name}) fwd+bwd = {100 * rot_fb / first_fb[be]:.1f}% of {be} "
                             "attention fwd+bwd at this shape.")
    print("\n".join(lines[-len(rot_rows) - 12:]), flush=True)
    flush()

    try:  # which configs the autotuner picked
        import so8t_hf.ops.flash_attention as fa
        import so8t_hf.ops.flash_attention_bwd as fb_mod

        lines += ["", "## Autotuned configs", ""]
        for kname, kern in (("fwd", fa._fwd_tuned), ("dkdv", fb_mod._dkdv_tuned), ("dq", fb_mod._dq_tuned)):
            for key, cfg in getattr(kern, "cache", {}).items():
                lines.append(f"- {kname} {key[:7]}: {cfg}")
        lines += ["", "## Compiled variants (registers / spills)", ""]
        for kern in (fa._attn_fwd_kernel, fb_mod._attn_bwd_dkdv_kernel, fb_mod._attn_bwd_dq_kernel):
            for cache in getattr(kern, "device_caches", {}).values():
                for ck in cache[0].values():
                    md = ck.metadata
                    consts = {k: v for k, v in getattr(getattr(ck, "src", None), "constants", {}).items()
                              if isinstance(k, str) and k.isupper()}
                    lines.append(f"- {md.name}: regs {ck.n_regs}, spills {ck.n_spills}, warps {md.num_warps}, "
                                 f"stages {md.num_stages}, smem {md.shared} {consts}")
    except Exception as e:  # pragma: no cover
        lines.append(f"(autotune cache / compiled variants unavailable: {type(e).__name__}: {e})")
    flush()
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
