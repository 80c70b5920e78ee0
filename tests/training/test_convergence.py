"""Convergence guard (the model: Liger-Kernel's `test/convergence`): the tiny SO8T-Phi3 trains the same few steps on
every attention backend, both SO(8) rotation paths, and packed vs padded batches of the same rows; the loss agrees
at every step and the trained parameters agree at the end, against the reference path (eager attention, einsum
rotation, padded batch).

Set-up: the recipe's trainables (LoRA r4 on all Phi-3 linears + the SO(8) generators) and optimizer (AdamW,
lr 1e-2, SO(8) 5e-2), fp32, 4 steps of 4 learnable rows (8-40 tokens), one data order. Packed = TRL's padding-free
batch of the same 4 rows (one row, `position_ids` restarting per sequence). The Triton kernels run under
TRITON_INTERPRET=1 (conftest).

Tolerances. The paths compute the same sums in another order (online vs dense softmax, tiled kernels, packed vs
padded rows), so they differ by float32 rounding only. Measured here (torch 2.13 CPU): per-step losses agree to
<= 1e-7 relative, final parameters to <= 1.6e-6 absolute. Allowed: losses 1e-5 relative, parameters 1e-5
absolute + 1e-4 relative, about 6-100x the measured noise. Measured bugs, for scale: packed rows that see each
other move the losses by 1e-3 - 6e-3 relative; a transposed SO(8) dR moves them by 2e-3 - 7e-3 and theta by 0.4;
a softmax scale off by 0.1% on one backend leaves the losses within 1e-6 but moves the parameters by 1.2e-4.
"""

import pytest
import torch
from tiny_models import tiny_so8t, tiny_tokenizer

from so8t_hf import BACKEND_COUNTS
from so8t_hf.ops import so8_rotation
from so8t_hf.training.peft_setup import default_lora_config
from so8t_hf.training.trainer import SO8TConfig, SO8TTrainer

STEPS = 4
LOSS_RTOL = 1e-5
PARAM_ATOL, PARAM_RTOL = 1e-5, 1e-4


def pattern_dataset(rows: int = 16, seed: int = 7):
    """Learnable rows (so the loss falls within a few steps and each update shows in the next loss): arithmetic
    runs of tokens, `start + i * stride` over the tiny vocabulary, of 8-40 tokens."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        length, start, stride = (torch.randint(lo, hi, (1,), generator=gen).item()
                                 for lo, hi in ((8, 41), (0, 125), (1, 4)))
        out.append([3 + (start + i * stride) % 125 for i in range(length)])
    return Dataset.from_dict({"input_ids": out})


def _counting(function, name, calls):
    def counted(*args, **kwargs):
        calls.append(name)
        return function(*args, **kwargs)

    return counted


def train(tmp_path, monkeypatch, attention="eager", rotation="einsum", packed=False):
    """(loss per step, trainable parameters after the last step, attention backends used, Triton rotation kernels
    launched) for one path."""
    monkeypatch.setenv("SO8T_ROTATION_BACKEND", rotation)
    kernel_calls = []
    for name in ("rotate_rows", "rotate_rows_backward"):  # the Triton rotation kernels' launchers
        monkeypatch.setattr(so8_rotation, name, _counting(getattr(so8_rotation, name), name, kernel_calls))
    model = tiny_so8t(seed=0, attn_implementation="so8t", so8t_attn_backend=attention)
    args = SO8TConfig(
        output_dir=str(tmp_path / f"{attention}-{rotation}-{packed}"), max_steps=STEPS, per_device_train_batch_size=4,
        learning_rate=1e-2, so8t_learning_rate=5e-2, lr_scheduler_type="constant", optim="adamw_torch",
        logging_steps=1, save_strategy="no", report_to=[], bf16=False, use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, padding_free=packed, max_length=None,
    )
    trainer = SO8TTrainer(model=model, args=args, train_dataset=pattern_dataset(),
                          processing_class=tiny_tokenizer(), peft_config=default_lora_config(r=4, alpha=8, dropout=0.0))
    before = dict(BACKEND_COUNTS)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    used = {name for name, count in BACKEND_COUNTS.items() if count > before.get(name, 0)}
    return losses, params, used, set(kernel_calls)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return train(tmp_path_factory.mktemp("reference"), monkeypatch)


PATHS = [  # (attention backend, rotation path, packed batch)
    ("chunked", "einsum", False),
    ("sdpa", "einsum", False),
    ("triton", "einsum", False),
    ("eager", "triton", False),
    ("eager", "einsum", True),
    ("chunked", "einsum", True),
    ("triton", "triton", True),
]


@pytest.mark.parametrize("attention, rotation, packed", PATHS)
def test_path_follows_the_reference_at_every_step(reference, tmp_path, monkeypatch, attention, rotation, packed):
    ref_losses, ref_params, ref_used, ref_kernels = reference
    assert ref_used == {"eager"} and ref_kernels == set() and ref_losses[-1] < ref_losses[0]  # it learns
    losses, params, used, kernels = train(tmp_path, monkeypatch, attention, rotation, packed)
    assert used == {attention}  # the path under test ran, and nothing else
    assert kernels == ({"rotate_rows", "rotate_rows_backward"} if rotation == "triton" else set())
    assert len(losses) == STEPS
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL), f"per-step loss {losses} vs reference {ref_losses}"
    assert params.keys() == ref_params.keys() and any("so8_rotation" in n for n in params)
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], atol=PARAM_ATOL, rtol=PARAM_RTOL, msg=name)
