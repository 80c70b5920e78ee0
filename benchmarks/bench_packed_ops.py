"""The two per-layer steps of a packed Phi-3.5 training layer that issue 21 changed, timed forward + backward on the
GPU, side by side: (1) the q / k / v split with RoPE, so8t_hf's one-pass op against the unfused path (strided views,
Liger's or transformers' RoPE, the layout copies that attention needs; its backward adds three slice gradients);
(2) packed causal attention through each backend `auto` may choose (PyTorch's varlen_attn, our Triton kernel,
flash-attn 4 where it is usable), on packs of the benchmark's length mix and on one long sequence.

    python benchmarks/bench_packed_ops.py --out $OUT/packed_ops_h100.md   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import so8t_hf  # noqa: E402,F401  (registers so8t::qkv_rope)
from so8t_hf.integrations import attention  # noqa: E402
from so8t_hf.integrations.flash_backends import flash_build_status  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 32, 96  # Phi-3.5-mini


def _unfused_qkv(qkv, cos, sin):
    from transformers.models.phi3 import modeling_phi3

    shape = (*qkv.shape[:-1], -1, HEAD_DIM)
    qc, kc = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    q = qkv[..., :qc].view(shape).transpose(1, 2)
    k = qkv[..., qc:qc + kc].view(shape).transpose(1, 2)
    v = qkv[..., qc + kc:].view(shape).transpose(1, 2)
    q, k = modeling_phi3.apply_rotary_pos_emb(q, k, cos, sin)
    # the layout that the varlen backends take: (B*T, H, D) contiguous
    return [t.transpose(1, 2).reshape(-1, t.shape[1], HEAD_DIM).contiguous() for t in (q, k, v)]


def _fused_qkv(qkv, cos, sin):
    return [t.reshape(-1, t.shape[2], HEAD_DIM) for t in torch.ops.so8t.qkv_rope(qkv, cos, sin, HEADS, KV_HEADS, HEAD_DIM)]


def _fwd_bwd_ms(fn, inputs, grads):
    def step():
        outs = fn(*inputs)
        torch.autograd.backward(outs, grads)
        for t in inputs:
            t.grad = None

    return do_bench(step, warmup=25, rep=200)


def bench_qkv(tokens: int, liger: bool) -> dict:
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_phi3

        apply_liger_kernel_to_phi3(rope=True, rms_norm=False, swiglu=False, cross_entropy=False,
                                   fused_linear_cross_entropy=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(1, tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    angles = torch.arange(tokens, device="cuda")[:, None] * torch.rand(HEAD_DIM // 2, device="cuda", generator=g)
    cos, sin = (torch.cat([f(angles)] * 2, -1)[None].bfloat16() for f in (torch.cos, torch.sin))
    qkv.requires_grad_()
    grads = [torch.randn(tokens, h, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
             for h in (HEADS, KV_HEADS, KV_HEADS)]
    unfused = _fwd_bwd_ms(lambda x: _unfused_qkv(x, cos, sin), [qkv], grads)
    fused = _fwd_bwd_ms(lambda x: _fused_qkv(x, cos, sin), [qkv], grads)
    bytes_floor = 4 * qkv.numel() * 2  # read qkv + write q/k/v, read dq/dk/dv + write dqkv
    return {"tokens": tokens, "unfused_ms": round(unfused, 3), "fused_ms": round(fused, 3),
            "speedup": round(unfused / fused, 2), "fused_gb_per_s": round(bytes_floor / fused / 1e6, 1),
            "rope": "liger" if liger else "transformers"}


def bench_attention(lengths: list[int]) -> dict:
    tokens = sum(lengths)
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(1, KV_HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
            .requires_grad_() for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    varlen = (cu, max(lengths))
    grad = torch.randn(1, tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    row = {"tokens": tokens, "sequences": len(lengths), "mean_length": round(tokens / len(lengths))}
    backends = ["torch_varlen", "triton"] + [b for b in ("flash_attn_3", "flash_attn_4") if flash_build_status(b)[0]]
    for name in backends:
        forward = attention._BACKEND_FORWARD[name]
        try:
            row[f"{name}_ms"] = round(_fwd_bwd_ms(
                lambda a, b, c: forward(a, b, c, HEAD_DIM**-0.5, None, None, 0.0, varlen), [q, k, v], [grad]), 3)
        except Exception as err:  # recorded, not hidden
            row[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="markdown file; a .json beside it")
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192])
    a = ap.parse_args()
    dev = torch.cuda.get_device_name()
    rows_qkv = []
    for tokens in a.tokens:
        rows_qkv.append(bench_qkv(tokens, liger=False))
    try:
        for tokens in a.tokens:
            rows_qkv.append(bench_qkv(tokens, liger=True))
    except ImportError as err:
        print(f"liger-kernel not installed ({err}): transformers' RoPE only")
    gen = torch.Generator().manual_seed(0)
    rows_attn = []
    for tokens in a.tokens:
        mix = []
        while sum(mix) < tokens:
            mix.append(int(torch.randint(121, 609, (1,), generator=gen)))
        mix[-1] -= sum(mix) - tokens
        rows_attn += [bench_attention(mix), bench_attention([tokens])]
    fa4 = flash_build_status("flash_attn_4")
    lines = [f"# Packed layer ops, fwd + bwd ({dev})", "",
             f"torch {torch.__version__}; flash_attn_4: {'usable' if fa4[0] else 'not offered'} ({fa4[1]}). "
             "Median ms of triton.testing.do_bench (200 ms of repeats), bf16, Phi-3.5-mini heads (32 / 32 x 96).", "",
             "## q / k / v split + RoPE (+ the layout copies; backward: the qkv gradient)", "",
             "| tokens | RoPE of the unfused path | unfused ms | so8t::qkv_rope ms | speedup | fused GB/s |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['tokens']} | {r['rope']} | {r['unfused_ms']} | {r['fused_ms']} | {r['speedup']}x | "
              f"{r['fused_gb_per_s']} |" for r in rows_qkv]
    names = sorted({k[:-3] for r in rows_attn for k in r if k.endswith("_ms")})
    lines += ["", "## Packed causal attention (varlen), fwd + bwd ms", "",
              "| tokens | sequences | mean length | " + " | ".join(names) + " |",
              "| ---: | ---: | ---: |" + " ---: |" * len(names)]
    lines += [f"| {r['tokens']} | {r['sequences']} | {r['mean_length']} | "
              + " | ".join(str(r.get(f"{n}_ms", r.get(f"{n}_error", "-"))) for n in names) + " |" for r in rows_attn]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump({"device": dev, "torch": torch.__version__, "flash_attn_4": fa4, "qkv_rope": rows_qkv,
                   "attention": rows_attn, "command": " ".join(sys.argv)}, f, indent=1)


if __name__ == "__main__":
    main()
