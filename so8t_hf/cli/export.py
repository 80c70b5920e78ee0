"""`so8t-hf export`: merge LoRA (optional) and the SO(8) rotations into a plain Phi-3 checkpoint.

`--model` is an SO8T-Phi3 checkpoint (e.g. a run's `final/`), or with `--adapter` the adapter's base: a stock
Phi-3 or an SO8T-Phi3, loaded as SO8T-Phi3 (identity rotations where it has none) so that the adapter's trained
rotations have somewhere to go. The plain model stops generating at `<|end|>` and loads without remote code
(the final-only pipeline of an SO8T checkpoint is remote code, so it is left out).
"""

from __future__ import annotations

import argparse

from so8t_hf.inference.loader import DTYPE_NAMES


def cmd_export(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from so8t_hf.hub.checkpoint import release_stop_ids
    from so8t_hf.inference.loader import load_merged_adapter, resolve_dtype
    from so8t_hf.rotation import merge_so8t_rotations

    dtype = resolve_dtype(args.dtype)
    if args.adapter:
        model = load_merged_adapter(args.model, args.adapter, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, trust_remote_code=True)
        if not hasattr(model, "so8_rotations"):
            raise SystemExit(f"so8t-hf export: {args.model} is a {type(model).__name__}, not an SO8T-Phi3: nothing "
                             "to merge (give its adapter with --adapter, or use the model as it is)")
    plain = merge_so8t_rotations(model)
    for key in ("custom_pipelines", "auto_map"):  # remote code that the plain folder does not carry
        if hasattr(plain.config, key):
            delattr(plain.config, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.adapter or args.model)
    except (OSError, ValueError):
        tokenizer = None
        print(f"note: no tokenizer found next to {args.adapter or args.model}; copy one into {args.output}")
    if tokenizer is not None and "<|end|>" in tokenizer.get_vocab():
        plain.generation_config.eos_token_id = release_stop_ids(tokenizer, plain.generation_config.eos_token_id)
    plain.save_pretrained(args.output)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output)
    print(f"plain Phi-3 written to {args.output} (loads without trust_remote_code)")
    return 0


def add_subparser(subparsers) -> None:
    export = subparsers.add_parser("export", help="merge LoRA and SO(8) rotations into a plain Phi-3 checkpoint")
    export.add_argument("--model", required=True,
                        help="SO8T-Phi3 checkpoint dir, or with --adapter the adapter's base (stock Phi-3 or SO8T-Phi3)")
    export.add_argument("--adapter", help="PEFT adapter dir to merge first (LoRA + SO(8) params)")
    export.add_argument("--output", required=True, help="where to write the plain Phi3ForCausalLM")
    export.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="weights dtype (bfloat16)")
    export.set_defaults(func=cmd_export)
