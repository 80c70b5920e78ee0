"""FlashAttention builds are detected by capability: a flash-attn-4 install (a `flash_attn` namespace with only
`cute`) or a build whose functions raise is never offered to `auto`, training still runs, and the log and
`so8t-hf env` name the reason. Fake builds live in a temporary folder on sys.path."""

import logging
import sys
import textwrap

import pytest
import torch
from tiny_models import tiny_so8t, tiny_tokenizer, token_dataset

import so8t_hf
from so8t_hf.integrations import attention, flash_backends
from so8t_hf.integrations.flash_backends import (
    flash_build_status,
    import_functions,
    probe_call,
    wrap_functions,
)

REFERENCE_FA = '''
import torch

def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                           softmax_scale=None, causal=False, **kw):
    out = []
    g = q.shape[1] // k.shape[1]
    for s, e in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(g, 0), vs.repeat_interleave(g, 0)
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale)
        out.append(o.transpose(0, 1))
    return torch.cat(out), None   # (out, lse) like flash-attn 4

def flash_attn_func(q, k, v, softmax_scale=None, causal=False, **kw):
    raise NotImplementedError
'''


@pytest.fixture
def fake_builds(tmp_path, monkeypatch):
    """write(files) puts a fake package tree on sys.path and forgets every cached import and probe."""

    def write(files: dict[str, str]):
        for rel, text in files.items():
            path = tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        monkeypatch.syspath_prepend(str(tmp_path))
        for name in [m for m in sys.modules if m.split(".")[0] in ("flash_attn", "flash_attn_interface")]:
            monkeypatch.delitem(sys.modules, name)
        attention.reset_backend_choices()

    yield write
    attention.reset_backend_choices()


def _fa4_namespace():
    return {"flash_attn/__init__.py": "", "flash_attn/cute/__init__.py": REFERENCE_FA}


def test_fa4_namespace_is_not_flash_attn_2(fake_builds):
    fake_builds(_fa4_namespace())
    assert isinstance(import_functions("flash_attn"), str)  # before the fix: find_spec said flash-attn 2
    assert "no flash_attn_func / flash_attn_varlen_func" in import_functions("flash_attn")
    assert not attention.flash_attn_available()
    assert not isinstance(import_functions("flash_attn_4"), str)  # the CuTe build is seen for what it is
    usable, why = flash_build_status("flash_attn_4", "cpu")
    assert not usable and "imports but needs a CUDA GPU" in why
    q = torch.randn(1, 4, 8, 16)
    assert attention.choose_backend("auto", q, has_mask=False, packed=False, dropout=0.0)[0] == "sdpa"
    with pytest.raises(RuntimeError, match="not flash-attn 2"):
        attention.choose_backend("flash_attn", q, has_mask=False, packed=False, dropout=0.0)
    with pytest.raises(RuntimeError, match="flash-attn 4"):
        attention.choose_backend("flash_attn_4", q, has_mask=False, packed=False, dropout=0.0)


def test_probe_accepts_a_correct_call_and_rejects_raising_or_wrong_ones(fake_builds):
    fake_builds({"flash_attn_interface.py": REFERENCE_FA})
    funcs = import_functions("flash_attn_3")
    assert probe_call(wrap_functions(*funcs)[1], torch.device("cpu"), torch.float32) is None

    def raises(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    def wrong(q, k, v, *args, **kwargs):
        return q * 1.0 + 0 * (k.sum() + v.sum())

    assert "raised RuntimeError: no kernel image" in probe_call(raises, torch.device("cpu"), torch.float32)
    assert "no gradient" in probe_call(lambda q, *a, **kw: q * 1.0, torch.device("cpu"), torch.float32)
    assert "is wrong" in probe_call(wrong, torch.device("cpu"), torch.float32)
    assert "returned shape" in probe_call(lambda q, *a, **k: q[:3], torch.device("cpu"), torch.float32)


def test_raising_flash_attn_2_is_not_offered_on_a_gpu(fake_builds, monkeypatch):
    """A build whose functions import but raise: the probe (run as on a GPU, here on the CPU) refuses it."""
    fake_builds({"flash_attn/__init__.py": """
        def flash_attn_func(*a, **k):
            raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
        flash_attn_varlen_func = flash_attn_func
    """})
    real = flash_backends.probe_call
    monkeypatch.setattr(flash_backends, "probe_call", lambda call, device: real(call, torch.device("cpu"), torch.float32))
    usable, why = flash_backends._probe("flash_attn", "cuda:0")
    assert not usable and "raised RuntimeError: FlashAttention only supports Ampere" in why


def test_training_runs_beside_a_fa4_install_and_logs_why_it_is_not_used(fake_builds, tmp_path, caplog):
    from so8t_hf.training.trainer import SO8TConfig, SO8TTrainer
    from so8t_hf.training.peft_setup import default_lora_config

    fake_builds(_fa4_namespace())
    model = tiny_so8t(seed=0, attn_implementation="so8t")
    args = SO8TConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
                      logging_steps=1, save_strategy="no", report_to=[], bf16=False, use_cpu=True, max_length=64,
                      seed=0, dataloader_num_workers=0, disable_tqdm=True, packing=True)
    trainer = SO8TTrainer(model=model, args=args, train_dataset=token_dataset(), processing_class=tiny_tokenizer(),
                          peft_config=default_lora_config(r=4, alpha=8, dropout=0.0))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    with caplog.at_level(logging.INFO, logger="so8t_hf"):
        trainer.train()
    assert so8t_hf.last_backend() == "chunked"
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    assert "flash_attn not offered (flash_attn has no flash_attn_func" in caplog.text


