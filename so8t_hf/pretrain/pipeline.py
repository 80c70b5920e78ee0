"""Pre-training end to end, as `recipes/pretrain.py` and `so8t-hf pretrain` run it: tokenizer, an SO8T-Phi3 built
from config (random init, SO(8) generators at zero), packed text, `SO8TTrainer`, checkpoints, `final/`.

Output directory: `checkpoint-N/` every `save_steps` (the Trainer's: model with remote code + auto_map, optimizer,
scheduler, RNG and data position, so `resume_from_checkpoint` continues bit-exactly), `best/` (lowest eval_loss,
`BestCheckpointCallback`), `final/` (the model training left), `run_summary.json`. Every model folder loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

Memory (README: Pre-training from scratch): bf16 weights, bitsandbytes 8-bit AdamW states (`optim:
adamw_bnb_8bit`), activation checkpointing, Liger's fused kernels and the project's attention fit 1.5B
parameters, trained in full, in 10 GB; `max_memory_gib` caps the process to prove it on a larger GPU.
`optimizer_in_backward` (`pretrain/optimizer_in_backward.py`) drops the gradient buffer too, for a larger micro-batch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer, set_seed

from so8t_hf.inference.loader import resolve_dtype
from so8t_hf.modeling import So8tPhi3Config, So8tPhi3ForCausalLM
from so8t_hf.pretrain.callbacks import BestCheckpointCallback, StepLogCallback, StepTimer
from so8t_hf.pretrain.config import TINY_TOKENIZER, PretrainConfig, PretrainDataConfig, PretrainModelConfig
from so8t_hf.pretrain.data import load_documents, pack_documents, split_eval
from so8t_hf.pretrain.optimizer_in_backward import (
    OptimizerInBackward,
    build_optimizer_in_backward,
    check_optimizer_in_backward,
)
from so8t_hf.training.trainer import SO8TTrainer

__all__ = ["PretrainTrainer", "build_model", "build_tokenizer", "cap_gpu_memory", "prepare_training_args",
           "run_pretrain"]

logger = logging.getLogger(__name__)


def build_tokenizer(args: PretrainModelConfig):
    """The tokenizer (`tiny`: the shipped one), with a pad token (EOS when it has none)."""
    source = args.tokenizer_name_or_path
    if source == TINY_TOKENIZER:
        from so8t_hf.thinking.data import tiny_tokenizer_path

        source = tiny_tokenizer_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(args: PretrainModelConfig, tokenizer) -> So8tPhi3Config:
    vocab = args.vocab_size or -(-len(tokenizer) // 64) * 64
    if vocab < len(tokenizer):
        raise ValueError(f"PretrainModelConfig.vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)} "
                         "tokens); raise it or leave it unset.")
    config = So8tPhi3Config(
        vocab_size=vocab, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads or args.num_attention_heads,
        max_position_embeddings=args.max_position_embeddings, original_max_position_embeddings=args.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=args.tie_word_embeddings, initializer_range=args.initializer_range,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        so8t_layers=args.so8t_layers, so8t_attn_backend=args.so8t_attn_backend, use_cache=False,
    )
    config.validate_so8t()
    config._attn_implementation = args.attn_implementation
    return config


def build_model(args: PretrainModelConfig, tokenizer, device: str | None = None) -> So8tPhi3ForCausalLM:
    """A random-init SO8T-Phi3 of `args`' shape in its dtype (built directly on `device`: default the GPU when there
    is one), SO(8) generators zero (R = I) and fp32; in training mode."""
    config = model_config(args, tokenizer)
    dtype = resolve_dtype(args.dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(device):
        model = So8tPhi3ForCausalLM._from_config(config, dtype=dtype)
    for name, param in model.named_parameters():
        if "so8_rotation" in name:
            param.data = param.data.float()
    n = sum(p.numel() for p in model.parameters())
    logger.info("SO8T-Phi3 from scratch: %.3fB parameters (d %d, %d layers, %d heads, MLP %d, vocab %d), %s, SO8T "
                "layers %s, attention %s", n / 1e9, config.hidden_size, config.num_hidden_layers,
                config.num_attention_heads, config.intermediate_size, config.vocab_size, dtype, args.so8t_layers,
                args.attn_implementation)
    return model.train()


def cap_gpu_memory(gib: float | None) -> None:
    """Cap this process's CUDA caching allocator at `gib` GiB (no-op without a cap or a GPU; logged)."""
    if not gib or not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))
    logger.info("GPU memory capped at %.1f GiB of %.1f GiB", gib, total / 2**30)


