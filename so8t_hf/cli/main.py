"""`so8t-hf` entry point: one subcommand per module of this package (`serve` lives in `so8t_hf.serve`)."""

from __future__ import annotations

import argparse
import sys

from so8t_hf.cli import chat, env, export, pretrain, push, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="so8t-hf",
        description="Fine-tune Phi-3 / Phi-3.5-mini with SO(8) attention rotations and thinking SFT.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from so8t_hf.serve.cli import add_serve_subparser

    for add in (env.add_subparser, train.add_subparser, chat.add_subparser, add_serve_subparser, export.add_subparser,
                push.add_subparser, pretrain.add_subparser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == train.NAME:  # the recipe's own parser takes every flag after `train`
        return train.run(argv[1:])
    if argv and argv[0] == pretrain.NAME:  # likewise the pre-training recipe's parser after `pretrain`
        return pretrain.run(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
