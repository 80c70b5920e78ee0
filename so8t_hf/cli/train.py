"""`so8t-hf train`: the thinking-SFT recipe in one process, with the recipe's own parser (`make_parser`), so
every flag of `recipes/thinking_sft.py` works here too and overrides the YAML. Several GPUs:
`accelerate launch recipes/thinking_sft.py ...`."""

from __future__ import annotations

NAME = "train"
HELP = "thinking SFT: --config recipe.yaml plus any field as a flag (see so8t-hf train --help)"


def run(argv: list[str]) -> int:
    from accelerate import PartialState

    from so8t_hf.sft import make_parser, run_thinking_sft, setup_logging

    setup_logging()  # as the recipe: INFO on stderr (skipped rows, the loss fallback, ...), then --log_level
    model_args, data_args, training_args = make_parser(prog="so8t-hf train").parse_args_and_config(argv)
    setup_logging(training_args)
    run_thinking_sft(model_args, data_args, training_args)
    PartialState().destroy_process_group()  # a clean exit under torchrun / accelerate (no-op in one process)
    return 0


def add_subparser(subparsers) -> None:
    # listed in `so8t-hf --help`; `main` hands everything after `train` to the recipe's parser
    subparsers.add_parser(NAME, help=HELP, add_help=False)
