"""Thinking SFT of SO8T-Phi3: config -> build -> train -> evaluate -> save.

    accelerate launch recipes/thinking_sft.py --config recipes/configs/tiny.yaml [--max_steps 20 ...]

YAML keys are the field names of the three configs (see --help); flags override the YAML; unknown keys fail.
`so8t-hf train` runs the same parser in one process.
"""

import sys

from accelerate import PartialState

from so8t_hf.sft import make_parser, run_thinking_sft, setup_logging


def main(argv=None) -> dict:
    setup_logging()  # INFO on stderr while parsing; then --log_level
    model_args, data_args, training_args = make_parser().parse_args_and_config(argv)
    setup_logging(training_args)
    metrics = run_thinking_sft(model_args, data_args, training_args)
    PartialState().destroy_process_group()  # a clean exit under torchrun / accelerate (no-op in one process)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
