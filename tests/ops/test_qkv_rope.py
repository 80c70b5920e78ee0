"""The one-pass q / k / v split with RoPE (`so8t::qkv_rope`): the Triton kernels (the interpreter on the CPU) against
float64 RoPE, forward and backward, full and partial rotary, GQA; the torch backend bit-equal to transformers' path;
the op's registration (opcheck); SO8T-Phi3 with the op against the unfused path; `fused_qkv_rope=off`."""

from __future__ import annotations

import pytest
import torch
from transformers.models.phi3 import modeling_phi3

import so8t_hf  # noqa: F401  (registers the op)
from so8t_hf.integrations.qkv_rope_op import qkv_rope_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [  # (batch, tokens, heads, kv_heads, head_dim, rot)
    (2, 5, 4, 2, 16, 16),
    (1, 7, 3, 3, 12, 8),  # partial rotary, heads not a power of two
    (1, 3, 32, 32, 96, 96),  # Phi-3.5-mini's heads
]


def _inputs(batch, tokens, heads, kv_heads, head_dim, rot, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, (heads + 2 * kv_heads) * head_dim, generator=g, dtype=torch.float64)
    angles = torch.randn(batch, tokens, rot // 2, generator=g, dtype=torch.float64) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    return [t.to(DEVICE, dtype) for t in (qkv, cos, sin)]


def _stock(qkv, cos, sin, heads, kv_heads, head_dim):
    """transformers' own path: strided views, apply_rotary_pos_emb in (B, H, T, D), back to (B, T, H, D)."""
    shape = (*qkv.shape[:-1], -1, head_dim)
    q_cols, kv_cols = heads * head_dim, kv_heads * head_dim
    q = qkv[..., :q_cols].view(shape).transpose(1, 2)
    k = qkv[..., q_cols:q_cols + kv_cols].view(shape).transpose(1, 2)
    v = qkv[..., q_cols + kv_cols:].view(shape)
    q, k = modeling_phi3.apply_rotary_pos_emb(q, k, cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v


def _use_backend(monkeypatch, backend: str) -> None:
    """Route the op to `backend`; a Triton backend skips where the kernels cannot run."""
    if backend == "triton":
        pytest.importorskip("triton")
        from so8t_hf.ops import triton_available

        if not triton_available():
            pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("SO8T_QKV_ROPE_BACKEND", backend)


def _set_fused(model, on: bool) -> None:
    for module in model.modules():
        if hasattr(module, "fused_qkv_rope"):
            module.fused_qkv_rope = on


def _count_op_calls(monkeypatch) -> list:
    """A list that gains an entry each time the model calls torch.ops.so8t.qkv_rope."""
    calls, real = [], torch.ops.so8t.qkv_rope
    monkeypatch.setattr(torch.ops.so8t, "qkv_rope", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.fixture
def triton_backend(monkeypatch):
    _use_backend(monkeypatch, "triton")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_forward_and_backward_match_float64(triton_backend, shape, dtype):
    heads, kv_heads, head_dim = shape[2:5]
    qkv, cos, sin = _inputs(*shape, dtype)
    ref_in = qkv.detach().double().requires_grad_()
    ref = _stock(ref_in, cos.double(), sin.double(), heads, kv_heads, head_dim)
    x = qkv.detach().clone().requires_grad_()
    out = torch.ops.so8t.qkv_rope(x, cos, sin, heads, kv_heads, head_dim)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(out, ref):
        assert got.shape == want.shape and got.is_contiguous() and got.dtype == dtype
        assert (got.double() - want).abs().max().item() < tol * (1 + want.abs().max().item())
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in ref]
    torch.autograd.backward(ref, [t.to(ref_in.device) for t in grads])  # on the GPU, the reference runs there too
    torch.autograd.backward(out, [t.to(DEVICE, dtype) for t in grads])
    assert x.grad.shape == qkv.shape and x.grad.dtype == dtype
    assert (x.grad.double().cpu() - ref_in.grad.cpu()).abs().max().item() < tol * (1 + ref_in.grad.abs().max().item())


def test_triton_writes_every_element(triton_backend):
    """No column of q, k, v or of the qkv gradient is left unwritten (poisoned outputs through the raw launchers)."""
    from so8t_hf.ops.qkv_rope import qkv_rope_backward, qkv_rope_forward

    heads, kv_heads, head_dim, rot = 3, 1, 12, 8
    qkv, cos, sin = _inputs(1, 6, heads, kv_heads, head_dim, rot, torch.float32)
    q, k, v = qkv_rope_forward(qkv[0], cos[0], sin[0], heads, kv_heads, head_dim)
    assert all(torch.isfinite(t).all() for t in (q, k, v))
    assert torch.equal(v.flatten(1), qkv[0, :, (heads + kv_heads) * head_dim:])  # v is copied exactly
    assert torch.equal(q[..., rot:], qkv[0, :, :heads * head_dim].view(6, heads, head_dim)[..., rot:])  # pass-through
    dqkv = qkv_rope_backward(q, k, v, cos[0], sin[0], head_dim)
    assert torch.isfinite(dqkv).all()
    torch.testing.assert_close(dqkv, qkv[0], rtol=1e-5, atol=1e-5)  # RoPE is orthogonal: its transpose undoes it


def test_torch_backend_is_transformers_arithmetic_bit_for_bit(monkeypatch):
    monkeypatch.setenv("SO8T_QKV_ROPE_BACKEND", "torch")
    shape = (2, 9, 4, 2, 16, 12)
    qkv, cos, sin = _inputs(*shape, torch.bfloat16)
    got = torch.ops.so8t.qkv_rope(qkv, cos, sin, *shape[2:5])
    for a, b in zip(got, _stock(qkv, cos, sin, *shape[2:5])):
        assert a.is_contiguous() and torch.equal(a, b)
    # and its backward is the transpose of the same arithmetic (autograd through transformers' path)
    x, y = qkv.detach().float().requires_grad_(), qkv.detach().float().requires_grad_()
    grads = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i, t in enumerate(got)]
    torch.autograd.backward(torch.ops.so8t.qkv_rope(x, cos.float(), sin.float(), *shape[2:5]), grads)
    torch.autograd.backward(_stock(y, cos.float(), sin.float(), *shape[2:5]), grads)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-6)


