"""`so8t-hf` command line: env, export, and the subcommands of the training and serving modules."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_env(args: argparse.Namespace) -> int:
    from .env_report import environment_report, format_report

    report = environment_report()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Merge LoRA (optional) and the SO(8) rotations into a plain Phi-3 checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .rotation import merge_so8t_rotations

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, trust_remote_code=True)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    plain = merge_so8t_rotations(model)
    plain.save_pretrained(args.output)
    try:
        AutoTokenizer.from_pretrained(args.adapter or args.model).save_pretrained(args.output)
    except (OSError, ValueError):
        print(f"note: no tokenizer found next to {args.adapter or args.model}; copy one into {args.output}")
    print(f"plain Phi-3 written to {args.output} (loads without trust_remote_code)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="so8t-hf",
        description="Fine-tune Phi-3 / Phi-3.5-mini with SO(8) attention rotations and thinking SFT.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    env = sub.add_parser("env", help="versions, GPU, chosen attention backend and what is missing")
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.set_defaults(func=cmd_env)

    export = sub.add_parser("export", help="merge LoRA and SO(8) rotations into a plain Phi-3 checkpoint")
    export.add_argument("--model", required=True, help="SO8T-Phi3 checkpoint dir (or the adapter's base model)")
    export.add_argument("--adapter", help="PEFT adapter dir to merge first (LoRA + SO(8) params)")
    export.add_argument("--output", required=True, help="where to write the plain Phi3ForCausalLM")
    export.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    export.set_defaults(func=cmd_export)

    from .chat import add_subparser as add_chat
    from .serve.cli import add_serve_subparser
    from .sft_cli import add_subparser as add_train

    for add in (add_train, add_chat, add_serve_subparser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
