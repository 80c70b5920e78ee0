"""Pre-training SO8T-Phi3 from zero: configs and parser (`config`), packed text (`data`), the run (`pipeline`),
its callbacks (`callbacks`) and the checkpoints it leaves (`checkpoints`: the best one, completion chat)."""

from so8t_hf.pretrain.config import PretrainConfig, PretrainDataConfig, PretrainModelConfig, make_parser
from so8t_hf.pretrain.pipeline import run_pretrain

__all__ = ["PretrainConfig", "PretrainDataConfig", "PretrainModelConfig", "make_parser", "run_pretrain"]
