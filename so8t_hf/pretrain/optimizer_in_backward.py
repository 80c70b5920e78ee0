"""Optimizer-in-backward: each parameter takes its optimizer step as soon as its gradient is accumulated, then drops
that gradient, so the full gradient buffer (2 bytes / parameter in bf16: 3.0 GB at 1.5B) never exists.

Origin: PyTorch's tutorial "How to save memory by fusing the optimizer step into the backward pass"
(`Tensor.register_post_accumulate_grad_hook`) and torchtune's `OptimizerInBackwardWrapper` (one optimizer per
parameter, one state dict for all of them).

- One optimizer per trainable parameter, of the class and keyword arguments `Trainer.get_optimizer_cls_and_kwargs`
  resolves `optim` to (torch AdamW, fused AdamW, bitsandbytes 8-bit AdamW, ...), with the Trainer's weight-decay
  split (no decay on biases and norms) and the SO(8) generators' own learning rate (`so8t_learning_rate`, no decay),
  as `SO8TTrainer.create_optimizer` groups them. bitsandbytes' 8-bit optimizers keep the embeddings' states in 32
  bits, as the Trainer's do (here by `optim_bits=32` on those parameters' own optimizers: bitsandbytes' global
  override table is keyed by (group, index), which is (0, 0) for every per-parameter optimizer).
- bitsandbytes 0.50 synchronises the GPU after each parameter's update (`bitsandbytes.utils.sync_gpu`). Inside the
  backward pass that would drain the launch queue once per parameter, so the hooks skip it for non-paged bitsandbytes
  optimizers: their kernels run in stream order on the current stream and nothing reads their results on the host.
- The Trainer sees one `OptimizerInBackward`: `step()` and `zero_grad()` do nothing (the hooks did both);
  `param_groups` lists every per-parameter optimizer's group (the same dicts), so the Trainer's LR scheduler drives
  all of them; `state_dict()` / `load_state_dict()` save and restore every state, keyed by parameter name, so a
  resumed run continues bit-exactly.
- Gradient norm: each hook adds its gradient's squared norm to a device tensor (no host sync per parameter);
  `pop_grad_norm()` returns the step's norm, which `PretrainTrainer` logs as `grad_norm`.

Limits, each refused with a `ValueError` naming the setting (`check_optimizer_in_backward`): gradient accumulation
(every micro-batch's backward would step), global gradient clipping (`max_grad_norm > 0`: the norm is known only after
the last parameter stepped), several processes (DDP / FSDP reduce gradients after the hooks fired), fp16 (the
GradScaler unscales after backward), and optimizers not built from param groups (factories such as Muon or Dion,
GaLore, LOMO, the layer-wise ones).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import torch
from torch import nn

__all__ = ["OptimizerInBackward", "build_optimizer_in_backward", "check_optimizer_in_backward"]

logger = logging.getLogger(__name__)

STATE_KEY = "optimizer_in_backward"
_NOT_PER_PARAMETER = ("params", "model", "optimizer_dict")  # kwargs by which an optim replaces the param groups


def check_optimizer_in_backward(args, world_size: int | None = None) -> None:
    """Raise a `ValueError` naming the setting that optimizer-in-backward cannot run with (see the module docstring)."""
    def fail(setting: str, why: str, fix: str) -> None:
        raise ValueError(f"optimizer_in_backward=true with {setting}: {why}; {fix} (or set optimizer_in_backward: false).")

    if args.gradient_accumulation_steps > 1:
        fail(f"gradient_accumulation_steps={args.gradient_accumulation_steps}", "each parameter steps when its "
             "gradient of one backward arrives, so accumulation is impossible",
             "set gradient_accumulation_steps: 1 and raise per_device_train_batch_size to keep the tokens per step")
    if args.max_grad_norm and args.max_grad_norm > 0:
        fail(f"max_grad_norm={args.max_grad_norm}", "global gradient clipping needs every gradient before the first "
             "step", "set max_grad_norm: 0 (the gradient norm is still logged)")
    if args.fp16:
        fail("fp16=true", "the fp16 GradScaler unscales gradients after backward, when they are already applied",
             "use bf16: true")
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        fail("deepspeed / fsdp", "they shard and reduce gradients themselves", "train on one process")
    if world_size is not None and world_size > 1:
        fail(f"{world_size} processes", "DDP reduces gradients after the hooks already stepped on local ones",
             "run one process (python recipes/pretrain.py, or accelerate launch --num_processes 1)")


class _MergedState(Mapping):
    """`optimizer.state` of the wrapper: parameter -> its state in its own optimizer (read-only view)."""

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer]):
        self._optimizers = optimizers

    def _items(self) -> Iterator[tuple[torch.Tensor, dict]]:
        for optimizer in self._optimizers.values():
            yield from optimizer.state.items()

    def __getitem__(self, param):
        for p, state in self._items():
            if p is param:
                return state
        raise KeyError("this parameter has no optimizer state (yet)")

    def __iter__(self):
        return (p for p, _ in self._items())

    def __len__(self) -> int:
        return sum(len(o.state) for o in self._optimizers.values())


class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per parameter, stepped by that parameter's post-accumulate-grad hook (module docstring).

    Args:
        named_params (`list[tuple[str, nn.Parameter, dict]]`): name, parameter and its group settings
            (`weight_decay`, optionally `lr`, `name`).
        optimizer_cls (`type`): the optimizer class built for each parameter.
        optimizer_kwargs (`dict`): its keyword arguments (`lr`, `betas`, ...).
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter, dict]], optimizer_cls, optimizer_kwargs: dict,
                 kwargs_overrides: dict[str, dict] | None = None):
        if not named_params:
            raise ValueError("optimizer_in_backward: the model has no trainable parameter.")
        self._built = False
        super().__init__([p for _, p, _ in named_params], dict(optimizer_kwargs))
        overrides = kwargs_overrides or {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            name: optimizer_cls([{"params": [param], **group}], **{**optimizer_kwargs, **overrides.get(name, {})})
            for name, param, group in named_params}
        self._skip_bnb_sync = "bitsandbytes" in str(optimizer_cls) and not optimizer_kwargs.get("is_paged", False)
        self._params = {name: param for name, param, _ in named_params}
        self._grad_sq: dict[torch.device, torch.Tensor] = {}  # per device: sum of squared gradient norms this step
        self.hook_calls = 0  # parameters stepped since the last pop_grad_norm()
        self._handles = [param.register_post_accumulate_grad_hook(self._make_hook(name))
                         for name, param in self._params.items()]
        self._sync_groups()
        self._built = True

    def _make_hook(self, name: str):
        optimizer = self.optimizers[name]

        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            sq = self._grad_sq.get(grad.device)
            if sq is None:
                sq = self._grad_sq[grad.device] = torch.zeros((), dtype=torch.float32, device=grad.device)
            sq.add_(torch.linalg.vector_norm(grad, dtype=torch.float32).square())
            if self._skip_bnb_sync:
                with _no_bnb_sync():
                    optimizer.step()
            else:
                optimizer.step()
            param.grad = None
            self.hook_calls += 1

        return hook

    def _sync_groups(self) -> None:
        """`param_groups` are the per-parameter optimizers' own group dicts (`load_state_dict` replaces them)."""
        self.param_groups = [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]
        self.state = _MergedState(self.optimizers)

    # ---- what the Trainer calls
    def step(self, closure=None):
        """Nothing to do: every parameter stepped in backward. Runs `closure` if given (the optimizer contract)."""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: each hook dropped its parameter's gradient after the step."""

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_built", False):
            raise ValueError("optimizer_in_backward: parameters cannot be added after the optimizers are built.")
        super().add_param_group(param_group)

    def pop_grad_norm(self) -> torch.Tensor | None:
        """The L2 norm of every gradient since the last call (a device tensor; no sync), then reset."""
        if not self._grad_sq:
            return None
        total = sum(sq.to(next(iter(self._grad_sq.values())).device) for sq in self._grad_sq.values())
        norm = total.sqrt()
        for sq in self._grad_sq.values():
            sq.zero_()
        self.hook_calls = 0
        return norm

    def state_dict(self) -> dict:
        return {STATE_KEY: {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict.get(STATE_KEY) if isinstance(state_dict, dict) else None
        if states is None:
            raise ValueError("optimizer_in_backward: this optimizer state was saved without optimizer_in_backward "
                             "(one optimizer for all parameters); resume it with optimizer_in_backward: false.")
        missing, unexpected = set(self.optimizers) - set(states), set(states) - set(self.optimizers)
        if missing or unexpected:
            raise ValueError(f"optimizer_in_backward: the saved state does not match the model's trainable parameters "
                             f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); resume with the "
                             "same model config and trainable parameters.")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(states[name])
        self._sync_groups()

    def remove_hooks(self) -> None:
        """Detach the hooks (the parameters then keep their gradients again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __repr__(self) -> str:
        first = next(iter(self.optimizers.values()))
        return f"OptimizerInBackward({len(self.optimizers)} x {type(first).__name__})"


def _is_factory(optimizer_cls) -> bool:
    try:
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError:  # older transformers: no factories
        return False
    return is_optimizer_factory(optimizer_cls)


@contextlib.contextmanager
def _no_bnb_sync():
    """bitsandbytes' optimizer step without its per-parameter `torch.cuda.synchronize()` (module docstring)."""
    from bitsandbytes.optim import optimizer as bnb_optimizer

    sync = bnb_optimizer.sync_gpu
    bnb_optimizer.sync_gpu = lambda t: None
    try:
        yield
    finally:
        bnb_optimizer.sync_gpu = sync


def _embeddings_32bit(model: nn.Module, named: list, optimizer_cls, optimizer_kwargs: dict) -> dict[str, dict]:
    """bitsandbytes 8-bit optimizers: `optim_bits=32` for the embeddings' optimizers, as the Trainer keeps them."""
    if "bitsandbytes" not in str(optimizer_cls) or optimizer_kwargs.get("optim_bits") != 8:
        return {}
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    if (0, 0) in manager.index2config:  # an earlier optimizer's override would apply to every (0, 0) parameter
        logger.warning("optimizer in backward: dropping a bitsandbytes override of (group 0, index 0) left by an "
                       "earlier optimizer in this process (%s)", manager.index2config[(0, 0)])
        del manager.index2config[(0, 0)]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {name: {"optim_bits": 32} for name, param, _ in named if id(param) in embeddings}


def build_optimizer_in_backward(trainer, model: nn.Module) -> OptimizerInBackward:
    """The wrapper for `trainer` (a `transformers.Trainer`; its `args`, `get_decay_parameter_names`,
    `optimizer_cls_and_kwargs`) over `model`'s trainable parameters, hooks registered."""
    from transformers import Trainer

    from so8t_hf.training.peft_setup import SO8_MODULE

    args = trainer.args
    check_optimizer_in_backward(args, args.world_size)
    if getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        optimizer_cls, optimizer_kwargs = trainer.optimizer_cls_and_kwargs
    else:
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    replaced = [key for key in _NOT_PER_PARAMETER if key in optimizer_kwargs]
    if _is_factory(optimizer_cls) or replaced or not isinstance(optimizer_cls, type):
        raise ValueError(f"optimizer_in_backward=true with optim={args.optim!r}: this optimizer is not built from "
                         f"param groups ({'it replaces ' + ', '.join(replaced) if replaced else 'a factory'}), so it "
                         "cannot run one instance per parameter; choose adamw_torch, adamw_torch_fused, "
                         "adamw_bnb_8bit, ... or set optimizer_in_backward: false.")
    decay = set(trainer.get_decay_parameter_names(model))
    so8_lr = getattr(args, "so8t_learning_rate", None)
    named = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if SO8_MODULE in name:
            group = {"weight_decay": 0.0, "name": "so8", "lr": so8_lr if so8_lr is not None else args.learning_rate}
        else:
            group = {"weight_decay": args.weight_decay if name in decay else 0.0}
        named.append((name, param, group))
    overrides = _embeddings_32bit(model, named, optimizer_cls, optimizer_kwargs)
    wrapper = OptimizerInBackward(named, optimizer_cls, optimizer_kwargs, overrides)
    grads = sum(p.numel() * p.element_size() for _, p, _ in named)
    logger.info("optimizer in backward: %d per-parameter %s optimizers (%s) step in the backward pass; no gradient "
                "buffer (%.2f GiB not allocated); grad_norm from the hooks, no clipping%s", len(named),
                optimizer_cls.__name__, args.optim, grads / 2**30,
                f"; embeddings' states in 32 bits: {sorted(overrides)}" if overrides else "")
    return wrapper
