"""The `so8t` attention: every backend equals eager (outputs and gradients) on causal, GQA, padded,
packed and sliding-window batches; auto choice and its observability; the chunked kernel alone."""

import contextlib
import copy
import sys

import pytest
import torch
from tiny_models import random_ids, randomize_rotations, tiny_phi3, tiny_so8t

import so8t_hf
from so8t_hf.integrations.attention import (
    BACKEND_COUNTS,
    choose_backend,
    force_attention_backend,
    so8t_mask,
    triton_kernel_available,
)
from so8t_hf.ops.chunked_attention import chunked_attention

CPU_BACKENDS = ["eager", "sdpa", "chunked"] + (["triton"] if triton_kernel_available() else [])


def _pair(backend_model_fn=tiny_so8t, **overrides):
    """(reference model on transformers' eager attention, the same weights on so8t attention)."""
    ref = backend_model_fn(seed=11, **overrides)
    if hasattr(ref, "so8_rotations"):
        randomize_rotations(ref)
    ref.config._attn_implementation = "eager"
    test = copy.deepcopy(ref)
    test.config._attn_implementation = "so8t"
    return ref, test


def _logits_and_grads(model, backend=None, **inputs):
    model.zero_grad()
    weights = inputs.pop("loss_weights")
    if backend is None:
        out = model(**inputs)
    else:
        with force_attention_backend(backend):
            out = model(**inputs)
    loss = (out.logits.float().pow(2).mean(-1) * weights).sum()
    loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(a, b, atol=1e-5):
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_causal_gqa_batch_equals_eager(backend):
    ref, test = _pair()
    ids = random_ids(2, 19)
    w = torch.ones(2, 19)
    ref_logits, ref_grads = _logits_and_grads(ref, input_ids=ids, loss_weights=w)
    logits, grads = _logits_and_grads(test, backend, input_ids=ids, loss_weights=w)
    assert so8t_hf.last_backend() == backend
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    _assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padding_mask_equals_eager(backend):
    ref, test = _pair()
    ids = random_ids(2, 16, seed=3)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, 12:] = 0  # right padding
    w = mask.float()  # compare real tokens only
    ref_logits, ref_grads = _logits_and_grads(ref, input_ids=ids, attention_mask=mask, loss_weights=w)
    logits, grads = _logits_and_grads(test, backend, input_ids=ids, attention_mask=mask, loss_weights=w)
    assert so8t_hf.last_backend() == backend
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], ref_logits[valid], atol=1e-5, rtol=1e-4)
    _assert_grads_close(grads, ref_grads)


def _packed_batch(lengths, seed=5):
    seqs = [random_ids(1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return seqs, ids, position_ids


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
def test_packed_rows_never_attend_across_sequences(backend):
    ref, test = _pair()
    seqs, ids, position_ids = _packed_batch([7, 5, 9])
    alone_logits, alone_grads = [], {}
    for seq in seqs:  # each sequence on its own, eager, summed gradients
        logits, grads = _logits_and_grads(ref, input_ids=seq[None], loss_weights=torch.ones(1, len(seq)))
        alone_logits.append(logits[0])
        alone_grads = {n: alone_grads.get(n, 0) + g for n, g in grads.items()}
    packed_logits, packed_grads = _logits_and_grads(
        test, None if backend == "auto" else backend, input_ids=ids, position_ids=position_ids, loss_weights=torch.ones(1, 21)
    )
    assert so8t_hf.last_backend() == ("chunked" if backend == "auto" else backend)
    torch.testing.assert_close(packed_logits[0], torch.cat(alone_logits), atol=1e-5, rtol=1e-4)
    _assert_grads_close(packed_grads, alone_grads)


def test_packed_two_rows_each_with_restarts():
    ref, test = _pair()
    _, ids_a, pos_a = _packed_batch([6, 8], seed=20)
    _, ids_b, pos_b = _packed_batch([10, 4], seed=30)
    ids, pos = torch.cat([ids_a, ids_b]), torch.cat([pos_a, pos_b])
    with torch.no_grad():
        expected = torch.cat([ref(input_ids=i[None, s:e]).logits[0] for i, cuts in ((ids[0], (0, 6, 14)), (ids[1], (0, 10, 14))) for s, e in zip(cuts, cuts[1:])])
        for backend in CPU_BACKENDS:
            with force_attention_backend(backend):
                got = test(input_ids=ids, position_ids=pos).logits
            torch.testing.assert_close(got.reshape(-1, got.shape[-1]), expected, atol=1e-5, rtol=1e-4, msg=backend)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "chunked"])
