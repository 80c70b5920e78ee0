"""`so8t-hf pretrain`: the from-scratch recipe in one process, with the recipe's own parser
(`so8t_hf.pretrain.make_parser`), so every flag of `recipes/pretrain.py` works here too and overrides the YAML.
Several GPUs: `accelerate launch recipes/pretrain.py ...`."""

from __future__ import annotations

NAME = "pretrain"
HELP = "pre-train an SO8T-Phi3 from zero: --config recipes/configs/pretrain_*.yaml plus any field as a flag"


def run(argv: list[str]) -> int:
    import logging

    from accelerate import PartialState

    from so8t_hf.pretrain import make_parser, run_pretrain

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_pretrain(*make_parser(prog="so8t-hf pretrain").parse_args_and_config(argv))
    PartialState().destroy_process_group()  # a clean exit under torchrun / accelerate (no-op in one process)
    return 0


def add_subparser(subparsers) -> None:
    # listed in `so8t-hf --help`; `main` hands everything after `pretrain` to the recipe's parser
    subparsers.add_parser(NAME, help=HELP, add_help=False)
