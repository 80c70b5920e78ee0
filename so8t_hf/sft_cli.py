"""`so8t-hf train`: the thinking-SFT recipe from the command line (same flags and YAML as recipes/thinking_sft.py)."""

from __future__ import annotations

import argparse


def cmd_train(args: argparse.Namespace) -> int:
    from trl import TrlParser

    from .sft import run_thinking_sft
    from .sft_config import DataArguments, ModelArguments
    from .trainer import SO8TConfig

    parser = TrlParser((ModelArguments, DataArguments, SO8TConfig))
    argv = (["--config", args.config] if args.config else []) + list(args.overrides)
    run_thinking_sft(*parser.parse_args_and_config(argv))
    return 0


def add_subparser(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="thinking SFT (one process; use `accelerate launch recipes/thinking_sft.py` for several GPUs)"
    )
    train.add_argument("--config", help="recipe YAML, e.g. recipes/configs/tiny.yaml")
    train.add_argument("overrides", nargs=argparse.REMAINDER, help="--field value pairs overriding the YAML")
    train.set_defaults(func=cmd_train)
