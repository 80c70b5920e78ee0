"""Thinking SFT end to end, as the recipe runs it: tokenizer, model, data, SO8TTrainer, evaluation, outputs.

Output directory: `adapter/` (LoRA + SO(8) params + tag-token rows + tokenizer), `final/` (a full SO8T-Phi3 with
its remote-code files, tokenizer and chat template, a generation config that stops at `<|end|>` and the final-only
pipeline: `so8t_hf.hub.checkpoint`), `README.md` (model card with the metrics), `run_summary.json`,
`training_log.json`, `loss_curve.png`, `data_report.json`. `--push_to_hub` publishes it once at the end
(`so8t_hf.hub.push_output_dir`, as `so8t-hf push`), private unless `hub_private_repo` is false; the Trainer's own
Hub calls (a repo created at start-up, public unless `hub_private_repo`, and a push per checkpoint) are off.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer, set_seed

from so8t_hf.inference.loader import load_merged_adapter, resolve_dtype
from so8t_hf.modeling import So8tPhi3Config, So8tPhi3ForCausalLM
from so8t_hf.sft.config import TINY_MODEL, SO8TModelConfig, ThinkingDataConfig, check_recipe_args, resume_target
from so8t_hf.sft.reporting import write_run_reports
from so8t_hf.thinking.chat_template import (
    add_thinking_tokens,
    apply_thinking_chat_template,
    make_room_for_tokens,
    thinking_labels,
)
from so8t_hf.thinking.data import (
    check_truncation,
    drop_truncated,
    load_thinking_dataset,
    split_train_eval,
    tiny_tokenizer_path,
)
from so8t_hf.thinking.format import get_tag_preset
from so8t_hf.training.callbacks import ThinkingEvalCallback
from so8t_hf.training.config import SO8TConfig
from so8t_hf.training.distributed import check_launch, distributed_summary
from so8t_hf.training.peft_setup import prepare_kbit_model, quantization_config
from so8t_hf.training.trainer import SO8TTrainer

logger = logging.getLogger(__name__)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(training_args=None) -> int:
    """Logging of a recipe run, on stderr (the recipe and `so8t-hf train` share it): INFO by default, so the data
    report, skipped rows, the loss fallback and what ran show; `--log_level` (and `--log_level_replica` on the other
    processes) set it as for transformers. Call it once before parsing (None: INFO) and again with the parsed
    arguments. Returns the level."""
    import sys

    import transformers

    level = logging.INFO
    if training_args is not None and training_args.log_level != "passive":
        level = training_args.get_process_log_level()
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(level)
    logging.getLogger("so8t_hf").setLevel(level)
    if training_args is not None and training_args.log_level != "passive":
        transformers.utils.logging.set_verbosity(level)
    return level


def build_tokenizer(args: SO8TModelConfig, tags):
    """The model's (or the tiny) tokenizer, completed: thinking chat template, tag tokens, a pad token.
    Returns (tokenizer, token summary of `add_thinking_tokens`)."""
    source = args.tokenizer_name_or_path or (
        tiny_tokenizer_path() if args.model_name_or_path == TINY_MODEL else args.model_name_or_path
    )
    tokenizer = AutoTokenizer.from_pretrained(source)
    apply_thinking_chat_template(tokenizer, tags)
    summary = add_thinking_tokens(tokenizer, tags=tags)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, summary


def build_model(args: SO8TModelConfig, tokenizer, token_summary):
    """A tiny random SO8T-Phi3 or a pretrained checkpoint loaded as SO8T-Phi3 (identity rotations), with
    embedding rows for the tokenizer's new tag tokens; in training mode."""
    dtype = resolve_dtype(args.dtype)
    common = dict(so8t_layers=args.so8t_layers, so8t_attn_backend=args.so8t_attn_backend)
    if args.model_name_or_path == TINY_MODEL:
        config = So8tPhi3Config(
            vocab_size=-(-len(tokenizer) // 64) * 64,  # spare rows, as the real Phi-3.5 has
            hidden_size=args.tiny_hidden_size,
            intermediate_size=args.tiny_intermediate_size,
            num_hidden_layers=args.tiny_num_layers,
            num_attention_heads=args.tiny_num_heads,
            num_key_value_heads=args.tiny_num_kv_heads,
            max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **common,
        )
        config._attn_implementation = args.attn_implementation
        model = So8tPhi3ForCausalLM(config).to(dtype)
    else:
        kwargs = dict(dtype=dtype, attn_implementation=args.attn_implementation, revision=args.model_revision,
                      **common)
        if args.quantized:
            kwargs.update(quantization_config=quantization_config(args, dtype), device_map={"": 0})
        model = So8tPhi3ForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
        if args.quantized:
            model = prepare_kbit_model(model, dtype)
    room = make_room_for_tokens(model, tokenizer, token_summary["new_ids"], token_summary["old_len"])
    logger.info("model %s: %s, %s, SO8T layers %s, attention %s; %d new tag tokens (%s)", args.model_name_or_path,
                type(model).__name__, model.dtype, args.so8t_layers, args.attn_implementation,
                len(token_summary["new_ids"]), "embeddings resized" if room["resized"] else "spare embedding rows")
    return model.train()


def tokenize_rows(dataset, tokenizer, mode: str, tags, keep_earlier_thinking: bool = False):
    """`messages` -> `input_ids` + `labels` (-100 outside the `mode` span), kept beside `messages`.
    `keep_earlier_thinking`: the template keeps earlier turns whole (rows loaded with drop_earlier_thinking=False)."""

    def encode(row):
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False, keep_earlier_thinking=keep_earlier_thinking)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return {"input_ids": ids, "labels": thinking_labels(ids, tokenizer, mode=mode, tags=tags)}

    return dataset.map(encode, desc="Tokenizing with thinking loss masks")


