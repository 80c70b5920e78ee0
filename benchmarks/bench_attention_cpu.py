"""CPU side of the so8t attention choice: forward+backward time of each backend on packed (padding-free) rows
and on a dense causal batch, as `auto` meets them on a machine without a GPU.

    python benchmarks/bench_attention_cpu.py --out benchmarks/results/attention_cpu.md
"""

import argparse
import platform
import statistics
import time

import torch

from so8t_hf.integrations.attention import _BACKEND_FORWARD, choose_backend

LENGTH_MIX = [700, 300, 512, 128, 400]  # one packed row of 2040 tokens, five sequences


def segments_for(lengths):
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]


def time_backend(name, q, k, v, segments, repeats):
    times = []
    for i in range(repeats + 1):
        q.grad = k.grad = v.grad = None
        start = time.perf_counter()
        out = _BACKEND_FORWARD[name](q, k, v, q.shape[-1] ** -0.5, segments, None, 0.0)
        out.float().square().mean().backward()
        if i:  # the first run warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cases = [("packed 5 seqs, 2040 tokens", LENGTH_MIX, 1), ("packed 5 seqs x4, 8160 tokens", LENGTH_MIX * 4, 1),
             ("dense causal B2 T1024", None, 2)]
    rows = []
    for label, lengths, batch in cases:
        tokens = sum(lengths) if lengths else 1024
        segments = segments_for(lengths) if lengths else None
        q = torch.randn(batch, args.heads, tokens, args.head_dim, requires_grad=True)
        k = torch.randn(batch, args.kv_heads, tokens, args.head_dim, requires_grad=True)
        v = torch.randn(batch, args.kv_heads, tokens, args.head_dim, requires_grad=True)
        auto = choose_backend("auto", q, has_mask=False, packed=segments is not None, dropout=0.0)[0]
        for name in ("chunked", "sdpa", "eager"):
            if name == "eager" and tokens > 4096:
                rows.append((label, name, None, auto))  # (B, H, T, T) fp32 scores: too large to be sensible
                continue
            rows.append((label, name, time_backend(name, q, k, v, segments, args.repeats), auto))
    head = (f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
            f"H{args.heads} Hkv{args.kv_heads} D{args.head_dim} fp32, forward+backward, median of {args.repeats}\n\n"
            "| case | backend | ms | auto picks |\n| --- | --- | ---: | --- |\n")
    table = head + "\n".join(f"| {c} | {b} | {'skipped (T x T scores)' if t is None else f'{t * 1e3:.0f}'} | {a} |"
                             for c, b, t, a in rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# so8t attention on the CPU\n\nCommand: `python benchmarks/bench_attention_cpu.py --out "
                    "benchmarks/results/attention_cpu.md`\n\n" + table + "\n")


if __name__ == "__main__":
    main()
