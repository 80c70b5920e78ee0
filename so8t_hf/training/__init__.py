"""Training: `SO8TTrainer` and `SO8TConfig`, LoRA / QLoRA set-up with the SO(8) parameters, the PET term,
and the thinking-metrics evaluation callback."""

from so8t_hf.training.config import LossHasNoGraphError, SO8TConfig
from so8t_hf.training.peft_setup import default_lora_config
from so8t_hf.training.trainer import SO8TTrainer

__all__ = ["LossHasNoGraphError", "SO8TConfig", "SO8TTrainer", "default_lora_config"]
