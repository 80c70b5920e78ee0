"""`so8t-hf export`: merge LoRA (optional) and the SO(8) rotations into a plain Phi-3 checkpoint."""

from __future__ import annotations

import argparse

from so8t_hf.inference.loader import DTYPE_NAMES


def cmd_export(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from so8t_hf.inference.loader import resolve_dtype
    from so8t_hf.rotation import merge_so8t_rotations

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=resolve_dtype(args.dtype), trust_remote_code=True)
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


def add_subparser(subparsers) -> None:
    export = subparsers.add_parser("export", help="merge LoRA and SO(8) rotations into a plain Phi-3 checkpoint")
    export.add_argument("--model", required=True, help="SO8T-Phi3 checkpoint dir (or the adapter's base model)")
    export.add_argument("--adapter", help="PEFT adapter dir to merge first (LoRA + SO(8) params)")
    export.add_argument("--output", required=True, help="where to write the plain Phi3ForCausalLM")
    export.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="weights dtype (bfloat16)")
    export.set_defaults(func=cmd_export)