def build_datasets(data: ThinkingDataConfig, tokenizer, max_length: int | None, output_dir: Path, tags, seed: int):
    """Load and validate the rows (`data_report.json`), check truncation at `max_length` (None: no limit, no check;
    `truncation_report.json`), split, tokenise with the loss mask. Returns (train, eval or None, eval messages)."""
    dataset = load_thinking_dataset(
        data.dataset_path, tags=tags, on_bad_rows=data.on_bad_rows, report_path=output_dir / "data_report.json",
        system_prompt=data.system_prompt, reasoning_section=data.reasoning_section,
        drop_earlier_thinking=data.drop_earlier_thinking, max_decompressed_mb=data.max_decompressed_mb,
    )
    keep = not data.drop_earlier_thinking  # the template then keeps earlier turns whole, as the rows hold them
    truncated = check_truncation(dataset, tokenizer, max_length, tags=tags, report_path=output_dir / "truncation_report.json",
                                 chat_template_kwargs={"keep_earlier_thinking": keep})
    if any(r.cuts_final for r in truncated):
        if data.on_truncated == "error":
            raise ValueError(f"{sum(r.cuts_final for r in truncated)} rows would lose </final> at max_length="
                             f"{max_length}: raise max_length or set on_truncated: drop. First: {truncated[0]}")
        dataset = drop_truncated(dataset, truncated)
    splits = split_train_eval(dataset, eval_fraction=data.eval_fraction, seed=seed) if data.eval_fraction > 0 else None
    train = splits["train"] if splits else dataset
    evaluation = splits["eval"] if splits else None
    train_tok = tokenize_rows(train, tokenizer, data.loss_mask, tags, keep).remove_columns(["messages", "source"])
    eval_tok = tokenize_rows(evaluation, tokenizer, data.loss_mask, tags, keep).remove_columns(["messages", "source"]) if evaluation else None
    return train_tok, eval_tok, (evaluation["messages"] if evaluation else [])


def packing_length(*datasets) -> int:
    """The longest tokenised row: the packed sequence length when `max_length` is None (no row is cut)."""
    longest = max(len(ids) for ds in datasets if ds is not None for ids in ds["input_ids"])
    logger.info("max_length is None with packing: packing into sequences of the longest row, %d tokens", longest)
    return longest


def lora_config(args: SO8TModelConfig, new_token_ids: list[int]):
    """LoRA on the Phi-3 linear layers; the tag tokens this run added train as those rows only of `embed_tokens`
    and `lm_head` (PEFT's `trainable_token_indices`), unless the whole module is in `lora_modules_to_save`."""
    from so8t_hf.training.peft_setup import default_lora_config

    config = default_lora_config(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules,
                                 use_rslora=args.use_rslora, use_dora=args.use_dora)
    modules = list(args.lora_modules_to_save or [])
    config.modules_to_save = modules or None
    rows = {name: list(new_token_ids) for name in ("embed_tokens", "lm_head") if name not in modules}
    if new_token_ids and rows:
        config.trainable_token_indices = rows  # both sides: the input rows and the output rows of the new tags
    return config


def take_over_hub_push(training_args: SO8TConfig) -> bool:
    """Whether to push at the end; turns the Trainer's own Hub calls off (they would create the repo at start-up,
    public unless `hub_private_repo`, and push every checkpoint)."""
    if not training_args.push_to_hub:
        return False
    if not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/so8t-phi35-thinking)")
    training_args.push_to_hub = False
    logger.info("push_to_hub: %s is published once after training (%s); the Trainer's own Hub calls are off",
                training_args.hub_model_id, "public" if training_args.hub_private_repo is False else "private")
    return True


