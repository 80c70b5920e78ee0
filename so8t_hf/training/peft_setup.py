"""LoRA / QLoRA set-up for SO8T-Phi3: real Phi-3 target names, SO(8) params trained and saved with adapters.

Phi-3 fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, so Llama-style targets (`q_proj`, ...)
match nothing; a target that matches no module is an error here, never a silently untrained adapter.
The SO(8) rotations ride along as PEFT `modules_to_save`: trainable, written into
`adapter_model.safetensors`, restored by `PeftModel.from_pretrained`, and merged by `merge_and_unload`.

A base without rotations (a stock `Phi3ForCausalLM`) would take such an adapter silently and drop the trained
rotations (PEFT ignores `modules_to_save` names and state-dict keys it cannot place). So the adapter also carries
`exclude_modules` = `SO8T_BASE_GUARD` (combined with the user's): a regex that excludes the rotation modules
from LoRA targeting, a no-op on SO8T-Phi3, and whose `(?#...)` comment states the problem and the fix. On a base
without rotations stock PEFT (>= 0.21; `PeftModel.from_pretrained`, `AutoPeftModelForCausalLM`, transformers'
`load_adapter`) warns "You have passed exclude_modules=<that text> but no modules were excluded".
"""

from __future__ import annotations

import copy
import re

import torch
from peft import LoraConfig, PeftConfig

PHI3_LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
SO8_MODULE = "so8_rotation"
# A regex comment ends at the first ")", so the text has none.
SO8T_BASE_GUARD = (
    r".*\.so8_rotation(?# <- SO8T ADAPTER ON A BASE WITHOUT SO8 ROTATIONS: the trained so8_rotation weights of "
    r"this adapter were NOT loaded, so this model is NOT the trained one. Fix: load the base as SO8T-Phi3 - "
    r"get_class_from_dynamic_module with modeling_so8t_phi3.So8tPhi3ForCausalLM from the adapter's repo, or "
    r"so8t_hf.So8tPhi3ForCausalLM - then PeftModel.from_pretrained; or load the merged model at the repo root "
    r"with trust_remote_code=True. See the model card.)"
)


def default_lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.05, targets=PHI3_LORA_TARGETS,
                        **kwargs) -> LoraConfig:
    """LoRA on every Phi-3 linear layer of the decoder (attention and MLP); kwargs go to `LoraConfig`."""
    targets = targets if isinstance(targets, str) else list(targets)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
                      **kwargs)


def has_so8_rotations(model: torch.nn.Module) -> bool:
    return any(SO8_MODULE in name for name, _ in model.named_parameters())


def check_lora_targets(model: torch.nn.Module, target_modules) -> None:
    """Raise if a LoRA target matches no module, listing the linear layer names the model has."""
    if target_modules is None or target_modules == "all-linear":
        return
    names = [name for name, _ in model.named_modules() if name]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if isinstance(target_modules, str):
        if not any(re.fullmatch(target_modules, name) for name in names):
            raise ValueError(f"LoRA target_modules regex {target_modules!r} matches no module. Linear layers: {linear}.")
        return
    missing = sorted(t for t in target_modules if not any(name == t or name.endswith("." + t) for name in names))
    if missing:
        raise ValueError(
            f"LoRA target_modules {missing} match no module of {type(model).__name__}. Its linear layers are "
            f"{linear}. Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: use {list(PHI3_LORA_TARGETS)}."
        )


def prepare_peft_config(peft_config: PeftConfig, model: torch.nn.Module, so8t_trainable: bool = True) -> PeftConfig:
    """Check the targets against `model`, add the SO(8) rotations to `modules_to_save` and `SO8T_BASE_GUARD` to
    `exclude_modules` (a copy is returned)."""
    peft_config = copy.deepcopy(peft_config)
    check_lora_targets(model, getattr(peft_config, "target_modules", None))
    if so8t_trainable and has_so8_rotations(model):
        modules = list(peft_config.modules_to_save or [])
        if SO8_MODULE not in modules:
            peft_config.modules_to_save = modules + [SO8_MODULE]
        if hasattr(peft_config, "exclude_modules"):
            peft_config.exclude_modules = with_so8t_base_guard(peft_config.exclude_modules)
    return peft_config