def test_sliding_window_equals_eager(backend):
    ref, test = _pair(sliding_window=6)
    ids = random_ids(2, 17, seed=9)
    w = torch.ones(2, 17)
    ref_logits, ref_grads = _logits_and_grads(ref, input_ids=ids, loss_weights=w)
    logits, grads = _logits_and_grads(test, backend, input_ids=ids, loss_weights=w)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    _assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stock_phi3_with_so8t_attention_equals_eager(backend):
    ref, test = _pair(tiny_phi3)
    ids = random_ids(2, 15, seed=4)
    w = torch.ones(2, 15)
    ref_logits, ref_grads = _logits_and_grads(ref, input_ids=ids, loss_weights=w)
    logits, grads = _logits_and_grads(test, backend, input_ids=ids, loss_weights=w)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    _assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("backend", ["auto", "chunked", "eager"])
def test_generation_with_kv_cache_matches_eager(backend):
    ref, test = _pair()
    prompt = random_ids(2, 9, seed=8)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # left-padded prompt
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=mask)
    expected = ref.generate(prompt, **kwargs)
    with force_attention_backend(backend):
        got = test.generate(prompt, **kwargs)
    assert got.tolist() == expected.tolist()


def test_config_backend_is_used_and_counted():
    model = tiny_so8t(so8t_attn_backend="chunked", attn_implementation="so8t")
    before = BACKEND_COUNTS["chunked"]
    with torch.no_grad():
        model(random_ids(1, 10))
    assert BACKEND_COUNTS["chunked"] - before == model.config.num_hidden_layers
    assert so8t_hf.last_backend() == "chunked"


def test_auto_choice_on_cpu_and_forced_errors():
    q = torch.randn(1, 4, 8, 16)
    assert choose_backend("auto", q, has_mask=False, packed=False, dropout=0.0) == ("sdpa", "default")
    assert choose_backend("auto", q, has_mask=False, packed=True, dropout=0.0)[0] == "chunked"
    assert choose_backend("auto", q, has_mask=True, packed=False, dropout=0.0)[0] == "sdpa"
    assert choose_backend("auto", q, has_mask=False, packed=True, dropout=0.1)[0] == "sdpa"
    with pytest.raises(RuntimeError, match="flash-attn"):
        choose_backend("flash_attn", q, has_mask=False, packed=False, dropout=0.0)
    with pytest.raises(ValueError, match="no dropout"):
        choose_backend("chunked", q, has_mask=False, packed=False, dropout=0.1)
    with pytest.raises(ValueError, match="Unknown so8t attention backend 'fast'"):
        choose_backend("fast", q, has_mask=False, packed=False, dropout=0.0)


def test_mask_function_only_materialises_what_the_attention_cannot_derive():
    full = torch.ones(2, 6, dtype=torch.bool)
    assert so8t_mask(2, 6, 6, attention_mask=full) is None
    assert so8t_mask(2, 6, 6, attention_mask=None) is None
    from transformers.masking_utils import causal_mask_function

    padded = full.clone()
    padded[0, :2] = False
    mask = so8t_mask(2, 6, 6, mask_function=causal_mask_function, attention_mask=padded)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    lower = torch.ones(6, 6, dtype=torch.bool).tril()
    assert not mask[0, 0, :, :2].any() and torch.equal(mask[1, 0], lower)


# ----------------------------------------------------------------------------------------- chunked kernel