def prepare_training_args(args: PretrainConfig, streaming: bool, has_eval: bool) -> int:
    """Settings the packed data needs; returns the block length (`max_length`). The blocks arrive packed and
    labelled, so TRL's preparation is skipped and its padding-free collator builds the position ids."""
    block = args.max_length
    if not block:
        raise ValueError("PretrainConfig.max_length: set the packed block length (e.g. 1024).")
    if streaming and args.max_steps <= 0:
        raise ValueError("streaming: a streamed corpus has no length; set max_steps (num_train_epochs cannot count).")
    args.max_length, args.packing, args.padding_free = None, False, True
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    if has_eval and args.metric_for_best_model is None:
        args.metric_for_best_model, args.greater_is_better = "eval_loss", False
    if not has_eval and args.eval_strategy != "no":
        logger.warning("eval_strategy=%s without eval blocks (eval_blocks: 0): no evaluation, no best/", args.eval_strategy)
        args.eval_strategy = "no"
    return block


class PretrainTrainer(SO8TTrainer):
    """`SO8TTrainer` whose training logs carry `step_time` (seconds per optimizer step, `StepTimer`); with
    `optimizer_in_backward` its optimizer is an `OptimizerInBackward` and `grad_norm` comes from its hooks."""

    def __init__(self, *pos, step_timer: StepTimer | None = None, **kwargs):
        self.step_timer = step_timer or StepTimer()
        kwargs["callbacks"] = [self.step_timer, *(kwargs.get("callbacks") or [])]
        self.optimizer_in_backward: OptimizerInBackward | None = None
        super().__init__(*pos, **kwargs)
        if getattr(self.args, "optimizer_in_backward", False):
            check_optimizer_in_backward(self.args, self.args.world_size)
            if self.optimizer is not None:
                raise ValueError("optimizer_in_backward=true with an optimizer passed to the trainer (optimizers=...): "
                                 "it builds one optimizer per parameter itself; pass optimizer_cls_and_kwargs instead.")

    def create_optimizer(self, model=None):
        if not getattr(self.args, "optimizer_in_backward", False):
            return super().create_optimizer(model)
        if self.optimizer is None:
            self.optimizer = self.optimizer_in_backward = build_optimizer_in_backward(self, model or self.model)
        return self.optimizer

    def _get_grad_norm(self, model, grad_norm=None):
        if self.optimizer_in_backward is not None:  # the hooks' norm: the gradients are gone by now
            return self.optimizer_in_backward.pop_grad_norm()
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            step_time = self.step_timer.pop_mean()
            if step_time is not None:
                logs["step_time"] = step_time
        super().log(logs, start_time)


def build_data(data_args: PretrainDataConfig, tokenizer, block: int, seed: int, num_proc: int | None = None):
    documents = load_documents(data_args, seed=seed)
    blocks = pack_documents(documents, tokenizer, block, data_args.packing_batch_size, num_proc=num_proc)
    train, evaluation = split_eval(blocks, data_args.eval_blocks, seed)
    if not data_args.streaming:
        tokens = sum(sum(s) for s in train["seq_lengths"])
        logger.info("packed %d documents into %d train blocks of <= %d tokens (%d tokens), %d eval blocks",
                    len(documents), len(train), block, tokens, len(evaluation) if evaluation is not None else 0)
    return train, evaluation


def run_pretrain(model_args: PretrainModelConfig, data_args: PretrainDataConfig, training_args: PretrainConfig,
                 callbacks: list | None = None) -> dict:
    """Train from zero and save (see the module docstring); returns the run summary. `callbacks`: more
    `TrainerCallback`s (an experiment tracker, a stop rule)."""
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cap_gpu_memory(training_args.max_memory_gib)
    tokenizer = build_tokenizer(model_args)
    has_eval = data_args.eval_blocks > 0
    block = prepare_training_args(training_args, data_args.streaming, has_eval)
    train, evaluation = build_data(data_args, tokenizer, block, training_args.seed, training_args.dataset_num_proc)
    model = build_model(model_args, tokenizer)
    step_log = StepLogCallback() if training_args.log_line else None
    callbacks = [c for c in (step_log,) if c] + list(callbacks or [])
    if has_eval and training_args.save_best:
        callbacks.append(BestCheckpointCallback(output_dir))
    trainer = PretrainTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                              processing_class=tokenizer, callbacks=callbacks)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    summary = {"params": sum(p.numel() for p in model.parameters()), "global_step": trainer.state.global_step,
               "train_loss": result.training_loss, "block_length": block,
               "best": json.loads((output_dir / "best" / "best.json").read_text())
               if (output_dir / "best" / "best.json").is_file() else None}
    if torch.cuda.is_available():
        summary["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if trainer.is_world_process_zero():
        trainer.save_model(str(output_dir / "final"))
        tokenizer.save_pretrained(output_dir / "final")
        (output_dir / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("saved %s (final), summary %s", output_dir / "final", summary)
    trainer.accelerator.wait_for_everyone()
    return summary
