"""`so8t-hf env`: what this machine can run — versions, GPU, the attention backend `auto` picks and why,
and what each missing optional package costs."""

from __future__ import annotations

import importlib.metadata
import json
import platform

import torch

from so8t_hf.integrations.attention import (
    choose_backend,
    flash_attn_available,
    triton_kernel_available,
)
from so8t_hf.integrations.flash_backends import FLASH_BUILDS, flash_build_status, torch_flash_registry

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "evaluate", "safetensors",
            "triton", "flash-attn", "flash-attn-4", "bitsandbytes", "liger-kernel")

MISSING_COST = {
    "flash-attn": "auto uses the project's Triton kernel for packed rows and SDPA (cuDNN / flash) for dense "
    "batches instead; see benchmarks/results for the measured difference.",
    "triton": "no Triton kernel: packed (padding-free) rows on a GPU fall back to SDPA with a block-diagonal "
    "T x T mask (more memory, slower on long packs).",
    "bitsandbytes": "no QLoRA (4-bit NF4 / 8-bit): LoRA keeps the base in bf16 (~7.6 GB for Phi-3.5-mini "
    "instead of ~2.3 GB).",
    "liger-kernel": "no Liger fused RoPE / RMSNorm / SwiGLU kernels: a little slower and more activation memory.",
}


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_summary() -> list[str]:
    if not torch.cuda.is_available():
        return []
    rows = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        rows.append(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
                    f"bf16={'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    return rows


def auto_backend_choices() -> list[tuple[str, str, str]]:
    """(case, backend, reason) of `auto` for the batches training and generation send."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.empty(1, 1, 1, 8, device=device, dtype=dtype)
    cases = [
        ("dense causal batch", dict(has_mask=False, packed=False)),
        ("packed padding-free rows", dict(has_mask=False, packed=True)),
        ("padded batch (generation)", dict(has_mask=True, packed=False)),
    ]
    return [(case, *choose_backend("auto", q, dropout=0.0, **kw)) for case, kw in cases]


def environment_report() -> dict:
    versions = {name: package_version(name) for name in PACKAGES}
    missing = {name: MISSING_COST[name] for name in MISSING_COST if versions.get(name) is None}
    if versions.get("triton") and not triton_kernel_available():
        missing.setdefault("triton", "triton is installed but there is no CUDA GPU: the kernel runs only in tests "
                                     "(TRITON_INTERPRET=1).")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "gpus": gpu_summary(),
        "flash_attn_usable": flash_attn_available(),
        "flash_builds": {name: dict(zip(("usable", "why"), flash_build_status(name))) for name in FLASH_BUILDS},
        "torch_flash_registry": torch_flash_registry(),
        "triton_kernel_usable": triton_kernel_available(),
        "auto_backend": auto_backend_choices(),
        "missing": missing,
    }


def format_report(report: dict) -> str:
    lines = [f"python {report['python']} on {report['platform']}", "", "packages:"]
    lines += [f"  {name:<14}{version or 'not installed'}" for name, version in report["versions"].items()]
    lines += ["", "GPUs:"] + ([f"  {g}" for g in report["gpus"]] or ["  none (CPU only: fp32 training of small models)"])
    lines += ["", "FlashAttention builds (offered to auto only if a tiny call runs here):"]
    lines += [f"  {name:<14}{'usable' if b['usable'] else 'not offered'}: {b['why']}"
              for name, b in report.get("flash_builds", {}).items()]
    lines += [f"  torch registry: {report['torch_flash_registry']}"] if "torch_flash_registry" in report else []
    lines += ["", 'attention backend chosen by so8t_attn_backend="auto":']
    lines += [f"  {case:<28}-> {backend} ({reason})" for case, backend, reason in report["auto_backend"]]
    if report["missing"]:
        lines += ["", "missing, and what it costs:"] + [f"  {name}: {cost}" for name, cost in report["missing"].items()]
    return "\n".join(lines)


def cmd_env(args) -> int:
    report = environment_report()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def add_subparser(subparsers) -> None:
    env = subparsers.add_parser("env", help="versions, GPU, chosen attention backend and what is missing")
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.set_defaults(func=cmd_env)
