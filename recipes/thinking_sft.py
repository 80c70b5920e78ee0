"""Thinking SFT of SO8T-Phi3: config -> build -> train -> evaluate -> save.

    accelerate launch recipes/thinking_sft.py --config recipes/configs/tiny.yaml

YAML keys are the dataclass field names (see --help); flags override the YAML; unknown keys fail.
"""

import sys

from trl import TrlParser

from so8t_hf.sft import run_thinking_sft
from so8t_hf.sft_config import DataArguments, ModelArguments
from so8t_hf.trainer import SO8TConfig


def main(argv=None) -> dict:
    parser = TrlParser((ModelArguments, DataArguments, SO8TConfig))
    model_args, data_args, training_args = parser.parse_args_and_config(argv)
    metrics = run_thinking_sft(model_args, data_args, training_args)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