def with_so8t_base_guard(exclude_modules) -> str:
    """`exclude_modules` (None, a regex, or names) as one regex that also holds `SO8T_BASE_GUARD`; PEFT matches a
    regex with `re.fullmatch` and names as the key itself or a `.name` suffix, which the regex reproduces."""
    if not exclude_modules:
        return SO8T_BASE_GUARD
    if isinstance(exclude_modules, str):
        if SO8T_BASE_GUARD in exclude_modules:
            return exclude_modules
        return f"(?:{exclude_modules})|{SO8T_BASE_GUARD}"
    names = "|".join(re.escape(name) for name in sorted(exclude_modules))
    return f"(?:.*\\.)?(?:{names})|{SO8T_BASE_GUARD}"


def parameter_groups(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: trainable LoRA, trainable SO(8), other trainable, frozen."""
    counts = {"lora": 0, "so8": 0, "other": 0, "frozen": 0}
    for name, param in model.named_parameters():
        n = param.numel() * (2 if getattr(param, "quant_state", None) is not None else 1)  # 4-bit packs two per byte
        if not param.requires_grad:
            counts["frozen"] += n
        elif "lora_" in name:
            counts["lora"] += n
        elif SO8_MODULE in name:
            counts["so8"] += n
        else:
            counts["other"] += n
    return counts


def format_parameter_summary(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    trainable = total - counts["frozen"]
    rows = [f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"]
    rows += [f"  {label:<7}{counts[key]:>14,}" for key, label in (("lora", "LoRA"), ("so8", "SO(8)"), ("other", "other"))]
    return "\n".join(rows)


def quantization_config(model_args, compute_dtype: torch.dtype = torch.bfloat16):
    """bitsandbytes config for QLoRA from TRL's `ModelConfig` names: `load_in_4bit` (`bnb_4bit_quant_type`,
    `use_bnb_nested_quant`, `bnb_4bit_quant_storage`) or `load_in_8bit`. `lm_head` and the SO(8) generators
    are never quantised."""
    bits = 4 if model_args.load_in_4bit else 8
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{bits}-bit QLoRA needs bitsandbytes on a CUDA GPU; this machine has none. "
            "Drop load_in_4bit / load_in_8bit (plain LoRA runs on CPU) or run on a GPU with `pip install 'so8t-hf[bnb]'`."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise RuntimeError("QLoRA needs bitsandbytes: pip install 'so8t-hf[bnb]'") from err
    from transformers import BitsAndBytesConfig

    skip = ["lm_head", SO8_MODULE]
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,
        llm_int8_skip_modules=skip,
    )


def prepare_kbit_model(model: torch.nn.Module, compute_dtype: torch.dtype = torch.bfloat16, gradient_checkpointing=True):
    """`prepare_model_for_kbit_training` with non-reentrant checkpointing, then every non-quantised parameter
    back to `compute_dtype` except the SO(8) generators, which stay fp32.

    PEFT upcasts every non-quantised parameter to fp32. fp32 embeddings make the whole residual stream fp32,
    which pushes attention off its bf16 kernels, and give a trainable `lm_head` copy (new tag-token rows) an
    fp32 input while SFTTrainer casts the trainable parameters of a quantised model to bf16.
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    for name, param in model.named_parameters():
        if SO8_MODULE not in name and param.dtype == torch.float32:  # quantised weights: integer storage, skipped
            param.data = param.data.to(compute_dtype)
    keep_so8_fp32(model)
    return model


def expose_head_bias(model: torch.nn.Module) -> None:
    """Give a PEFT `TrainableTokensWrapper` around the LM head (`trainable_token_indices` on `lm_head`) the `bias`
    attribute TRL's fused LM head reads (`lm_head.weight, lm_head.bias`): the wrapper forwards `weight` (the base
    rows with the trained ones written in, differentiable) but not `bias`. Phi-3's head has no bias."""
    head = model.get_output_embeddings()
    if type(head).__name__ != "TrainableTokensWrapper" or "bias" in head.__dict__:
        return
    bias = head.token_adapter.base_layer.bias
    if bias is not None:  # PEFT's token layer computes F.linear(x, W) without it: the trained head would differ
        raise ValueError("trainable_token_indices on an LM head with a bias is not supported (PEFT drops the bias); "
                         "put lm_head in modules_to_save instead")
    head.bias = None


def keep_so8_fp32(model: torch.nn.Module) -> None:
    """Put the SO(8) generators back to fp32 wherever a blanket cast moved them (small angle updates vanish in
    bf16's 8-bit mantissa)."""
    for name, param in model.named_parameters():
        if SO8_MODULE in name and param.dtype != torch.float32:
            param.data = param.data.float()
