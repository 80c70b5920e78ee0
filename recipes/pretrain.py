"""Pre-training SO8T-Phi3 from zero: config -> build -> pack -> train -> checkpoints, best/, final/.

    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain_1p5b.yaml [--max_steps 100 ...]

YAML keys are the field names of the three configs (see --help); flags override the YAML; unknown keys fail.
`so8t-hf pretrain` runs the same parser in one process; `make pretrain-test` runs the tiny config on the CPU.
"""

import logging
import sys

from accelerate import PartialState

from so8t_hf.pretrain import make_parser, run_pretrain


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_pretrain(*make_parser().parse_args_and_config(argv))
    PartialState().destroy_process_group()  # a clean exit under torchrun / accelerate (no-op in one process)
    print(summary)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
