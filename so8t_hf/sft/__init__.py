"""The thinking-SFT job: its configs and parser (`config`), the pipeline from data to saved model
(`pipeline`) and the run reports (`reporting`); publishing is `so8t_hf.hub`."""

from so8t_hf.sft.config import SO8TModelConfig, ThinkingDataConfig, make_parser
from so8t_hf.sft.pipeline import run_thinking_sft, setup_logging

__all__ = ["SO8TModelConfig", "ThinkingDataConfig", "make_parser", "run_thinking_sft", "setup_logging"]
