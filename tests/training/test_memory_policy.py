"""The memory policy's arithmetic (activation_checkpointing_layers=auto): the budget from the measured free memory
under a user cap, and how many Phi-3.5-mini layers that leaves checkpointed."""

import pytest
import torch
from tiny_models import tiny_so8t

from so8t_hf.training.memory import (
    GIB,
    apply_checkpoint_policy,
    auto_checkpointed_count,
    layer_activation_bytes,
    memory_budget,
)

PHI35 = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32)


def test_budget_is_what_the_run_holds_plus_90_percent_of_free_memory_under_the_cap():
    assert memory_budget(8 * GIB, 10 * GIB, None) == 17 * GIB
    assert memory_budget(8 * GIB, 10 * GIB, 11.26) == int(11.26 * GIB)  # the cap wins
    assert memory_budget(8 * GIB, 2 * GIB, 11.26) == int(9.8 * GIB)  # the free memory wins (another process)


def test_layer_count_from_the_budget_phi35_at_8192_tokens():
    config = tiny_so8t().config.__class__(**PHI35)
    per_layer = layer_activation_bytes(config, 8192)
    assert per_layer == 8192 * 2 * (12 * 3072 + 4 * 8192)  # ~1.06 GiB
    # reserve: 32 saved layer inputs (1.5 GiB) + one recomputed layer + 1 GiB slack = 3.5625 GiB
    assert auto_checkpointed_count(config, 32, 8192, 0, 8 * GIB, 24 * GIB) == 32 - 11  # 12.44 GiB spare -> 11 layers
    # under stock's peak (11.26 GiB) with the 3.8B bf16 base held (~7.9 GiB) nothing fits: every layer checkpointed
    assert auto_checkpointed_count(config, 32, 8192, 0, int(7.9 * GIB), int(11.26 * GIB)) == 32
    # trainable parameters count three times (weights, gradients, AdamW's two moments in fp32 ~ weights x 2)
    fewer = auto_checkpointed_count(config, 32, 8192, 2 * GIB, 8 * GIB, 24 * GIB)
    assert fewer == 32 - 6  # 12.44 - 6 GiB spare -> 6.44 / 1.0625 -> 6 layers kept


@pytest.mark.parametrize("free_gib, tokens, kept", [(70, 8192, 32), (14, 8192, 8), (14, 2048, 32), (2, 2048, 0)])
def test_kept_layers_follow_the_measured_free_memory(free_gib, tokens, kept):
    """80 GB card (70 GiB free) keeps every layer at 8,192 tokens; a 24 GB card (14 GiB free) keeps 8."""
    config = tiny_so8t().config.__class__(**PHI35)
    budget = memory_budget(int(7.9 * GIB), free_gib * GIB, None)
    assert 32 - auto_checkpointed_count(config, 32, tokens, 0, int(7.9 * GIB), budget) == kept


class _Layer(__import__("transformers").modeling_layers.GradientCheckpointingLayer):
    def __init__(self, linear):
        super().__init__()
        self.proj = linear
        self.gradient_checkpointing = True


class Linear4bit(torch.nn.Linear):  # bitsandbytes' class name is what the policy looks for
    pass


def _stack(linear_type, n=4):
    model = torch.nn.Sequential(*[_Layer(linear_type(8, 8)) for _ in range(n)])
    model.config = tiny_so8t().config.__class__(**PHI35)
    return model


def test_auto_is_the_default_and_keeps_4bit_bases_checkpointed(tmp_path):
    from so8t_hf.training.config import SO8TConfig

    assert SO8TConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]).activation_checkpointing_layers == "auto"
    model = _stack(Linear4bit)
    assert apply_checkpoint_policy(model, "auto", tokens=8192) is None
    assert [m.gradient_checkpointing for m in model] == [True] * 4
    assert apply_checkpoint_policy(model, 1, tokens=8192) == 1  # a number still applies
    assert [m.gradient_checkpointing for m in model] == [True, False, False, False]


def test_auto_spends_the_measured_free_memory_on_float_bases(monkeypatch):
    model = _stack(torch.nn.Linear)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[0], 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: int(7.9 * GIB))
    monkeypatch.setattr(torch.nn.Parameter, "device", property(lambda self: torch.device("cuda", 0)), raising=False)
    free = [70 * GIB]
    # 4 Phi-3.5-sized layers at 2,048 tokens fit in 70 GiB: none checkpointed
    assert apply_checkpoint_policy(model, "auto", tokens=2048) == 0
    assert [m.gradient_checkpointing for m in model] == [False] * 4
    model = _stack(torch.nn.Linear)
    free = [3 * GIB]  # another process took the card: budget 7.9 + 2.7 GiB, every layer stays checkpointed
    assert apply_checkpoint_policy(model, "auto", tokens=8192, budget_gib=None) == 4
    model = _stack(torch.nn.Linear)
    free = [70 * GIB]  # the user's cap wins over the free memory: 2.1 GiB above the base, under the 2.25 GiB reserve
    assert apply_checkpoint_policy(model, "auto", tokens=8192, budget_gib=10.0) == 4
