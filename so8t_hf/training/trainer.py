"""SO8TTrainer: TRL's SFTTrainer with a loss that can never silently stop learning.

Overrides only what it must:
- `compute_loss`: if the loss comes back without a graph while parameters are trainable, the causal-LM
  loss is recomputed from the captured last hidden state through `lm_head` (warned once, counted in
  `loss_fallback_steps`); when nothing carries a graph it raises an error naming the cause and the fix.
  It never steps on a graph-less loss and never multiplies one by zero. Adds the optional PET term.
  On one process with TRL's plain NLL path (`sync_free_metrics`), it runs TRL's fused-LM-head loss itself and keeps
  the per-step metrics (nll, entropy, token accuracy, token count) as GPU tensors until `log`, where one transfer
  reads them all: no host sync per micro-step (TRL's own compute_loss `.item()`s three times per micro-step).
- Speed settings: under bf16/fp16 autocast the LoRA layers stop casting their inputs to the fp32 adapters
  (`lora_cast_inputs`); `use_liger_kernel` works for SO8T-Phi3 (`integrations/liger.py`);
  `activation_checkpointing_layers` spends spare memory on fewer checkpointed layers (`training/memory.py`);
  `fused_lora` runs each LoRA layer (QLoRA: NF4 dequantise + matmul + adapter) as one autograd Function, and
  `lean_recompute` skips `mlp.down_proj`'s matmul in checkpointing's recompute (nothing reads it there);
  `fused_qkv_rope` (auto: CUDA runs) splits each layer's qkv into q, k, v with RoPE in one pass (`integrations/qkv_rope_op.py`);
  `cuda_graphs` replays each checkpointed decoder layer as CUDA graphs (`training/cuda_graphs.py`; `auto`: 4-bit bases);
  `gc_every_steps` schedules Python's garbage collection (`training/gc_control.py`).
- `create_optimizer`: the SO(8) generators get their own param group (`so8t_learning_rate`, no decay).
- `log`: perplexity, learning rates, tokens/s, peak memory, SO(8) health, `loss_fallback_steps`.
- `evaluation_loop`: adds the thinking metrics of each `ThinkingEvalCallback` (generated replies) to the
  evaluation's metrics, so they reach `Trainer.log` (every `report_to`, the console) with `eval_loss`.
- `final_metrics`: the evaluation of the model training left, reusing the evaluation of that step if one ran.
- Several processes (`training/distributed.py`): fp32 on CPU unless bf16 is asked, FSDP2 on gloo CPU processes, and
  under FSDP2 the LM head unsharded for TRL's fused LM-head loss (its gradients were not averaged otherwise).
Gradient checkpointing defaults to non-reentrant; a reentrant request gets `enable_input_require_grads`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
import warnings

import torch
from transformers import AutoModelForCausalLM
from trl import SFTTrainer

from so8t_hf.rotation import rotation_health
from so8t_hf.training.callbacks import ThinkingEvalCallback
from so8t_hf.training.config import LossHasNoGraphError, SO8TConfig
from so8t_hf.training.fused_lora import fused_lora_kinds
from so8t_hf.training.memory import CheckpointPolicyCallback
from so8t_hf.training.peft_setup import (
    SO8_MODULE,
    expose_head_bias,
    format_parameter_summary,
    keep_so8_fp32,
    parameter_groups,
    prepare_peft_config,
)
from so8t_hf.training.pet import pet_lambda_at, pet_penalty

logger = logging.getLogger(__name__)

def _unwrap(model):
    """The transformers model under PEFT / accelerate wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SO8TTrainer(SFTTrainer):
    """Drop-in `trl.SFTTrainer` for SO8T-Phi3 (and any causal LM) whose loss cannot silently stop learning.

    Args:
        model (`str` or `PreTrainedModel`): the model, or a checkpoint loaded with `args.model_init_kwargs`.
        args (`SO8TConfig`, *optional*): training settings; a plain `TrainingArguments` / `SFTConfig` is converted.
        peft_config (`peft.PeftConfig`, *optional*): LoRA / QLoRA adapters. Targets that match no module are an
            error; the SO(8) generators are added to `modules_to_save` (trained, saved with the adapter).
        **kwargs: everything `trl.SFTTrainer` takes (`train_dataset`, `eval_dataset`, `processing_class`,
            `callbacks`, ...).

    Example:
        ```python
        from so8t_hf import SO8TConfig, SO8TTrainer, So8tPhi3ForCausalLM, default_lora_config

        model = So8tPhi3ForCausalLM.from_pretrained("microsoft/Phi-3.5-mini-instruct", dtype="bfloat16")
        trainer = SO8TTrainer(model=model, args=SO8TConfig(output_dir="run", so8t_learning_rate=1e-3),
                              train_dataset=dataset, processing_class=tokenizer, peft_config=default_lora_config())
        trainer.train()
        ```
    """

    def __init__(self, model, args: SO8TConfig | None = None, *pos, peft_config=None, **kwargs):
        if args is None:
            args = SO8TConfig(output_dir="so8t-sft")
        elif not isinstance(args, SO8TConfig):
            names = {f.name for f in dataclasses.fields(SO8TConfig) if f.init}
            values = {k: v for k, v in args.to_dict().items() if k in names}
            values["hub_token"] = getattr(args, "hub_token", None)
            args = SO8TConfig(**values)
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
        if peft_config is not None:
            peft_config = prepare_peft_config(peft_config, model, args.so8t_trainable)
        if not args.so8t_trainable:
            for name, param in model.named_parameters():
                if SO8_MODULE in name:
                    param.requires_grad_(False)
        if args.activation_checkpointing and args.activation_checkpointing_kwargs.get("use_reentrant"):
            model.enable_input_require_grads()  # reentrant checkpointing needs inputs that require grad
        if args.use_liger_kernel:
            from so8t_hf.integrations.liger import liger_unusable_reason, register_liger

            reason = liger_unusable_reason()
            if reason:  # the phi35 recipes ask for Liger; without it (or a GPU) they still run, and say so
                warnings.warn(f"use_liger_kernel=True is ignored: {reason}.", stacklevel=2)
                args.use_liger_kernel = False
            else:
                register_liger()  # before Trainer.__init__ applies Liger by model type
        self.checkpoint_policy = None
        tokens = args.per_device_train_batch_size * (args.max_length or 2048)  # per micro-batch
        if args.activation_checkpointing and args.activation_checkpointing_layers != "all":
            self.checkpoint_policy = CheckpointPolicyCallback(
                args.activation_checkpointing_layers, args.activation_memory_budget_gib, tokens)
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.checkpoint_policy]
        from so8t_hf.training.gc_control import GarbageCollectionCallback

        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), GarbageCollectionCallback(args.gc_every_steps)]
        self.cuda_graphs = None
        if args.cuda_graphs != "off":  # after the memory policy: it graphs the layers that stay checkpointed
            from so8t_hf.training.cuda_graphs import CudaGraphCallback

            self.cuda_graphs = CudaGraphCallback(args.cuda_graphs, tokens)
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.cuda_graphs]
        super().__init__(model, args, *pos, peft_config=peft_config, **kwargs)
        keep_so8_fp32(self.model)  # SFTTrainer casts every trainable parameter of a quantised model to bf16
        expose_head_bias(self.model)  # trainable tag rows of lm_head: TRL's fused LM head reads lm_head.bias
        if not args.lora_cast_inputs and (args.bf16 or args.fp16):
            uncast = 0
            for module in self.model.modules():
                if hasattr(module, "_cast_input_dtype") and hasattr(module, "lora_A"):
                    module.cast_input_dtype_enabled = False  # autocast casts the adapter weights instead
                    uncast += 1
            if uncast:
                logger.info("LoRA: %d layers take their inputs in the autocast dtype (lora_cast_inputs=False).", uncast)
        on_cuda = torch.cuda.is_available() and not args.use_cpu
        if args.fused_qkv_rope == "on" or (args.fused_qkv_rope == "auto" and on_cuda):
            layers = [m for m in self.model.modules() if hasattr(m, "fused_qkv_rope") and hasattr(m, "qkv_proj")]
            for module in layers:
                module.fused_qkv_rope = True
            logger.info("q/k/v split + RoPE: so8t::qkv_rope in %d attention layers (fused_qkv_rope=%s).", len(layers),
                        args.fused_qkv_rope)
        self.fused_lora_counts = None
        kinds = fused_lora_kinds(args.fused_lora, on_cuda)
        if kinds:
            from so8t_hf.training.fused_lora import enable_fused_lora, lean_recompute

            self.fused_lora_counts = enable_fused_lora(self.model, kinds)
            if args.lean_recompute != "off" and args.activation_checkpointing:
                self.fused_lora_counts["lean_recompute"] = lean_recompute(self.model)
        self._pending: list[torch.Tensor] = []  # per-micro-step metric tensors, read at `log`
        self._pending_tokens: list[torch.Tensor] = []
        self._pending_pet: list[torch.Tensor] = []
        self.loss_fallback_steps = 0
        self._captured: dict[str, torch.Tensor] = {}
        self._hook = self._last_hidden_module().register_forward_hook(self._capture_hidden)
        self._log_clock: tuple[float, int] | None = None
        self._head_hook = None  # FSDP2: the LM head's unshard hook (`distributed.unshard_head_before_backbone`)
        if self.is_world_process_zero():
            logger.info("%s", format_parameter_summary(parameter_groups(self.model)))

    # ------------------------------------------------------------------ hidden-state capture

    def _last_hidden_module(self) -> torch.nn.Module:
        decoder = _unwrap(self.model).get_decoder()
        return getattr(decoder, "norm", decoder)

    def _capture_hidden(self, module, args, output):
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        self._captured["hidden"] = hidden  # (B, T, H): the last hidden state, before anything downstream

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._captured.clear()
        if self.is_fsdp_enabled and self._head_hook is None:  # after accelerate's fully_shard: see the function
            from so8t_hf.training.distributed import unshard_head_before_backbone

            self._head_hook = unshard_head_before_backbone(model) or False
        if self._log_clock is None:
            self._log_clock = (time.perf_counter(), self._total_train_tokens)
        sync_free = self._sync_free_path(model, return_outputs)
        if sync_free:
            result = self._sync_free_loss(model, inputs, num_items_in_batch)
        else:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        hidden = self._captured.pop("hidden", None)
        learning = model.training and torch.is_grad_enabled()
        if learning and not loss.requires_grad and any(p.requires_grad for p in model.parameters()):
            loss = self._recover_loss(model, inputs, hidden, num_items_in_batch)
        # under gradient accumulation a micro-step's loss is its share of the window's (sum / window tokens): times
        # the window's micro-steps, the mean over the logged micro-steps is the window's mean NLL, as `loss` is
        share = getattr(self, "current_gradient_accumulation_steps", 1) if num_items_in_batch is not None else 1
        if learning and sync_free:
            self._pending.append(torch.cat([loss.detach().float().reshape(1) * share, self._step_stats]))  # on the GPU
        elif learning:  # the mean over processes, like the logged loss (each rank's share is scaled to the global mean)
            self._metrics["train"]["nll"].append(self.accelerator.gather(loss.detach()).float().mean().item() * share)
        if learning and self.args.pet_lambda > 0 and hidden is not None:
            loss = loss + self._pet_term(inputs, hidden, num_items_in_batch)
        if len(self._pending) >= 256:  # logging off or rare: read them in bulk before they pile up
            self._flush_pending()
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ the sync-free loss path

    def _sync_free_path(self, model, return_outputs: bool) -> bool:
        """TRL's plain NLL path on one process, in training: the case `_sync_free_loss` reproduces."""
        args = self.args
        return (
            args.sync_free_metrics and model.training and torch.is_grad_enabled() and not return_outputs
            and self.compute_loss_func is None and self.label_smoother is None and args.loss_type == "nll"
            and not self.aux_loss_enabled and self.accelerator.num_processes == 1
            and getattr(self.accelerator.parallelism_config, "sp_enabled", False) is not True
        )

    def _sync_free_loss(self, model, inputs, num_items_in_batch):
        """TRL's fused-LM-head NLL, with the metrics kept on the GPU (`_step_stats`: entropy, accuracy)."""
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        mask = outputs.label_mask
        num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens, device=mask.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        valid = mask.sum().clamp(min=1).float()
        entropy = outputs.entropy.detach().sum() / valid if outputs.entropy is not None else valid * 0
        accuracy = outputs.is_top1.sum() / valid if outputs.is_top1 is not None else valid * 0
        self._step_stats = torch.stack([entropy.float(), accuracy.float(), (mask.sum() > 0).float()])
        if "position_ids" in inputs and "attention_mask" not in inputs:
            self._total_train_tokens += inputs["position_ids"].size(1) // self._tp_size  # a shape: no sync
        elif "attention_mask" in inputs:
            self._pending_tokens.append(inputs["attention_mask"].sum())
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        return loss

    def _flush_pending(self) -> None:
        """Move the GPU-held per-step metrics into `_metrics` (one device-to-host transfer)."""
        if self._pending_tokens:
            self._total_train_tokens += int(torch.stack(self._pending_tokens).sum().item()) // self._tp_size
            self._pending_tokens.clear()
        if self._pending:
            rows = torch.stack(self._pending).tolist()
            self._pending.clear()
            metrics = self._metrics["train"]
            for nll, entropy, accuracy, any_valid in rows:
                metrics["nll"].append(nll)
                metrics["entropy"].append(entropy if any_valid else 0.0)
                metrics["mean_token_accuracy"].append(accuracy if any_valid else 0.0)
        if self._pending_pet:
            self._metrics["train"]["pet_loss"].extend(torch.stack(self._pending_pet).tolist())
            self._pending_pet.clear()
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def _pet_term(self, inputs, hidden, num_items_in_batch) -> torch.Tensor:
        progress = self.state.global_step / max(self.state.max_steps, 1)
        weight = pet_lambda_at(progress, self.args.pet_lambda, self.args.pet_phase_boundaries, self.args.pet_phase_scales)
        penalty = pet_penalty(hidden, inputs.get("attention_mask"), inputs.get("position_ids"))
        self._pending_pet.append(penalty.detach().float())  # read at `log`
        self._metrics["train"]["pet_lambda"].append(weight)
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        return weight * penalty / steps  # a per-micro-batch mean: average it over accumulation like the CE sum

    def _recover_loss(self, model, inputs, hidden, num_items_in_batch) -> torch.Tensor:
        if hidden is None or not hidden.requires_grad:
            raise LossHasNoGraphError(self._no_graph_diagnosis(model))
        if self.args.loss_fallback == "error":
            raise LossHasNoGraphError(
                "The loss has no graph, but the last hidden state has one (the logits were detached downstream). "
                "Set loss_fallback='recover' to recompute the loss through lm_head, or fix the model's head."
            )
        if self.loss_fallback_steps == 0:
            warnings.warn(
                "SO8TTrainer: the loss came back without a graph; recomputing it from the last hidden state through "
                "lm_head (counted in the logged `loss_fallback_steps`). The model's logits lose their graph: check "
                "custom heads, no_grad/inference-mode wrappers, or detach() calls.",
                stacklevel=2,
            )
        self.loss_fallback_steps += 1
        base = _unwrap(model)
        lm_head = base.get_output_embeddings()
        logits = lm_head(hidden.to(lm_head.weight.dtype))  # (B, T, V)
        loss = base.loss_function(  # transformers' causal-LM loss: shift, ignore -100, sum / num_items_in_batch
            logits=logits, labels=inputs["labels"], vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch
        )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def _no_graph_diagnosis(self, model) -> str:
        base = _unwrap(model)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        reentrant = self.args.activation_checkpointing and self.args.activation_checkpointing_kwargs.get("use_reentrant")
        if reentrant and not base.get_input_embeddings().weight.requires_grad:
            cause = (
                "reentrant gradient checkpointing with frozen input embeddings: the checkpointed layers receive "
                "inputs that do not require grad, so nothing inside them is differentiated. Fix: "
                "activation_checkpointing_kwargs={'use_reentrant': False} (the SO8TConfig default) or call "
                "model.enable_input_require_grads()."
            )
        else:
            cause = (
                f"no trainable parameter takes part in the loss (trainable: {trainable[:5]}"
                f"{' ...' if len(trainable) > 5 else ''}); check which modules are frozen and that the forward "
                "does not run under torch.no_grad / inference_mode."
            )
        return f"The training loss has no gradient graph and cannot be recovered from the hidden states: {cause}"

    # ------------------------------------------------------------------ evaluation

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        progress = self.is_local_process_zero() and not self.args.disable_tqdm
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ThinkingEvalCallback):
                output.metrics.update(callback.generation_metrics(
                    self.model, batch_size=self.args.per_device_eval_batch_size, progress=progress,
                    prefix=metric_key_prefix))
        return output

    def final_metrics(self) -> dict[str, float]:
        """Evaluation metrics of the model as training left it: those logged at its step when that step was
        evaluated (the best checkpoint's step under `load_best_model_at_end`), else one `evaluate()`."""
        step = self.state.global_step
        best = self.state.best_model_checkpoint
        found = re.search(r"checkpoint-(\d+)/*$", best or "")
        if self.args.load_best_model_at_end and found:
            step = int(found.group(1))
        for entry in reversed(self.state.log_history):
            if entry.get("step") == step and "eval_loss" in entry:
                logger.info("final metrics: the evaluation logged at step %d (not evaluated again)", step)
                return {k: v for k, v in entry.items() if k != "step"}
        return self.evaluate()

    # ------------------------------------------------------------------ several processes

    def create_accelerator_and_postprocess(self):
        from so8t_hf.training.distributed import cpu_mixed_precision, fsdp_on_cpu

        cpu_mixed_precision(self.args)  # an accelerate config's bf16 is a GPU setting: fp32 on CPU unless asked
        super().create_accelerator_and_postprocess()
        fsdp_on_cpu(self)  # FSDP2 (fully_shard) on gloo CPU processes, where accelerate would run DDP

    # ------------------------------------------------------------------ optimizer and logging

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        so8 = [p for n, p in (model or self.model).named_parameters() if SO8_MODULE in n and p.requires_grad]
        if so8 and not any(group.get("name") == "so8" for group in optimizer.param_groups):
            ids = {id(p) for p in so8}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            lr = self.args.so8t_learning_rate if self.args.so8t_learning_rate is not None else self.args.learning_rate
            optimizer.add_param_group({"params": so8, "lr": lr, "weight_decay": 0.0, "name": "so8"})
            if self.is_fsdp_enabled:  # torch's distributed checkpoint maps an emptied group's settings to the wrong
                optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]  # group on resume
        return optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._flush_pending()  # the sync-free loss path's metrics, read once per logging step
        if self.model.training and "loss" in logs:
            nll = self._metrics["train"].get("nll")
            if nll:
                logs["perplexity"] = math.exp(min(sum(nll) / len(nll), 50.0))
            logs["loss_fallback_steps"] = self.loss_fallback_steps
            groups = self.optimizer.param_groups if self.optimizer is not None else []
            so8 = [g for g in groups if g.get("name") == "so8"]
            if so8 and "learning_rate" in logs and "initial_lr" in groups[0]:
                # HF schedulers scale every group by one factor: the so8 rate at the logged step's moment
                logs["learning_rate_so8"] = logs["learning_rate"] * so8[0]["initial_lr"] / groups[0]["initial_lr"]
            logs.update(rotation_health(self.model))
            logs.update(self._throughput())
        super().log(logs, start_time)

    def _throughput(self) -> dict[str, float]:
        now, tokens = time.perf_counter(), self._total_train_tokens
        stats = {}
        if self._log_clock is not None and now > self._log_clock[0]:
            stats["tokens_per_second"] = (tokens - self._log_clock[1]) / (now - self._log_clock[0])
        self._log_clock = (now, tokens)
        if torch.cuda.is_available():
            stats["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import resource

            stats["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        return stats
