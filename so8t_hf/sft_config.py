"""Configuration dataclasses of the thinking-SFT recipe (model, data); training uses `SO8TConfig`.

YAML keys equal field names, command-line flags override the YAML, unknown keys fail (`trl.TrlParser`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .peft_utils import PHI3_LORA_TARGETS

TINY_MODEL = "tiny"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=TINY_MODEL,
        metadata={"help": "Phi-3 / Phi-3.5 / SO8T-Phi3 checkpoint (dir or Hub id), or 'tiny' for a tiny random "
                          "SO8T-Phi3 with the shipped tiny tokenizer (CPU demo, offline)."},
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer; default: the model's."})
    so8t_layers: str = field(default="all", metadata={"help": "SO8T layers: 'all' or comma-separated indices."})
    attn_implementation: str = field(default="so8t", metadata={"help": "Attention implementation ('so8t', 'sdpa', ...)."})
    so8t_attn_backend: str = field(
        default="auto", metadata={"help": "Backend of the so8t attention: auto, flash_attn, triton, sdpa, chunked, eager."}
    )
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto (bf16 on a bf16 GPU, else fp32), bfloat16, float32."})
    quantization_bits: int = field(default=0, metadata={"help": "QLoRA: 4 (NF4) or 8 bit base weights; 0 = off (GPU only)."})
    tag_preset: str = field(default="default", metadata={"help": "Thinking tag preset: default or reasoning4."})
    use_lora: bool = field(default=True, metadata={"help": "Train LoRA adapters (+ SO(8)); false = full fine-tuning."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(PHI3_LORA_TARGETS), metadata={"help": "LoRA targets (Phi-3's fused names)."}
    )
    lora_modules_to_save: list[str] = field(
        default_factory=list, metadata={"help": "Extra modules trained in full and saved with the adapter."}
    )
    tiny_hidden_size: int = field(default=128, metadata={"help": "Tiny model: hidden size."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Tiny model: decoder layers."})
    tiny_num_heads: int = field(default=4, metadata={"help": "Tiny model: attention heads."})
    tiny_num_kv_heads: int = field(default=2, metadata={"help": "Tiny model: key/value heads (GQA)."})
    tiny_intermediate_size: int = field(default=256, metadata={"help": "Tiny model: MLP width."})


@dataclass
class DataArguments:
    dataset_path: list[str] = field(
        default_factory=lambda: ["data/sample"], metadata={"help": "JSONL / JSON / Parquet files, folders or globs."}
    )
    on_bad_rows: str = field(default="error", metadata={"help": "Bad rows: 'error' (list them all) or 'skip' (report)."})
    on_truncated: str = field(
        default="drop", metadata={"help": "Rows whose </final> max_length would cut: 'drop' (reported) or 'error'."}
    )
    loss_mask: str = field(default="assistant", metadata={"help": "Loss on: assistant (default), final_only, all."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message for rows without one."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of rows held out for evaluation (0 = none)."})
    eval_generation_rows: int = field(default=8, metadata={"help": "Eval rows generated on for the thinking metrics."})
    eval_max_new_tokens: int = field(default=128, metadata={"help": "Generation length for the thinking metrics."})
