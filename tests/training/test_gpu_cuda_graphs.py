"""GPU checks (`pytest -m gpu`) of graphed checkpointed layers with real CUDA graphs: bf16 autocast, the fused LoRA
path on float and NF4 bases, packed micro-batches of changing lengths, one with more sequences than captured (a recapture into a fresh pool). Losses and gradients must match plain
checkpointing within bf16 tolerance, every step after the first must replay graphs, and nothing must run eagerly."""

import copy
import importlib.util

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import randomize_rotations, tiny_so8t

from so8t_hf.training.cuda_graphs import graph_layers, ungraph_layers
from so8t_hf.training.fused_lora import enable_fused_lora
from so8t_hf.training.memory import checkpoint_layers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(nf4: bool):
    model = tiny_so8t(num_hidden_layers=3, so8t_layers="all", hidden_size=256, intermediate_size=512,
                      num_attention_heads=8, num_key_value_heads=8)
    model.config._attn_implementation = "so8t"
    randomize_rotations(model)
    if nf4:
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"), (layer.mlp, "gate_up_proj"),
                                 (layer.mlp, "down_proj")):
                old = getattr(parent, name)
                new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False, compute_dtype=torch.bfloat16,
                                        quant_type="nf4", compress_statistics=True)
                new.weight = bnb.nn.Params4bit(old.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                               compress_statistics=True)
                setattr(parent, name, new)
    model = model.to(torch.bfloat16)
    for m in model.modules():
        if type(m).__name__ == "So8Rotation":
            m.float()
    model = model.cuda()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, modules_to_save=["so8_rotation"],
                                             target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.train()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _batch(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (1, sum(lengths)), generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    b = dict(input_ids=ids, labels=ids.clone(), position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
             cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    b = {k: v.cuda() for k, v in b.items()}
    return {**b, "max_length_q": max(lengths), "max_length_k": max(lengths)}


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("nf4", [False, pytest.param(True, marks=pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed"))], ids=["bf16", "nf4"])
def test_cuda_graph_layers_match_checkpointing_on_the_gpu(nf4):
    plain = _model(nf4)
    graphed = copy.deepcopy(plain) if not nf4 else _model(nf4)  # bitsandbytes weights: build the same model again
    for model in (plain, graphed):
        assert enable_fused_lora(model)["nf4" if nf4 else "dense"] == 12
    before = torch.cuda.memory_allocated()
    stack = graph_layers([m for m in checkpoint_layers(graphed) if m.gradient_checkpointing], 1024, use_graphs=True)
    stack.max_sequences = 6  # the 8 x 30 pack (10 with its padding) then recaptures every graph into a fresh pool
    # length buckets 512 (padding cut into two sequences) and 1024; recapture; then 512 again
    for k, lengths in enumerate([[100, 60, 40], [700, 200], [30] * 8, [77, 101], [100, 60, 40]]):
        batch = _batch(lengths, seed=k % 4)
        loss_p, grads_p = _step(plain, batch)
        loss_g, grads_g = _step(graphed, batch)
        torch.testing.assert_close(loss_g, loss_p, atol=2e-3, rtol=2e-3)
        assert grads_g.keys() == grads_p.keys()
        for name in grads_p:
            scale = grads_p[name].abs().max().item() + 1e-6
            err = (grads_g[name] - grads_p[name]).abs().max().item()
            assert err <= 0.02 * scale, f"step {k} {name}: {err} vs max {scale}"
        if k == 0:  # static buffers and graph scratch memory only: one side stream, so one cuBLAS workspace
            graphs_mib = (torch.cuda.memory_allocated() - before) / 2**20
            assert graphs_mib < 200, f"graphing 3 tiny layers holds {graphs_mib:.0f} MiB"  # was a stream per graph: 9 x 32+
    assert all(set(r.forward_graphs) == set(r.backward_graphs) == {512} for r in stack.runners)
    assert all(g.graph is not None for r in stack.runners for g in (*r.forward_graphs.values(), *r.backward_graphs.values()))
    assert stack.replays == 5 * 2 * 3 and not stack.fallbacks and stack.max_sequences == 12
    assert stack.steps_per_length == {512: 4, 1024: 1}
    ungraph_layers(stack)
