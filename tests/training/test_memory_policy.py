"""The memory policy's arithmetic (activation_checkpointing_layers=auto): the budget from the measured free memory
under a user cap, and how many Phi-3.5-mini layers that leaves checkpointed."""

import pytest
from tiny_models import tiny_so8t

from so8t_hf.training.memory import GIB, auto_checkpointed_count, layer_activation_bytes, memory_budget

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