def test_broadcast_cos_over_the_batch(triton_backend):
    heads, kv_heads, head_dim = 2, 2, 8
    qkv, cos, sin = _inputs(3, 4, heads, kv_heads, head_dim, 8, torch.float32)
    one_cos, one_sin = cos[:1], sin[:1]  # one row of positions for every batch row
    got = torch.ops.so8t.qkv_rope(qkv, one_cos, one_sin, heads, kv_heads, head_dim)
    want = qkv_rope_torch(qkv, one_cos.expand_as(cos), one_sin.expand_as(sin), heads, kv_heads, head_dim)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_odd_or_too_wide_rotary_is_refused(triton_backend):
    qkv, cos, sin = _inputs(1, 2, 2, 2, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="need an even count"):
        torch.ops.so8t.qkv_rope(qkv, cos[..., :7], sin[..., :7], 2, 2, 8)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(monkeypatch, backend):
    _use_backend(monkeypatch, backend)
    qkv, cos, sin = _inputs(1, 4, 2, 1, 8, 8, torch.float32)
    torch.library.opcheck(torch.ops.so8t.qkv_rope.default, (qkv.requires_grad_(), cos, sin, 2, 1, 8))


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_so8t_phi3_with_the_op_matches_the_unfused_path(monkeypatch, backend):
    from tiny_models import random_ids, randomize_rotations, tiny_so8t

    _use_backend(monkeypatch, backend)
    model = tiny_so8t(partial_rotary_factor=0.5).to(DEVICE).train()
    randomize_rotations(model)
    _set_fused(model, True)
    ids = random_ids(2, 12).to(DEVICE)
    calls = _count_op_calls(monkeypatch)
    fused_logits, fused_grads = _loss_and_grads(model, ids)
    assert len(calls) == model.config.num_hidden_layers  # every layer took the op
    _set_fused(model, False)
    plain_logits, plain_grads = _loss_and_grads(model, ids)
    assert len(calls) == model.config.num_hidden_layers  # ... and none did once it is off
    assert fused_grads.keys() == plain_grads.keys() and any("qkv_proj" in n for n in fused_grads)
    if backend == "torch":
        assert torch.equal(fused_logits, plain_logits)
    torch.testing.assert_close(fused_logits, plain_logits, rtol=1e-5, atol=1e-5)
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_generation_with_a_cache_keeps_the_unfused_path(monkeypatch):
    from tiny_models import random_ids, tiny_so8t

    model = tiny_so8t()
    _set_fused(model, True)
    calls = _count_op_calls(monkeypatch)
    with torch.no_grad():
        model.generate(random_ids(1, 4), max_new_tokens=3, do_sample=False)
    assert calls == []


def test_auto_turns_the_op_on_for_cuda_runs_only_and_on_turns_it_on(tmp_path, monkeypatch):
    from tiny_models import random_ids, tiny_so8t, tiny_tokenizer, token_dataset

    from so8t_hf.training.peft_setup import default_lora_config
    from so8t_hf.training.trainer import SO8TConfig, SO8TTrainer

    calls = _count_op_calls(monkeypatch)
    model = tiny_so8t()
    with torch.no_grad():
        model(input_ids=random_ids(1, 6), use_cache=False)
    assert calls == []  # a plain SO8T-Phi3 keeps transformers' path
    assert SO8TConfig(output_dir=str(tmp_path), use_cpu=True).fused_qkv_rope == "auto"
    for setting, expected in (("off", False), ("auto", False), ("on", True)):  # auto: a CPU run keeps it off
        args = SO8TConfig(output_dir=str(tmp_path / setting), max_steps=1, per_device_train_batch_size=2,
                          report_to=[], use_cpu=True, bf16=False, max_length=32, save_strategy="no",
                          fused_qkv_rope=setting, dataloader_num_workers=0, disable_tqdm=True)
        trainer = SO8TTrainer(model=tiny_so8t(), args=args, train_dataset=token_dataset(),
                              processing_class=tiny_tokenizer(), peft_config=default_lora_config(r=4, alpha=8, dropout=0.0))
        flags = {m.fused_qkv_rope for m in trainer.model.modules() if hasattr(m, "qkv_proj") and hasattr(m, "fused_qkv_rope")}
        assert flags == {expected}
        calls.clear()
        trainer.train()
        assert bool(calls) == expected  # the training forwards took the op only when it was on
