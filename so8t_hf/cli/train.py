"""`so8t-hf train`: the thinking-SFT recipe in one process, with the recipe's own parser (`make_parser`), so
every flag of `recipes/thinking_sft.py` works here too and overrides the YAML. Several GPUs:
`accelerate launch recipes/thinking_sft.py ...`."""

from __future__ import annotations

NAME = "train"
HELP = "thinking SFT: --config recipe.yaml plus any field as a flag (see so8t-hf train --help)"


def run(argv: list[str]) -> int:
    from so8t_hf.sft import make_parser, run_thinking_sft

    from accelerate import PartialState

    run_thinking_sft(*make_parser(prog="so8t-hf train").parse_args_and_config(argv))
    PartialState().destroy_process_group()  # a clean exit under torchrun / accelerate (no-op in one process)
    return 0


def add_subparser(subparsers) -> None:
    # listed in `so8t-hf --help`; `main` hands everything after `train` to the recipe's parser
    subparsers.add_parser(NAME, help=HELP, add_help=False)