def test_env_reports_each_build_and_its_reason(fake_builds, monkeypatch):
    from so8t_hf.cli.env import environment_report, format_report

    fake_builds(_fa4_namespace())
    monkeypatch.setattr(flash_backends, "_current_device", lambda: "cpu")  # the same answer on a GPU machine
    report = environment_report()
    assert report["flash_attn_usable"] is False
    assert report["flash_builds"]["flash_attn"]["usable"] is False
    assert "not flash-attn 2" in report["flash_builds"]["flash_attn"]["why"]
    assert "flash-attn 4 (CuTe DSL) imports" in report["flash_builds"]["flash_attn_4"]["why"]
    text = format_report(report)
    assert "flash_attn_4  not offered: flash-attn 4 (CuTe DSL) imports but needs a CUDA GPU" in text


def test_measured_choice_keeps_the_default_without_flash_3_or_4(fake_builds):
    fake_builds({})
    q = torch.randn(1, 4, 64, 16)
    assert attention.measured_packed_choice("torch_varlen", q, q[:, :2], 32.0) == ("torch_varlen", None)


@pytest.mark.parametrize("default, measured", [("torch_varlen", False), ("triton", True)])
def test_auto_measures_flash_builds_on_packs_of_long_sequences_only(monkeypatch, default, measured):
    """Short-sequence packs (auto's torch_varlen) are not measured: flash-attn 4 compiles per shape for seconds there
    and gains under 1% of a step; long-sequence packs (auto's triton) are."""
    calls = []
    monkeypatch.setattr(attention, "choose_backend", lambda *a: (default, "auto's choice"))
    monkeypatch.setattr(attention, "measured_packed_choice", lambda b, *a: calls.append(b) or (b, None))
    monkeypatch.setitem(attention._BACKEND_FORWARD, default, lambda q, k, v, *a: q.transpose(1, 2))
    q = torch.randn(1, 2, 12, 8)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    attention.so8t_attention_forward(None, q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7,
                                     max_length_k=7)
    assert calls == ([default] if measured else [])


def test_auto_on_a_gpu_does_not_pick_the_fa4_namespace(fake_builds, monkeypatch):
    """The crash: on a CUDA machine with flash-attn-4, auto picked `flash_attn` from find_spec alone."""
    fake_builds(_fa4_namespace())
    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flash_backends, "_current_device", lambda: "cuda:0")
    assert attention.flash_attn_available() is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_usable_fa4_build_is_measured_per_shape_and_the_faster_kept(fake_builds, caplog):
    """On a GPU the fake FA4 (a per-sequence PyTorch loop, slow) passes the probe; auto times it against its own
    choice on the pack's shape, keeps the faster, logs the timings, and the packed rows stay exact."""
    from tiny_models import random_ids

    fake_builds(_fa4_namespace())
    assert flash_build_status("flash_attn_4")[0]
    model = tiny_so8t(seed=0, attn_implementation="so8t", hidden_size=768, num_attention_heads=8,
                      num_key_value_heads=8, intermediate_size=1536).cuda().bfloat16()
    lengths = [1500, 1100]  # long sequences: where auto measures flash-attn builds
    ids = random_ids(1, sum(lengths)).cuda()
    cu = torch.tensor([0, 1500, 2600], dtype=torch.int32, device="cuda")
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    with caplog.at_level(logging.INFO, logger="so8t_hf"):
        model(input_ids=ids, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=1500,
              max_length_k=1500).logits.float().sum().backward()
    assert "measured fwd+bwd at 4096 tokens" in caplog.text and "flash_attn_4" in caplog.text
    assert so8t_hf.last_backend() in ("triton", "flash_attn_4")
    assert len(attention._MEASURED) == 1  # one shape, measured once for both layers


def test_a_probe_inside_a_checkpointed_layer_leaves_the_checkpoint_intact(fake_builds):
    """The first attention call of a training step runs inside a checkpointed layer: the probe's own forward and
    backward must not reach the checkpoint's saved-tensor hooks (on the H100 they made it recompute the layer inside
    the probe, so flash-attn 4 was refused and the next backward failed with a different count of saved tensors)."""
    fake_builds(_fa4_namespace())
    varlen = wrap_functions(*import_functions("flash_attn_4"))[1]
    layer = torch.nn.Linear(8, 8)
    verdicts = []

    def block(x):
        verdicts.append(probe_call(varlen, torch.device("cpu"), torch.float32))
        return torch.tanh(layer(x)).square()

    x = torch.randn(4, 8, requires_grad=True)
    torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).sum().backward()
    assert verdicts[0] is None  # the probe ran and matched in the first forward
    grad_x, grad_w = x.grad.clone(), layer.weight.grad.clone()
    x.grad = layer.weight.grad = None
    torch.tanh(layer(x)).square().sum().backward()  # the same block without checkpoint or probe
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_w, layer.weight.grad)
