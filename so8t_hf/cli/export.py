"""`so8t-hf export`: merge LoRA (optional) and the SO(8) rotations into a plain Phi-3, as a folder or one GGUF file.

`OUTPUT_DIR` is a run's output directory (its `final/` is exported), a model folder, or an adapter folder (merged
onto the base its `adapter_config.json` names). `--model` is an SO8T-Phi3 checkpoint (e.g. a run's `final/`), or
with `--adapter` the adapter's base: a stock Phi-3 or an SO8T-Phi3, loaded as SO8T-Phi3 (identity rotations where
it has none) so that the adapter's trained rotations have somewhere to go. The plain model stops generating at
`<|end|>` and loads without remote code (the final-only pipeline of an SO8T checkpoint is remote code, so it is
left out). The weights keep the dtype they were saved in (the trained model's logits, to float rounding)
unless `--dtype` says otherwise; `--format gguf` merges in float32 and writes `--quant` (`so8t_hf.export`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from so8t_hf.inference.loader import DTYPE_NAMES

logger = logging.getLogger(__name__)

SAVED = "saved"
FORMATS = ("hf", "gguf")


def saved_dtype(path: str):
    """The dtype a model folder's weights were saved in: its config's `dtype`, else its first floating tensor's."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    for file in sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []:
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                kind = getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(tensor.get_dtype(), ""), None)
                if kind is not None:
                    return kind
    logger.warning("%s names no dtype and has no float safetensors: exporting float32", path)
    return torch.float32


def resolve_source(args: argparse.Namespace) -> tuple[str, str | None]:
    """(model or base folder, adapter folder or None) from `OUTPUT_DIR` or `--model` / `--adapter`."""
    if args.output_dir and (args.model or args.adapter):
        raise SystemExit("so8t-hf export: give OUTPUT_DIR, or --model (with --adapter), not both")
    if args.model:
        return args.model, args.adapter
    if not args.output_dir:
        raise SystemExit("so8t-hf export: give a run's OUTPUT_DIR (or --model)")
    folder = Path(args.output_dir)
    if (folder / "final" / "config.json").is_file():
        return str(folder / "final"), None
    if (folder / "config.json").is_file():
        return str(folder), None
    adapter = folder / "adapter" if (folder / "adapter" / "adapter_config.json").is_file() else folder
    if (adapter / "adapter_config.json").is_file():
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise SystemExit(f"so8t-hf export: {adapter}/adapter_config.json names no base; give --model BASE "
                             f"--adapter {adapter}")
        return base, str(adapter)
    raise SystemExit(f"so8t-hf export: {folder} holds neither final/config.json, config.json nor an adapter "
                     "(adapter_config.json): give a run's output directory or a model folder")