def _dense_reference(q, k, v, scale, causal, segments=None, keep=None):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = q @ k.transpose(-1, -2) * scale
    t, n = q.shape[2], k.shape[2]
    allowed = torch.ones(t, n, dtype=torch.bool)
    if causal:
        allowed = torch.arange(n)[None] <= torch.arange(t)[:, None] + (n - t)
    allowed = allowed[None, None]
    if segments is not None:
        allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
    if keep is not None:
        allowed = allowed & keep
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return p @ v


@pytest.mark.parametrize("causal, kv_len", [(True, 37), (False, 37), (True, 45), (False, 29)])
def test_chunked_attention_matches_float64_reference(causal, kv_len):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 37, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, kv_len, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, kv_len, 16, dtype=torch.float64, requires_grad=True)
    out = chunked_attention(q, k, v, causal=causal, chunk=8)
    ref = _dense_reference(q, k, v, 16**-0.5, causal)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    expected = torch.autograd.grad(ref, (q, k, v), grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


def test_chunked_attention_segments_and_dense_mask_gradcheck():
    torch.manual_seed(1)
    q = torch.randn(1, 2, 11, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 11, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 11, 8, dtype=torch.float64, requires_grad=True)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]])
    assert torch.autograd.gradcheck(lambda a, b, c: chunked_attention(a, b, c, segments=segments, chunk=4), (q, k, v))
    keep = torch.rand(1, 1, 11, 11) > 0.3
    keep[..., 0, :] = False  # a query row that sees nothing -> zeros, zero grads
    out = chunked_attention(q, k, v, causal=False, keep_mask=keep, chunk=4)
    torch.testing.assert_close(out, _dense_reference(q, k, v, 8**-0.5, False, keep=keep))
    assert out[0, :, 0].abs().max() == 0
    assert torch.autograd.gradcheck(lambda a, b, c: chunked_attention(a, b, c, causal=False, keep_mask=keep, chunk=4), (q, k, v))


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
def test_trl_padding_free_batch_equals_sequences_alone(backend):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    ref, test = _pair()
    seqs = [random_ids(1, n, seed=40 + n)[0] for n in (9, 4, 12)]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": s.tolist()} for s in seqs])
    assert "cu_seq_lens_q" in batch and "attention_mask" not in batch
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = torch.cat([ref(input_ids=s[None]).logits[0] for s in seqs])
        with force_attention_backend(backend) if backend != "auto" else contextlib.nullcontext():
            got = test(**inputs).logits[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_chunked_attention_skips_earlier_sequences_exactly():
    torch.manual_seed(2)
    q = torch.randn(2, 4, 37, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 37, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 37, 16, dtype=torch.float64, requires_grad=True)
    segments = torch.tensor([[0] * 10 + [1] * 15 + [2] * 12, [0] * 20 + [1] * 17])
    out = chunked_attention(q, k, v, segments=segments, chunk=8)
    ref = _dense_reference(q, k, v, 16**-0.5, True, segments=segments)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


@pytest.mark.skipif(not triton_kernel_available(), reason="needs triton (the stand-in for flash-attn)")
def test_flash_attn_backend_dispatch_with_a_flash_attn_stand_in(monkeypatch):
    """flash-attn cannot be installed here: stand in our kernel (same calling conventions) to test the dispatch."""
    import types

    import so8t_hf.integrations.attention as attention
    from so8t_hf import ops

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_func, fake.flash_attn_varlen_func = ops.flash_attn_func, ops.flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(attention, "_backend_unavailable_reason", lambda name, query: None)
    ref, test = _pair()
    seqs, ids, position_ids = _packed_batch([6, 9, 4])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    padded_ids = random_ids(2, 12, seed=12)
    with torch.no_grad(), force_attention_backend("flash_attn"):
        packed = test(input_ids=ids, position_ids=position_ids).logits[0]
        padded = test(input_ids=padded_ids, attention_mask=mask).logits
        assert so8t_hf.last_backend() == "flash_attn"
    with torch.no_grad():
        torch.testing.assert_close(packed, torch.cat([ref(input_ids=s[None]).logits[0] for s in seqs]), atol=1e-5, rtol=1e-4)
        expected = ref(input_ids=padded_ids, attention_mask=mask).logits
    torch.testing.assert_close(padded[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-4)
