"""Checkpointed decoder layers as CUDA graphs: two graph replays per layer and step instead of hundreds of launches.

A host-bound step (QLoRA at batch 1: ~130 ms of GPU work in a ~500 ms step, H100) spends its time issuing kernels
from Python. Each checkpointed decoder layer is captured once as two CUDA graphs and replayed every step:
- forward: the layer without autograd (what checkpointing runs), static input -> static output;
- backward: the recompute with autograd and one `torch.autograd.grad` to the layer input, the SO(8) rotation and the
  layer's trainable weights (LoRA), so nothing activation-sized is kept beyond checkpointing's saved inputs.

Graphs need fixed shapes and addresses. A padding-free packed micro-batch (one row with `cu_seq_lens_*`, as the
recipe's packing gives) is padded to the token budget (`per_device_train_batch_size * max_length`) with padding
sequences, and `cu_seq_lens` to a fixed count of sequences with zero-length ones. The longest sequence is static too:
each length bucket (a power of two >= the step's longest sequence, >= 512) has its own graphs, and the padding is cut
into sequences no longer than it. Attention never mixes sequences, so real tokens see exactly what they saw, the
padding's gradients are zero, and the output drops it.
Layer i reads buffer i and writes buffer i+1 of one chain (the inputs checkpointing saves anyway); gradients go
through two alternating buffers; every graph shares one memory pool, captured in replay order.

Limits: CUDA, training with grad, layers that checkpointing covers, packed micro-batches within the budget (a fixed
sequence count, doubled and recaptured when a batch has more), no KV cache, no attention mask, one autocast dtype.
Any other call runs the layer as before (checkpointed, eager) and the reason is logged once. Parameters must keep
their storage (in-place optimizers do); the first step of each graph pays its capture (~10 ms per layer).
Origin: `torch.cuda.make_graphed_callables` (static buffers, graphed forward and backward inside one autograd
Function), with the recompute of activation checkpointing in the backward graph.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

_KNOWN_KWARGS = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "so8t_rotations", "cache",
                 "past_key_values", "use_cache", "cache_position", "position_ids", "position_embeddings",
                 "attention_mask", "output_attentions", "output_hidden_states", "seq_idx"}  # seq_idx (TRL's collator): state-space layers only


class _side_stream:
    """Run a block on `stream` (the graphs' one side stream) ordered after the current one, or as is (None).
    One stream for every warm-up and capture: cuBLAS keeps a 32 MiB workspace per stream it has run on, so a fresh
    stream per graph held 2 GiB for 64 graphs (H100, QLoRA 1 x 2048: benchmarks/results/train_h100_cuda_graphs.md)."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())
            self.context = torch.cuda.stream(self.stream)
            self.context.__enter__()

    def __exit__(self, *exc):
        if self.stream is not None:
            self.context.__exit__(*exc)
            torch.cuda.current_stream().wait_stream(self.stream)


class _Replay:
    """A captured CUDA graph; off CUDA (tests) the function itself, re-run on every replay. Both only read and
    write the static buffers, so the two behave the same."""

    def __init__(self, fn, pool, stream):
        self.fn, self.graph = fn, None
        if stream is not None:
            with _side_stream(stream):
                fn()  # warm-up: lazy initialisations, autotuning and measured backend choices happen outside capture
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                fn()

    def __call__(self) -> None:
        if self.graph is None:
            self.fn()
        else:
            self.graph.replay()


def length_bucket(max_length: int, budget: int, smallest: int) -> int:
    """The static longest-sequence length the graphs of a step are captured for: the next power of two (at least
    `smallest`), within the budget. Varlen attention sizes its grid by it. With the budget (8,192) as the longest
    sequence, the median graphed LoRA 1 x 8192 step took 0.545 s against 0.482 s eager on an H100, for real sequences
    of at most ~600 tokens. With buckets it took 0.481 s against 0.483 s in the next call, which also had the
    one-stream change (one call each)."""
    return min(budget, max(smallest, 1 << max(int(max_length) - 1, 0).bit_length()))


class GraphedLayers:
    """The shared state of one model's graphed layers: static step inputs, the activation chain, gradient buffers."""

    def __init__(self, layers, token_budget: int, use_graphs: bool, max_sequences: int | None = None,
                 smallest_length_bucket: int = 512):
        self.budget, self.use_graphs = int(token_budget), use_graphs
        # sequences per micro-batch the graphs are captured for (more: a recapture of every layer, ~1 s)
        self.max_sequences = int(max_sequences or max(64, self.budget // 64))
        self.smallest_length_bucket = int(smallest_length_bucket)
        self.pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self.stream = torch.cuda.Stream() if use_graphs else None  # every warm-up and capture runs on this one
        self.length = self.budget  # this step's static longest-sequence length (a length bucket)
        self.steps_per_length: dict[int, int] = {}
        self.runners = [_LayerRunner(self, layer, i) for i, layer in enumerate(layers)]
        self.chain: list[torch.Tensor] | None = None  # (1, budget, hidden) x (n_layers + 1)
        self.grads: list[torch.Tensor] | None = None  # (1, budget, hidden) x 2
        self.step_inputs: dict[str, torch.Tensor] = {}
        self._source = None  # this step's (cos, sin, cu) objects, to copy them once per step
        self._autocast = None
        self.fallbacks: dict[str, int] = {}
        self.replays = 0

    # ------------------------------------------------------------------ eligibility

    def why_not(self, hidden, kwargs) -> str | None:
        """None when this call can replay the graphs, else the reason it runs eagerly."""
        if not torch.is_grad_enabled():
            return "no grad"
        if hidden.dim() != 3 or hidden.shape[0] != 1:
            return f"not one packed row (hidden {tuple(hidden.shape)})"
        if hidden.shape[1] > self.budget:
            return f"{hidden.shape[1]} tokens exceed the budget of {self.budget}"
        unknown = set(kwargs) - _KNOWN_KWARGS
        if unknown:
            return f"unknown arguments {sorted(unknown)}"
        if kwargs.get("attention_mask") is not None:
            return "an attention mask (padding-free packing passes none)"
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            return "a KV cache"
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return "output_attentions / output_hidden_states"
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None or kwargs.get("position_embeddings") is None:
            return "no cu_seq_lens (padding-free packing gives them)"
        if kwargs.get("cu_seq_lens_k") is not None and kwargs["cu_seq_lens_k"] is not cu and \
                kwargs["cu_seq_lens_k"].shape != cu.shape:
            return "different query and key sequences"
        device = hidden.device.type
        state = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if self._autocast is None:
            self._autocast = state
        elif state != self._autocast:
            return f"autocast changed from {self._autocast} to {state}"
        return None

    def note_fallback(self, reason: str) -> None:
        if reason not in self.fallbacks:
            logger.info("CUDA graphs: a layer call runs eagerly (checkpointed): %s.", reason)
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    # ------------------------------------------------------------------ static buffers

    def _allocate(self, hidden, cos, sin, cu) -> None:
        from so8t_hf.training.fused_lora import reserve_dequant_buffer

        reserve_dequant_buffer([r.layer for r in self.runners])  # graphs hold its address: it must never move
        n, budget, width = len(self.runners), self.budget, hidden.shape[-1]
        self.chain = [hidden.new_zeros(1, budget, width) for _ in range(n + 1)]
        self.grads = [hidden.new_zeros(1, budget, width) for _ in range(2)]
        self.step_inputs = {
            "cos": cos.new_zeros(1, budget, *cos.shape[2:]), "sin": sin.new_zeros(1, budget, *sin.shape[2:]),
            "position_ids": torch.zeros(1, budget, dtype=torch.long, device=hidden.device),
            "cu": torch.full((self.max_sequences + 1,), budget, dtype=torch.int32, device=hidden.device),
        }
        self.step_inputs["cu"][0] = 0
        self._ramp = torch.arange(1, self.max_sequences + 2, dtype=torch.int32, device=hidden.device)

    def _grow(self, sequences: int) -> None:
        """More sequences than the graphs were captured for: double the count and recapture every layer."""
        while self.max_sequences < sequences:
            self.max_sequences *= 2
        logger.info("CUDA graphs: a micro-batch of %d sequences; recapturing for up to %d.", sequences,
                    self.max_sequences)
        device = self.step_inputs["cu"].device
        self.step_inputs["cu"] = torch.full((self.max_sequences + 1,), self.budget, dtype=torch.int32, device=device)
        self.step_inputs["cu"][0] = 0
        self._ramp = torch.arange(1, self.max_sequences + 2, dtype=torch.int32, device=device)
        for runner in self.runners:
            runner.forward_graphs.clear()
            runner.backward_graphs.clear()
        if self.use_graphs:  # a fresh pool: recapturing into the old one trips the caching allocator (H100, torch 2.11)
            torch.cuda.synchronize()
            self.pool = torch.cuda.graph_pool_handle()
        self._source = None

    def load_step(self, hidden, kwargs) -> None:
        """Copy this step's positions, RoPE tables and sequence starts into the static buffers (once per step). The
        padding to the budget is cut into sequences no longer than this step's length bucket."""
        cos, sin = kwargs["position_embeddings"]
        cu = kwargs["cu_seq_lens_q"]
        source = (cos, sin, cu)
        if self._source is not None and all(a is b for a, b in zip(source, self._source)):
            return
        if self.chain is None:
            self._allocate(hidden, cos, sin, cu)
        longest = kwargs.get("max_length_q")
        longest = self.budget if longest is None else int(longest)  # the collators give an int (a tensor: one sync)
        self.length = length_bucket(longest, self.budget, self.smallest_length_bucket)
        self.steps_per_length[self.length] = self.steps_per_length.get(self.length, 0) + 1
        tokens = hidden.shape[1]
        sequences = cu.numel() - 1 + -(-(self.budget - tokens) // self.length)
        if sequences > self.max_sequences:
            self._grow(sequences)
        s = self.step_inputs
        s["cos"][:, :tokens].copy_(cos.expand(1, *cos.shape[1:]))
        s["sin"][:, :tokens].copy_(sin.expand(1, *sin.shape[1:]))
        positions = kwargs.get("position_ids")
        if positions is not None:
            s["position_ids"][:, :tokens].copy_(positions.expand(1, -1))
        s["cu"][: cu.numel()].copy_(cu)
        tail = s["cu"][cu.numel():]  # padding sequences of at most `length` tokens up to the budget, then empty ones
        torch.clamp(self._ramp[: tail.numel()] * self.length + tokens, max=self.budget, out=tail)
        self._source = source

    def layer_kwargs(self, rotation_module, rotation) -> dict:
        s = self.step_inputs
        kwargs = dict(position_embeddings=(s["cos"], s["sin"]), position_ids=s["position_ids"], attention_mask=None,
                      cu_seq_lens_q=s["cu"], cu_seq_lens_k=s["cu"], max_length_q=self.length, max_length_k=self.length)
        if rotation_module is not None:
            kwargs["so8t_rotations"] = {rotation_module: rotation}
        return kwargs


def _rotation_module(layer):
    attn = getattr(layer, "self_attn", None)
    return getattr(attn, "so8_rotation", None)


class _LayerRunner:
    """One layer's graphs and static buffers (its rotation, its weight gradients)."""

    def __init__(self, stack: GraphedLayers, layer, index: int):
        self.stack, self.layer, self.index = stack, layer, index
        self.params = [p for p in layer.parameters() if p.requires_grad]
        self.forward_graphs: dict[int, _Replay] = {}  # by length bucket
        self.backward_graphs: dict[int, _Replay] = {}
        self.rotation_key = None  # the So8Rotation module the model's step rotations name for this layer
        self.rotation = None  # static (n, 8, 8) rotation
        self.param_grads: list[torch.Tensor | None] = []
        self.rotation_grad = None
        self.input_needs_grad = True

    def _run_layer(self, hidden, rotation):
        forward = type(self.layer).forward
        enabled, dtype = self.stack._autocast
        device = hidden.device.type
        with torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=False):
            return forward(self.layer, hidden, **self.stack.layer_kwargs(self.rotation_key, rotation))

    def _forward_fn(self):
        out = self._run_layer(self.stack.chain[self.index], self.rotation)
        self.stack.chain[self.index + 1].copy_(out)

    def _backward_fn(self):
        stack, i = self.stack, self.index
        with torch.enable_grad():
            x = stack.chain[i].detach().requires_grad_(self.input_needs_grad)
            rotation = self.rotation.detach().requires_grad_(True) if self.rotation is not None else None
            out = self._run_layer(x, rotation)
            inputs = ([x] if self.input_needs_grad else []) + ([rotation] if rotation is not None else []) + self.params
            grads = list(torch.autograd.grad(out, inputs, grad_outputs=stack.grads[(i + 1) % 2], allow_unused=True))
        if self.input_needs_grad:
            stack.grads[i % 2].copy_(grads.pop(0))
        if rotation is not None:
            self.rotation_grad.copy_(grads.pop(0))
        for buf, grad in zip(self.param_grads, grads):
            if grad is not None:
                buf.copy_(grad)

    def _capture_backward(self):
        """The first backward: learn which weights get gradients (eagerly), then capture."""
        stack = self.stack
        if not self.param_grads:
            with torch.enable_grad(), _side_stream(stack.stream):
                x = stack.chain[self.index].detach().requires_grad_(True)
                rotation = self.rotation.detach().requires_grad_(True) if self.rotation is not None else None
                out = self._run_layer(x, rotation)
                used = torch.autograd.grad(out, self.params, grad_outputs=torch.ones_like(out), allow_unused=True,
                                           materialize_grads=False) if self.params else []
            self.param_grads = [torch.zeros_like(p) if g is not None else None for p, g in zip(self.params, used)]
            self.rotation_grad = torch.zeros_like(self.rotation) if self.rotation is not None else None
            del out, used
        self.backward_graphs[stack.length] = _Replay(self._backward_fn, stack.pool, stack.stream)

    def run_forward(self, hidden, rotation):
        stack, i = self.stack, self.index
        tokens = hidden.shape[1]
        target = stack.chain[i]
        if hidden.data_ptr() != target.data_ptr():  # the first layer, or a caller between layers: copy in, zero the pad
            target[:, :tokens].copy_(hidden)
            target[:, tokens:].zero_()
        if rotation is not None:
            if self.rotation is None:
                self.rotation = torch.zeros_like(rotation)
            self.rotation.copy_(rotation)
        if stack.length not in self.forward_graphs:
            self.forward_graphs[stack.length] = _Replay(self._forward_fn, stack.pool, stack.stream)
        self.forward_graphs[stack.length]()
        stack.replays += 1
        return stack.chain[i + 1].detach()[:, :tokens]

    def run_backward(self, grad_out, tokens: int):
        stack, i = self.stack, self.index
        target = stack.grads[(i + 1) % 2]
        if grad_out.data_ptr() != target.data_ptr():
            target[:, :tokens].copy_(grad_out)
            target[:, tokens:].zero_()  # the padding's outputs reach no loss
        if stack.length not in self.backward_graphs:
            self._capture_backward()
        self.backward_graphs[stack.length]()
        stack.replays += 1
        grad_x = stack.grads[i % 2].detach()[:, :tokens] if self.input_needs_grad else None
        grad_rotation = self.rotation_grad.clone() if self.rotation_grad is not None else None
        with torch.no_grad():  # the weights are not inputs of the outer graph (see _GraphedLayerFunction)
            for param, buf in zip(self.params, self.param_grads):
                if buf is not None:
                    if param.grad is None:
                        param.grad = buf.to(param.dtype, copy=True)
                    else:
                        param.grad.add_(buf)
        return grad_x, grad_rotation


class _GraphedLayerFunction(torch.autograd.Function):
    """The layer in the outer autograd graph. Its weights are not inputs: their gradients are added to `.grad` in
    backward. As inputs, the outer graph would keep their AccumulateGrad nodes alive on the default stream, and the
    backward graph's `autograd.grad` would then make that stream wait on the capturing one (a CUDA error)."""

    @staticmethod
    def forward(ctx, runner, hidden, rotation):
        ctx.runner, ctx.tokens = runner, hidden.shape[1]
        if runner.input_needs_grad != hidden.requires_grad:  # captured for the other case: capture again
            runner.input_needs_grad = hidden.requires_grad
            runner.backward_graphs.clear()
        return runner.run_forward(hidden, rotation)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_rotation = ctx.runner.run_backward(grad_out, ctx.tokens)
        return None, grad_x, grad_rotation


def _graphed_forward(runner: _LayerRunner, hidden_states, *args, **kwargs):
    """The layer's forward while graphed: replay when the call fits, else the checkpointed eager layer."""
    layer, stack = runner.layer, runner.stack
    if args:
        kwargs = dict(zip(("attention_mask", "position_ids"), args), **kwargs)
    reason = "eval mode" if not layer.training else stack.why_not(hidden_states, kwargs)
    if reason is None:
        rotations = kwargs.get("so8t_rotations") or {}
        module = _rotation_module(layer)
        candidates = [m for m in rotations if module is not None and (m is module or any(m is x for x in module.modules()))]
        if module is not None and any(p.requires_grad for p in module.parameters()) and not candidates:
            reason = "the SO(8) rotation is computed inside the layer (no step rotations)"
    if reason is not None:
        stack.note_fallback(reason)
        forward = partial(type(layer).forward, layer, **kwargs)
        if layer.training and torch.is_grad_enabled():
            return checkpoint(forward, hidden_states, use_reentrant=False)
        return forward(hidden_states)
    stack.load_step(hidden_states, kwargs)
    rotation = None
    if candidates:
        runner.rotation_key = candidates[0]
        rotation = rotations[candidates[0]]
    return _GraphedLayerFunction.apply(runner, hidden_states, rotation)


def graph_layers(layers, token_budget: int, use_graphs: bool | None = None) -> GraphedLayers:
    """Graph `layers` (checkpointed decoder layers, in model order): their checkpointing flag goes off (the graphs
    recompute), their forward replays the graphs. `use_graphs=False` runs the same buffers eagerly (tests)."""
    if use_graphs is None:
        use_graphs = torch.cuda.is_available()
    stack = GraphedLayers(layers, token_budget, use_graphs)
    for runner in stack.runners:
        runner.layer.gradient_checkpointing = False
        runner.layer.forward = partial(_graphed_forward, runner)
    logger.info("CUDA graphs: %d checkpointed decoder layers replay a forward and a backward graph each (token budget "
                "%d, up to %d sequences per micro-batch)%s.", len(stack.runners), stack.budget, stack.max_sequences,
                "" if use_graphs else " [eager stand-in: no CUDA]")
    return stack


def ungraph_layers(stack: GraphedLayers) -> None:
    """Back to the plain checkpointed layers; the graphs and buffers are released."""
    for runner in stack.runners:
        runner.layer.__dict__.pop("forward", None)
        runner.layer.gradient_checkpointing = True
        runner.forward_graphs.clear()
        runner.backward_graphs.clear()
    stack.chain = stack.grads = None
    stack.step_inputs = {}
    from so8t_hf.ops.fast_lora import DEQUANT_BUFFER

    DEQUANT_BUFFER.frozen = False


def graphs_unusable_reason(args) -> str | None:
    """Why `cuda_graphs` cannot apply to a run with these settings (None: it can)."""
    if not getattr(args, "activation_checkpointing", getattr(args, "gradient_checkpointing", False)):
        return "activation checkpointing is off (the graphs replace the checkpointed layers)"
    if (getattr(args, "activation_checkpointing_kwargs", None) or {}).get("use_reentrant"):
        return "reentrant checkpointing"
    padding_free = getattr(args, "padding_free", False) or (  # as TRL's SFTTrainer decides it
        getattr(args, "packing", False) and getattr(args, "packing_strategy", None) in ("bfd", "bfd_split"))
    if not padding_free:
        return "padding-free packing is off (packing / padding_free)"
    if getattr(args, "world_size", 1) > 1:
        return "several processes"
    return None


class CudaGraphCallback(TrainerCallback):
    """Applies `SO8TConfig.cuda_graphs` at train begin (after the checkpointing memory policy) and undoes it at the
    end. 'auto': CUDA runs the settings allow whose layers have 4-bit bases; 'on': any base, an error where the
    settings forbid it, and on a machine without CUDA the eager stand-in (the same buffers and recompute, no graphs:
    tests). Why 'auto' leaves float bases eager (H100, benchmarks/results/train_h100_cuda_graphs.md): QLoRA 1 x 2048
    is host-bound (130 ms of GPU work in a 616 ms step) and graphs gave 2.53x at 3.84 GiB (stock 4.01); LoRA on a
    bf16 base is GPU-bound (430 of 517 ms) and its median step did not move (0.484 vs 0.487 s), while each new length
    bucket costs a capture step (~1 s)."""

    def __init__(self, setting: str, token_budget: int):
        self.setting, self.token_budget, self.stack = setting, int(token_budget), None
        self.summary: dict | None = None  # after training: layers graphed, graph replays, eager calls by reason

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from so8t_hf.training.memory import checkpoint_layers, has_4bit_base

        reason = graphs_unusable_reason(args)
        cuda = torch.cuda.is_available() and not getattr(args, "use_cpu", False)
        if reason is None and not cuda and self.setting == "auto":
            reason = "no CUDA GPU"
        if reason is not None:
            if self.setting == "on":
                raise ValueError(f"cuda_graphs=on cannot apply: {reason}. Use cuda_graphs=auto or off.")
            logger.info("CUDA graphs off: %s.", reason)
            return
        layers = [m for m in checkpoint_layers(model) if m.gradient_checkpointing]
        if not layers:
            logger.info("CUDA graphs off: no decoder layer is checkpointed.")
            return
        if self.setting == "auto" and not has_4bit_base(layers):
            logger.info("CUDA graphs off (auto): the layers have float bases, GPU-bound without graphs; "
                        "cuda_graphs=on graphs them anyway.")
            return
        self.stack = graph_layers(layers, self.token_budget, use_graphs=cuda)

    def on_train_end(self, args, state, control, **kwargs):
        if self.stack is not None:
            self.summary = {"layers": len(self.stack.runners), "replays": self.stack.replays,
                            "max_sequences": self.stack.max_sequences, "eager_calls": dict(self.stack.fallbacks),
                            "steps_per_length_bucket": dict(self.stack.steps_per_length)}
            if self.stack.fallbacks:
                logger.info("CUDA graphs: %d graph replays; eager layer calls by reason: %s", self.stack.replays,
                            self.stack.fallbacks)
            ungraph_layers(self.stack)
            self.stack = None