def load_plain(model_path: str, adapter: str | None, dtype):
    """The merged plain `Phi3ForCausalLM` (LoRA and SO(8) rotations burnt in) and the tokenizer (or None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from so8t_hf.hub.checkpoint import release_stop_ids
    from so8t_hf.inference.loader import load_merged_adapter
    from so8t_hf.rotation import merge_so8t_rotations

    if adapter:
        model = load_merged_adapter(model_path, adapter, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=True)
        if not hasattr(model, "so8_rotations"):
            raise SystemExit(f"so8t-hf export: {model_path} is a {type(model).__name__}, not an SO8T-Phi3: nothing "
                             "to merge (give its adapter with --adapter, or use the model as it is)")
    plain = merge_so8t_rotations(model)
    for key in ("custom_pipelines", "auto_map"):  # remote code that the plain folder does not carry
        if hasattr(plain.config, key):
            delattr(plain.config, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(adapter or model_path)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is not None and "<|end|>" in tokenizer.get_vocab():
        plain.generation_config.eos_token_id = release_stop_ids(tokenizer, plain.generation_config.eos_token_id)
    return plain, tokenizer


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from so8t_hf.inference.loader import resolve_dtype

    if args.format == "hf" and args.quant is not None:
        raise SystemExit("so8t-hf export: --quant is for --format gguf (a folder keeps --dtype)")
    model_path, adapter = resolve_source(args)
    if args.dtype != SAVED:
        dtype = resolve_dtype(args.dtype)
    elif args.format == "gguf":
        dtype = torch.float32  # merge once in fp32, round once to the file's type
    else:
        dtype = saved_dtype(model_path)
    print(f"exporting {model_path}" + (f" + adapter {adapter}" if adapter else "") + f" in {str(dtype).split('.')[-1]}"
          + (" (the saved dtype)" if args.dtype == SAVED and args.format == "hf" else ""))
    plain, tokenizer = load_plain(model_path, adapter, dtype)
    if args.format == "gguf":
        return _write_gguf(args, plain, tokenizer, adapter or model_path)
    plain.save_pretrained(args.output)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output)
    else:
        print(f"note: no tokenizer found next to {adapter or model_path}; copy one into {args.output}")
    print(f"plain Phi-3 written to {args.output} (loads without trust_remote_code)")
    return 0


def _write_gguf(args: argparse.Namespace, plain, tokenizer, tokenizer_dir: str) -> int:
    try:
        import gguf  # noqa: F401  (the writer imports it where it writes)

        from so8t_hf.export import write_gguf
    except ImportError as err:
        raise SystemExit(f"so8t-hf export --format gguf needs the gguf package: pip install 'so8t-hf[gguf]' ({err})")
    if tokenizer is None:
        raise SystemExit(f"so8t-hf export: no tokenizer next to {tokenizer_dir}; a GGUF file carries its tokenizer")
    try:
        report = write_gguf(plain, tokenizer, args.output, args.quant or "f16", tokenizer_dir=tokenizer_dir)
    except ValueError as err:
        raise SystemExit(f"so8t-hf export: {err}")
    print(f"GGUF ({report['written_quant']}, tokenizer from {report['vocab']}) written to {report['path']}")
    if report["command"]:
        print(f"llama-quantize is not on PATH, so the file holds f16; for Q4_K_M run:\n  {report['command']}")
    return 0


def add_subparser(subparsers) -> None:
    export = subparsers.add_parser(
        "export", help="merge LoRA and SO(8) rotations into a plain Phi-3 folder or a GGUF file",
        description="Merge the LoRA and the SO(8) rotations into a plain Phi3ForCausalLM and write it as a "
                    "transformers folder (--format hf) or one GGUF file for llama.cpp / Ollama (--format gguf).",
        epilog="examples:\n  so8t-hf export outputs/run --output plain/\n"
               "  so8t-hf export outputs/run --format gguf --quant q8_0 --out run-q8_0.gguf\n"
               "  so8t-hf export --model microsoft/Phi-3.5-mini-instruct --adapter outputs/run/adapter --output plain/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("output_dir", nargs="?", metavar="OUTPUT_DIR",
                        help="a run's output directory (exports its final/), a model folder, or an adapter folder")
    export.add_argument("--model", help="instead of OUTPUT_DIR: an SO8T-Phi3 checkpoint dir, or with --adapter the "
                                        "adapter's base (stock Phi-3 or SO8T-Phi3)")
    export.add_argument("--adapter", help="PEFT adapter dir to merge first (LoRA + SO(8) params)")
    export.add_argument("--format", choices=FORMATS, default="hf",
                        help="hf: a transformers folder (default); gguf: one GGUF file (needs so8t-hf[gguf])")
    export.add_argument("--out", "--output", dest="output", metavar="PATH", required=True,
                        help="where to write: a folder (hf) or a FILE.gguf (gguf)")
    export.add_argument("--dtype", default=SAVED, choices=(SAVED, *DTYPE_NAMES),
                        help="hf weights dtype; default 'saved': the dtype the model was saved in (gguf: float32 "
                             "for the merge, then --quant)")
    export.add_argument("--quant", choices=("f16", "q8_0", "q4_k_m"), default=None,
                        help="gguf only: f16 (default), q8_0, or q4_k_m (runs llama-quantize when on PATH; otherwise "
                             "writes f16 and prints the command)")
    export.set_defaults(func=cmd_export)
