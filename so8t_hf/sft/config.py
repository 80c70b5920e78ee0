"""Configuration of the thinking-SFT recipe and its one parser.

Three dataclasses, parsed together by `make_parser()` (TRL's `TrlParser`): YAML keys equal field names
(`--config file.yaml`), command-line flags override the YAML, unknown keys fail.

- `SO8TModelConfig`: TRL's `ModelConfig` (same names: `use_peft`, `lora_r`, `lora_target_modules`,
  `load_in_4bit`, `dtype`, ...) with SO8T defaults, plus what is ours: `so8t_layers`, `so8t_attn_backend`,
  and the shape of the `tiny` demo model.
- `ThinkingDataConfig`: the data and the thinking format (files, tag preset, loss mask, bad rows,
  truncation, evaluation rows).
- `SO8TConfig` (`so8t_hf.training`): TRL's `SFTConfig` plus the SO8T training settings.

`make_parser()` also refuses, at parse time and with the reason, TRL settings that the recipe would otherwise
ignore: `assistant_only_loss` / `completion_only_loss` (the recipe sets the labels itself from `loss_mask`),
`chat_template_path` (the recipe trains and saves its own thinking chat template), TRL's text-dataset settings
(`dataset_text_field`, `dataset_kwargs`, `eos_token`, `truncation_mode: keep_end`), `model_init_kwargs`,
`trust_remote_code`, `router_aux_loss_coef`, `lora_target_parameters` and `lora_task_type`; see
`check_recipe_args`. `resume_from_checkpoint: true` means the latest checkpoint (`resume_target`).

Renamed fields (0.1 names) keep working as deprecated aliases: `use_lora` -> `use_peft`,
`quantization_bits: 4 | 8` -> `load_in_4bit` (with nested quantisation) / `load_in_8bit`; and
`tag_preset` moved from the model to the data config.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser

from so8t_hf.inference.loader import DTYPE_NAMES
from so8t_hf.modeling.configuration_so8t_phi3 import (
    SO8T_ATTN_BACKENDS,
    normalize_so8t_layers,
)
from so8t_hf.thinking.chat_template import LOSS_MODES
from so8t_hf.thinking.format import TAG_PRESETS, get_tag_preset
from so8t_hf.training.config import SO8TConfig
from so8t_hf.training.peft_setup import PHI3_LORA_TARGETS

__all__ = ["TINY_MODEL", "SO8TModelConfig", "ThinkingDataConfig", "check_recipe_args", "make_parser",
           "resume_target"]

TINY_MODEL = "tiny"


def _check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}.")


@dataclass
class SO8TModelConfig(ModelConfig):
    """TRL's `ModelConfig` with SO8T defaults and fields.

    Args:
        model_name_or_path (`str`, defaults to `"tiny"`): a Phi-3 / Phi-3.5 / SO8T-Phi3 checkpoint (folder or Hub
            id), loaded as SO8T-Phi3 with identity rotations; `tiny` builds a tiny random SO8T-Phi3 with the
            shipped tiny tokenizer (CPU demo, offline).
        so8t_layers (`list[str]`, defaults to `["all"]`): the SO8T layers, `all` or a list of indices
            (YAML `[0, 1]`, flags `--so8t_layers 0 1`).
        so8t_attn_backend (`str`, defaults to `"auto"`): backend of `attn_implementation="so8t"`.
        use_peft (`bool`, defaults to `True`): LoRA adapters (plus the SO(8) rotations); false trains every weight.

    Example:
        ```python
        from so8t_hf.sft import make_parser

        model_args, data_args, training_args = make_parser().parse_args_and_config(
            ["--config", "recipes/configs/tiny.yaml", "--max_steps", "10"]
        )
        ```
    """

    model_name_or_path: str = field(
        default=TINY_MODEL,
        metadata={"help": "Phi-3 / Phi-3.5 / SO8T-Phi3 checkpoint (folder or Hub id), or 'tiny': a tiny random "
                          "SO8T-Phi3 with the shipped tiny tokenizer (CPU demo, offline)."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype: auto (bfloat16 on a GPU that supports it, else float32), bfloat16, "
                          "float16, float32.", "choices": list(DTYPE_NAMES)},
    )
    attn_implementation: str = field(
        default="so8t", metadata={"help": "Attention implementation: so8t (the project's backends), sdpa, eager, ..."}
    )
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters (+ SO(8)); false = full fine-tuning."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: list(PHI3_LORA_TARGETS),
        metadata={"help": "LoRA targets (Phi-3's fused names: qkv_proj, o_proj, gate_up_proj, down_proj), or "
                          "all-linear."},
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained and saved whole beside LoRA (e.g. embed_tokens lm_head); 'none' empties a "
                          "list the YAML set.", "nargs": "+"},
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer; default: the model's."})
    hub_base_model: str | None = field(
        default=None,
        metadata={"help": "Hub id of the base model (e.g. microsoft/Phi-3.5-mini-instruct) when model_name_or_path is "
                          "a local folder: written as base_model in the model cards and as base_model_name_or_path in "
                          "adapter/adapter_config.json (a local path loads nowhere else)."},
    )
    so8t_layers: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={"help": "SO8T layers: 'all' or layer indices (YAML: [0, 1]; flags: --so8t_layers 0 1).",
                  "nargs": "+"},
    )
    so8t_attn_backend: str = field(
        default="auto", metadata={"help": "Backend of the so8t attention.", "choices": list(SO8T_ATTN_BACKENDS)}
    )
    tiny_hidden_size: int = field(default=128, metadata={"help": "Tiny model: hidden size."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Tiny model: decoder layers."})
    tiny_num_heads: int = field(default=4, metadata={"help": "Tiny model: attention heads."})
    tiny_num_kv_heads: int = field(default=2, metadata={"help": "Tiny model: key/value heads (GQA)."})
    tiny_intermediate_size: int = field(default=256, metadata={"help": "Tiny model: MLP width."})
    use_lora: bool | None = field(default=None, metadata={"help": "Deprecated alias of use_peft."})
    quantization_bits: int | None = field(
        default=None, metadata={"help": "Deprecated: 4 = load_in_4bit + use_bnb_nested_quant, 8 = load_in_8bit."}
    )

    def __post_init__(self):
        if self.use_lora is not None:
            warnings.warn("use_lora is deprecated: use use_peft (TRL's ModelConfig name).", FutureWarning, stacklevel=3)
            self.use_peft = self.use_lora
        if self.quantization_bits:
            warnings.warn("quantization_bits is deprecated: use load_in_4bit (+ use_bnb_nested_quant) or load_in_8bit.",
                          FutureWarning, stacklevel=3)
            _check_choice("SO8TModelConfig", "quantization_bits", self.quantization_bits, (0, 4, 8))
            self.load_in_4bit, self.load_in_8bit = self.quantization_bits == 4, self.quantization_bits == 8
            self.use_bnb_nested_quant = self.use_bnb_nested_quant or self.load_in_4bit
        self.use_lora = self.quantization_bits = None
        if self.lora_modules_to_save is not None and [m.lower() for m in self.lora_modules_to_save] in (["none"], [""]):
            self.lora_modules_to_save = []  # `--lora_modules_to_save none`: empty a list the YAML set
        super().__post_init__()
        self.so8t_layers = normalize_so8t_layers(self.so8t_layers)
        _check_choice("SO8TModelConfig", "dtype", self.dtype, DTYPE_NAMES)
        _check_choice("SO8TModelConfig", "so8t_attn_backend", self.so8t_attn_backend, SO8T_ATTN_BACKENDS)

    @property
    def quantized(self) -> bool:
        return bool(self.load_in_4bit or self.load_in_8bit)


@dataclass
class ThinkingDataConfig:
    """The thinking-SFT data: where it is, its tag set, and how it becomes training examples.

    Args:
        dataset_path (`list[str]`): JSONL / JSON / Parquet files (JSON kinds also .gz/.bz2/.xz), folders (read
            recursively) or globs; relative to the current directory, except that `data/sample` falls back to the
            sample of the so8t_hf source checkout (logged).
        tag_preset (`str`): the thinking tag set, `default` or `reasoning4`.
        loss_mask (`str`): loss on the `assistant` turns (default), the `final_only` blocks, or `all` tokens.
        reasoning_section (`str`, *optional*): the section that receives free-text reasoning (`reasoning_content`,
            `<think>...</think>` answers); the other sections are rendered empty. Default: the tag set's first.
        drop_earlier_thinking (`bool`, defaults to `True`): earlier assistant turns of multi-turn rows keep only
            their final text, as `so8t-hf chat` and the server keep history, and are context, not targets.
        max_decompressed_mb (`float`, *optional*, defaults to `1024`): the most a compressed data file may
            decompress to (a compression bomb stops there); null for no cap.
    """

    dataset_path: list[str] = field(
        default_factory=lambda: ["data/sample"],
        metadata={"help": "JSONL / JSON / Parquet files (JSON also .gz/.bz2/.xz), folders (recursive) or globs; "
                          "relative to the current directory ('data/sample' falls back to the bundled sample)."},
    )
    tag_preset: str = field(default="default", metadata={"help": "Thinking tag preset.", "choices": list(TAG_PRESETS)})
    reasoning_section: str | None = field(
        default=None,
        metadata={"help": "Section that receives free-text reasoning (reasoning_content, <think>...</think> answers); "
                          "the others are rendered empty. Default: the tag set's first section (task)."},
    )
    drop_earlier_thinking: bool = field(
        default=True,
        metadata={"help": "Earlier assistant turns keep only their final text, as chat and the server keep history "
                          "(context, not targets); false keeps and trains their thinking."},
    )
    max_decompressed_mb: float | None = field(
        default=1024,
        metadata={"help": "The most a compressed data file (.gz/.bz2/.xz) may decompress to, in MB; null: no cap."},
    )
    on_bad_rows: str = field(
        default="error",
        metadata={"help": "Bad rows: 'error' (list them all) or 'skip' (report).", "choices": ["error", "skip"]},
    )
    on_truncated: str = field(
        default="drop",
        metadata={"help": "Rows whose </final> max_length would cut: 'drop' (reported) or 'error'.",
                  "choices": ["drop", "error"]},
    )
    loss_mask: str = field(
        default="assistant", metadata={"help": "Loss on: assistant, final_only, all.", "choices": list(LOSS_MODES)}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System message for rows without one."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of rows held out for evaluation (0 = none)."})
    eval_generation_rows: int = field(default=8, metadata={"help": "Eval rows generated on for the thinking metrics."})
    eval_max_new_tokens: int = field(default=128, metadata={"help": "Generation length for the thinking metrics."})

    def __post_init__(self):
        if isinstance(self.dataset_path, str):
            self.dataset_path = [self.dataset_path]
        _check_choice("ThinkingDataConfig", "tag_preset", self.tag_preset, TAG_PRESETS)
        _check_choice("ThinkingDataConfig", "on_bad_rows", self.on_bad_rows, ("error", "skip"))
        _check_choice("ThinkingDataConfig", "on_truncated", self.on_truncated, ("drop", "error"))
        _check_choice("ThinkingDataConfig", "loss_mask", self.loss_mask, LOSS_MODES)
        if self.reasoning_section is not None:
            keys = get_tag_preset(self.tag_preset).keys
            _check_choice("ThinkingDataConfig", "reasoning_section", self.reasoning_section, keys)


REFUSED_TRAINING_ARGS = {
    "assistant_only_loss": "the thinking recipe tokenises the rows itself and sets the labels from loss_mask; "
                           "loss_mask: assistant (the default) trains what assistant_only_loss would (each assistant "
                           "turn with thinking, <|end|> included). Remove it, or choose another loss_mask.",
    "completion_only_loss": "the thinking recipe tokenises the rows itself and sets the labels from loss_mask "
                            "(assistant, final_only or all). Remove it, or choose loss_mask.",
    "chat_template_path": "the thinking recipe renders every row with its Phi-3 thinking template "
                          "(so8t_hf.thinking.chat_template), from whose role and tag tokens the loss labels and the "
                          "stop rules are computed, and saves that template with the model; another template would "
                          "train one format and ship another. Remove it.",
}


# TRL fields the recipe would ignore: name -> (the values it honours, why). The recipe builds the model, tokenises the
# rows itself with its chat template and passes TRL a tokenised dataset, so TRL's text-dataset settings do nothing.
IGNORED_TRL_ARGS = {
    "dataset_text_field": (("text",), "the recipe reads messages, prompt/completion and instruction/output rows itself "
                                      "(see dataset_path) and tokenises them with its chat template; no text column "
                                      "is read. Remove it"),
    "dataset_kwargs": ((None,), "the recipe hands TRL a dataset it has already tokenised; TRL's dataset preparation "
                                "does not run. Remove it"),
    "eos_token": ((None,), "the thinking chat template ends every assistant turn with <|end|>, which is what the model "
                           "learns to stop at; TRL's eos_token only applies when TRL tokenises. Remove it"),
    "model_init_kwargs": ((None,), "the recipe loads the model itself from the SO8TModelConfig fields (dtype, "
                                   "attn_implementation, model_revision, load_in_4bit, ...). Use those instead"),
    "trust_remote_code": ((False,), "the recipe loads the base as SO8T-Phi3 with so8t_hf's own code; a base's remote "
                                    "code is never run. Remove it"),
    "router_aux_loss_coef": ((None,), "Phi-3 has no mixture-of-experts router. Remove it"),
    "truncation_mode": (("keep_start",), "the recipe's truncation check (on_truncated, truncation_report.json) drops "
                                         "the rows whose end max_length would cut; keep_end would cut their prompts "
                                         "unchecked instead. Remove it, or raise max_length"),
}
IGNORED_MODEL_ARGS = {
    "lora_target_parameters": ((None,), "the recipe's LoRA targets modules (lora_target_modules); Phi-3 has no "
                                        "parameter-only (expert) weights to target. Remove it"),
    "lora_task_type": (("CAUSAL_LM",), "the recipe trains causal-LM adapters only. Remove it"),
}


def check_recipe_args(model_args: SO8TModelConfig, data_args: ThinkingDataConfig, training_args: SO8TConfig) -> None:
    """Refuse settings the recipe cannot honour (`REFUSED_TRAINING_ARGS`, `IGNORED_TRL_ARGS`, `IGNORED_MODEL_ARGS`)
    before anything is built: each is named, with the reason and what to do."""
    for name, reason in REFUSED_TRAINING_ARGS.items():
        value = getattr(training_args, name, None)
        if value not in (None, False):
            raise ValueError(f"{name}={value!r} is not supported by the thinking-SFT recipe: {reason}")
    for args, table in ((training_args, IGNORED_TRL_ARGS), (model_args, IGNORED_MODEL_ARGS)):
        for name, (honoured, reason) in table.items():
            value = getattr(args, name, None)
            if hasattr(args, name) and value not in honoured:
                raise ValueError(f"{name}={value!r} is not supported by the thinking-SFT recipe (it would be ignored): "
                                 f"{reason}.")


DATACLASS_TYPES = (SO8TModelConfig, ThinkingDataConfig, SO8TConfig)


class RecipeParser(TrlParser):
    """`TrlParser` over the three configs that also runs `check_recipe_args` on what it parsed, and lists `--config`
    in `--help` (TrlParser reads it before parsing)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS, help="recipe YAML (e.g. recipes/configs/tiny.yaml): its keys are "
                                                           "the field names below; flags override it")

    def parse_args_and_config(self, args=None, *rest, **kwargs):
        import sys

        args = list(sys.argv[1:] if args is None else args)
        for i, arg in enumerate(args):  # TrlParser only pops `--config PATH`
            if arg.startswith("--config="):
                args[i : i + 1] = ["--config", arg.split("=", 1)[1]]
                break
        parsed = super().parse_args_and_config(args, *rest, **kwargs)
        check_recipe_args(*parsed[:3])
        return parsed


def make_parser(subparsers=None, prog: str | None = None) -> TrlParser:
    """The recipe's parser (as TRL's scripts make theirs): a `RecipeParser` over the three configs, or a `train`
    subcommand of `subparsers` (a `TrlParser`'s) when given. `parse_args_and_config(argv)` returns
    `(SO8TModelConfig, ThinkingDataConfig, SO8TConfig)`; `run_thinking_sft` runs `check_recipe_args` again."""
    if subparsers is not None:
        return subparsers.add_parser("train", help="thinking SFT", dataclass_types=DATACLASS_TYPES)
    return RecipeParser(DATACLASS_TYPES, prog=prog)


def resume_target(value):
    """`resume_from_checkpoint` as `Trainer.train` takes it: `true` (any case, or yes / 1) is True (the latest
    checkpoint in output_dir, as transformers and TRL read it), `false` / `no` / `0` / `none` is None, a path stays."""
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "none", ""):
        return None
    return value