def run_thinking_sft(model_args: SO8TModelConfig, data_args: ThinkingDataConfig, training_args: SO8TConfig) -> dict:
    """Train, evaluate and save; returns the final metrics."""
    check_recipe_args(model_args, data_args, training_args)
    check_launch()  # `accelerate launch --cpu --num_processes N` would train on one process
    push = take_over_hub_push(training_args)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tags = get_tag_preset(data_args.tag_preset)
    tokenizer, token_summary = build_tokenizer(model_args, tags)
    model = build_model(model_args, tokenizer, token_summary)
    train, evaluation, eval_messages = build_datasets(
        data_args, tokenizer, training_args.max_length, output_dir, tags, training_args.seed
    )
    if training_args.max_length is None and training_args.packing:  # TRL packs into max_length-token sequences
        training_args.max_length = packing_length(train, evaluation)
    eval_rows = eval_messages[: data_args.eval_generation_rows]
    new_ids = token_summary["new_ids"]  # tag tokens this run added: their embedding rows must train too
    trainer = SO8TTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=lora_config(model_args, new_ids) if model_args.use_peft else None,
        callbacks=[ThinkingEvalCallback(tokenizer, eval_rows, tags, data_args.eval_max_new_tokens)] if eval_rows else None,
    )
    log_processes(trainer)
    trainer.train(resume_from_checkpoint=resume_target(training_args.resume_from_checkpoint))
    metrics = trainer.final_metrics() if evaluation is not None else {}  # the last step is evaluated once
    distributed = distributed_summary(trainer)
    logger.info("ran on %s", distributed)
    model = whole_model(trainer, model_args, tokenizer, token_summary)  # collective under FSDP: every rank calls it
    if trainer.is_world_process_zero():
        save_outputs(trainer, tokenizer, model_args, output_dir, tags, model=model)
        write_run_reports(output_dir, trainer.state.log_history, metrics, model_args, data_args, training_args,
                          tags, token_summary, distributed=distributed)
    if push and trainer.is_world_process_zero():
        from so8t_hf.hub import push_output_dir

        push_output_dir(output_dir, training_args.hub_model_id, token=training_args.hub_token,
                        private=training_args.hub_private_repo is not False)
    trainer.accelerator.wait_for_everyone()  # no rank leaves (and tears its process group down) while rank 0 writes
    return metrics


def log_processes(trainer) -> None:
    """One line per process: its rank, the world size, the distributed type and backend."""
    state = trainer.accelerator.state
    logger.info("process %d of %d: %s, backend %s, device %s, mixed precision %s", state.process_index,
                state.num_processes, str(state.distributed_type).split(".")[-1], state.backend, state.device,
                state.mixed_precision)


def whole_model(trainer, model_args: SO8TModelConfig, tokenizer, token_summary):
    """The trained model, unsharded: `trainer.model`, or under FSDP (parameters sharded across the processes) a copy
    built like the run's and loaded with the gathered full state dict, on rank 0 (None elsewhere). Every rank must
    call it: the gather is collective."""
    if not trainer.is_fsdp_enabled:
        return trainer.model
    state = trainer.accelerator.get_state_dict(trainer.model)  # the full state dict on rank 0
    if not trainer.is_world_process_zero():
        return None
    model = build_model(model_args, tokenizer, token_summary)
    if model_args.use_peft:
        import copy

        from peft import get_peft_model

        model = get_peft_model(model, copy.deepcopy(trainer.model.peft_config["default"]))
    model.load_state_dict(state, strict=True)
    logger.info("FSDP: the gathered full state dict (%d tensors) loaded into an unsharded copy for saving", len(state))
    return model


def save_outputs(trainer, tokenizer, model_args: SO8TModelConfig, output_dir: Path, tags=None, model=None) -> None:
    """`adapter/` (or the full model without LoRA) and `final/`: a merged SO8T-Phi3 with its remote code, completed
    for release (`complete_checkpoint`: stop tokens, plain tags, final-only pipeline). `model`: the trained model
    when it is not `trainer.model` as it is (`whole_model` under FSDP)."""
    from so8t_hf.hub.checkpoint import complete_checkpoint

    model = trainer.model if model is None else model
    if model_args.use_peft:
        model.save_pretrained(output_dir / "adapter")
        tokenizer.save_pretrained(output_dir / "adapter")
        if model_args.quantized:  # merge into full-precision weights (resized like the run), not the 4/8-bit base
            model = load_merged_adapter(model_args.model_name_or_path, str(output_dir / "adapter"), torch.bfloat16)
        else:
            model = model.merge_and_unload()
    model.save_pretrained(output_dir / "final")
    tokenizer.save_pretrained(output_dir / "final")
    complete_checkpoint(output_dir / "final", tags)
