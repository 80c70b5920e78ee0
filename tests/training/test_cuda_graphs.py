"""Graphed checkpointed layers (`training/cuda_graphs.py`) on the CPU's eager stand-in: the same static buffers,
padding to the token budget, sequence-start padding and recompute as the CUDA graphs, so losses and every gradient
must equal plain checkpointing's; calls the graphs cannot take run the checkpointed layer and say why."""

import copy
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

from so8t_hf.training.cuda_graphs import graph_layers, graphs_unusable_reason, ungraph_layers
from so8t_hf.training.fused_lora import enable_fused_lora
from so8t_hf.training.memory import checkpoint_layers
from tiny_models import randomize_rotations, tiny_so8t


def _lora_model(fused: bool):
    model = tiny_so8t(num_hidden_layers=3, so8t_layers="all")
    model.config._attn_implementation = "so8t"
    randomize_rotations(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                                             modules_to_save=["so8_rotation"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)  # PEFT starts B at zero
    model.train()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _pair(fused: bool):
    """Two equal models, each with its own fused LoRA closures (a deepcopy would share the original's)."""
    plain = _lora_model(fused)
    graphed = copy.deepcopy(plain)
    if fused:
        enable_fused_lora(plain)
        enable_fused_lora(graphed)
    return plain, graphed


def _packed_batch(lengths, seed=0, vocab=128):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, sum(lengths)), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return dict(input_ids=ids, labels=ids.clone(), position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                max_length_q=max(lengths), max_length_k=max(lengths))


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("fused", [False, True], ids=["peft_forward", "fused_lora"])
def test_graphed_layers_equal_checkpointing_losses_and_every_gradient(fused, caplog):
    plain, graphed = _pair(fused)
    layers = [m for m in checkpoint_layers(graphed) if m.gradient_checkpointing]
    assert len(layers) == 3
    with caplog.at_level(logging.INFO, logger="so8t_hf"):
        stack = graph_layers(layers, token_budget=40, use_graphs=False)
    assert "3 checkpointed decoder layers" in caplog.text and "eager stand-in" in caplog.text
    assert all(not layer.gradient_checkpointing for layer in layers)
    # under the budget (padding sequence), exactly the budget, fewer sequences, then more than the static count
    for k, lengths in enumerate([[7, 12, 5], [20, 20], [33], [9, 9, 9, 9, 4]]):
        batch = _packed_batch(lengths, seed=k)
        loss_p, logits_p, grads_p = _step(plain, batch)
        loss_g, logits_g, grads_g = _step(graphed, batch)
        torch.testing.assert_close(loss_g, loss_p, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(logits_g, logits_p, atol=1e-5, rtol=1e-5)
        assert grads_g.keys() == grads_p.keys()
        assert any("lora_A" in n for n in grads_p) and any("so8_rotation" in n for n in grads_p)
        for name in grads_p:
            torch.testing.assert_close(grads_g[name], grads_p[name], atol=1e-6, rtol=1e-5, msg=name)
    assert stack.replays == 4 * 2 * 3 and not stack.fallbacks
    ungraph_layers(stack)
    assert all(layer.gradient_checkpointing and "forward" not in layer.__dict__ for layer in layers)


def test_more_sequences_than_captured_recaptures_with_a_larger_count(caplog):
    model = _pair(fused=True)[1]
    stack = graph_layers([m for m in checkpoint_layers(model) if m.gradient_checkpointing], 40, use_graphs=False)
    stack.max_sequences = 2
    _step(model, _packed_batch([5, 6]))
    assert stack.max_sequences == 4  # two sequences and the padding one
    with caplog.at_level(logging.INFO, logger="so8t_hf"):
        _step(model, _packed_batch([4, 4, 4, 4, 4]))
    assert stack.max_sequences == 8 and "recapturing for up to 8" in caplog.text
    assert int(stack.step_inputs["cu"][6]) == 40 and stack.step_inputs["cu"].numel() == 9


def test_the_padding_is_cut_to_the_length_bucket_and_each_bucket_has_its_graphs():
    plain, graphed = _pair(fused=True)
    stack = graph_layers([m for m in checkpoint_layers(graphed) if m.gradient_checkpointing], 40, use_graphs=False)
    stack.smallest_length_bucket = 8
    cases = [([3, 3], 8, [0, 3, 6, 14, 22, 30, 38, 40, 40]), ([7, 12, 5], 16, [0, 7, 19, 24, 40, 40]),
             ([33], 40, [0, 33, 40, 40]), ([3, 3], 8, None)]
    for lengths, bucket, starts in cases:
        batch = _packed_batch(lengths)
        loss_p, logits_p, grads_p = _step(plain, batch)
        loss_g, logits_g, grads_g = _step(graphed, batch)
        assert stack.length == bucket
        if starts is not None:
            assert stack.step_inputs["cu"][: len(starts)].tolist() == starts
            assert int(stack.step_inputs["cu"][-1]) == 40
        torch.testing.assert_close(loss_g, loss_p, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(logits_g, logits_p, atol=1e-5, rtol=1e-5)
        for name in grads_p:
            torch.testing.assert_close(grads_g[name], grads_p[name], atol=1e-6, rtol=1e-5, msg=name)
    assert all(set(r.forward_graphs) == set(r.backward_graphs) == {8, 16, 40} for r in stack.runners)
    assert stack.steps_per_length == {8: 2, 16: 1, 40: 1}
    kwargs = stack.layer_kwargs(None, None)
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 8


def test_length_bucket():
    from so8t_hf.training.cuda_graphs import length_bucket

    assert [length_bucket(n, 8192, 512) for n in (1, 512, 513, 608, 1024, 5000, 8192)] == \
        [512, 512, 1024, 1024, 1024, 8192, 8192]
    assert length_bucket(700, 600, 512) == 600  # never above the budget


def test_calls_the_graphs_cannot_take_run_the_checkpointed_layer_and_say_why(caplog):
    plain, graphed = _pair(fused=True)
    stack = graph_layers([m for m in checkpoint_layers(graphed) if m.gradient_checkpointing], 16, use_graphs=False)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (2, 10), generator=gen)
    batches = [dict(input_ids=ids, labels=ids), _packed_batch([12, 9])]  # two padded rows; over the 16-token budget
    with caplog.at_level(logging.INFO, logger="so8t_hf"):
        for batch in batches:
            loss_p, _, grads_p = _step(plain, batch)
            loss_g, _, grads_g = _step(graphed, batch)
            torch.testing.assert_close(loss_g, loss_p)
            for name in grads_p:
                torch.testing.assert_close(grads_g[name], grads_p[name], atol=1e-6, rtol=1e-5, msg=name)
    assert stack.replays == 0
    assert set(stack.fallbacks) == {"not one packed row (hidden (2, 10, 64))", "21 tokens exceed the budget of 16"}
    assert "runs eagerly (checkpointed): 21 tokens exceed the budget of 16" in caplog.text
    with torch.no_grad():
        graphed.eval()
        graphed(**_packed_batch([5, 6]))
    assert "no grad" in stack.fallbacks or "eval mode" in stack.fallbacks


def test_settings_that_forbid_graphs_are_named():
    from so8t_hf.training.config import SO8TConfig

    base = dict(output_dir="/tmp/x", use_cpu=True, report_to="none")
    assert graphs_unusable_reason(SO8TConfig(**base, padding_free=True)) is None
    assert "padding-free" in graphs_unusable_reason(SO8TConfig(**base, padding_free=False))
    assert "checkpointing is off" in graphs_unusable_reason(SO8TConfig(**base, padding_free=True,
                                                                       activation_checkpointing=False))
    with pytest.raises(ValueError, match="cuda_graphs='sometimes'"):
        SO8TConfig(**base, cuda_graphs="sometimes")


def test_auto_graphs_layers_with_4bit_bases_only(monkeypatch, caplog):
    import types

    import so8t_hf.training.cuda_graphs as cuda_graphs
    from so8t_hf.training.config import SO8TConfig

    assert SO8TConfig(output_dir="/tmp/x", use_cpu=True, report_to="none").cuda_graphs == "auto"
    model = _pair(fused=False)[1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the decision only; nothing is captured
    graphed = []
    monkeypatch.setattr(cuda_graphs, "graph_layers", lambda layers, budget, use_graphs: graphed.append(
        (len(layers), use_graphs)) or types.SimpleNamespace())
    args = types.SimpleNamespace(activation_checkpointing=True, activation_checkpointing_kwargs={}, padding_free=True,
                                 world_size=1, use_cpu=False)
    with caplog.at_level(logging.INFO, logger="so8t_hf"):
        cuda_graphs.CudaGraphCallback("auto", 64).on_train_begin(args, None, None, model=model)
    assert graphed == [] and "CUDA graphs off (auto): the layers have float bases" in caplog.text
    cuda_graphs.CudaGraphCallback("on", 64).on_train_begin(args, None, None, model=model)
    assert graphed == [(3, True)]

    class Linear4bit(torch.nn.Module):  # bitsandbytes' class name is what the rule looks for
        pass

    layers = [m for m in checkpoint_layers(model) if m.gradient_checkpointing]
    layers[1].mlp.add_module("quantised", Linear4bit())
    cuda_graphs.CudaGraphCallback("auto", 64).on_train_begin(args, None, None, model=model)
    assert graphed == [(3, True), (3, True)]


def test_gradients_accumulate_over_micro_batches_as_with_checkpointing():
    plain, graphed = _pair(fused=True)
    graph_layers([m for m in checkpoint_layers(graphed) if m.gradient_checkpointing], 40, use_graphs=False)
    grads = []
    for model in (plain, graphed):
        model.zero_grad(set_to_none=True)
        for k, lengths in enumerate([[7, 12, 5], [20, 20], [9, 3]]):  # three micro-batches, one optimizer step
            (model(**_packed_batch(lengths, seed=k)).loss / 3).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("so8_rotation" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
