"""SO8T-Phi3: config errors, identity load of a stock Phi-3, the rotation maths, merge, remote-code save/load."""

import json
import logging

import pytest
import torch
from isolation import remote_load_max_diff
from paths import PHI35_TOKENIZER, REPO
from tiny_models import TINY, random_ids, randomize_rotations, tiny_phi3, tiny_so8t
from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3ForCausalLM

from so8t_hf import (
    So8Rotation,
    So8tPhi3Config,
    So8tPhi3ForCausalLM,
    merge_so8t_rotations,
    rotation_health,
)
from so8t_hf.rotation import blockdiag_rotation

# ----------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=60, num_attention_heads=4, num_key_value_heads=2), "hidden_size=60"),
        (dict(hidden_size=64, num_attention_heads=16, num_key_value_heads=8), "head dim"),
        (dict(so8t_layers=[0, 2]), "so8t_layers contains 2"),
        (dict(so8t_layers=[-3]), "so8t_layers contains -3"),
        (dict(so8t_layers="some"), "so8t_layers='some'"),
        (dict(so8t_attn_backend="cuda_magic"), "so8t_attn_backend='cuda_magic'"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(Exception, match=field.replace("[", r"\[").replace("(", r"\(")):
        So8tPhi3Config(**{**TINY, **overrides})


def test_layer_selection():
    assert So8tPhi3Config(**TINY).so8t_layer_indices() == [0, 1]
    assert So8tPhi3Config(**TINY, so8t_layers=[-1]).so8t_layer_indices() == [1]
    model = tiny_so8t(so8t_layers=[1])
    names = [n for n, _ in model.named_parameters() if "so8" in n]
    assert names == ["model.layers.1.self_attn.so8_rotation.theta"]
    assert model.model.layers[1].self_attn.so8_rotation.theta.shape == (8, 8, 8)  # (hidden/8, 8, 8)


# ----------------------------------------------------------------------------------------- rotation


def test_rotation_is_orthogonal_with_det_one():
    rotation = So8Rotation(64)
    with torch.no_grad():
        rotation.theta.copy_(torch.randn(8, 8, 8) * 2.0)
    r = rotation.rotation_matrices()
    assert rotation.orthogonality_error() < 1e-6
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(8, dtype=r.dtype), atol=1e-10, rtol=0)
    assert rotation.angle_norm() > 1.0


def test_rotation_acts_per_8_block_as_x_at_R():
    rotation = So8Rotation(32)
    with torch.no_grad():
        rotation.theta.copy_(torch.randn(4, 8, 8))
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    r = rotation.rotation_matrices()
    expected = torch.cat([x[..., 8 * b : 8 * b + 8] @ r[b] for b in range(4)], dim=-1)
    torch.testing.assert_close(rotation(x), expected)
    torch.testing.assert_close(rotation(x), x @ blockdiag_rotation(rotation))


def test_rotation_gradcheck_float64():
    rotation = So8Rotation(16).double()
    theta = (torch.randn(2, 8, 8, dtype=torch.float64) * 0.5).requires_grad_(True)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)

    def rotate(inp, generators):
        return torch.func.functional_call(rotation, {"theta": generators}, (inp,))

    assert torch.autograd.gradcheck(rotate, (x, theta))


def test_rotation_health_reports_identity_at_init():
    health = rotation_health(tiny_so8t())
    assert health["so8_angle_norm"] == 0.0
    assert health["so8_orthogonality_error"] < 1e-6


# ----------------------------------------------------------------------------------------- loading


def test_stock_phi3_loads_with_identity_rotation_and_same_logits(tmp_path, caplog, capfd):
    stock = tiny_phi3(seed=3)
    stock.save_pretrained(tmp_path)
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="so8t_hf"):
        model = So8tPhi3ForCausalLM.from_pretrained(tmp_path, so8t_layers=[0, 1]).eval()
    ids = random_ids(2, 19)
    with torch.no_grad():
        diff = (stock(ids).logits - model(ids).logits).abs().max().item()
    assert diff <= 1e-5
    for rotation in model.so8_rotations().values():
        assert torch.count_nonzero(rotation.theta) == 0
    new_param_logs = [r.getMessage() for r in caplog.records if "SO(8) rotation generators" in r.getMessage()]
    assert new_param_logs == ["SO8T: 2 new SO(8) rotation generators (self_attn.so8_rotation.theta, layers 0, 1) initialised to identity."]
    stderr = capfd.readouterr().err
    assert "to instantiate a model of type" not in stderr
    assert "newly initialized" not in stderr and "MISSING" not in stderr


def test_save_writes_auto_map_and_modeling_files(tmp_path):
    model = tiny_so8t()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "so8t_phi3"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_so8t_phi3.So8tPhi3Config",
        "AutoModelForCausalLM": "modeling_so8t_phi3.So8tPhi3ForCausalLM",
    }
    assert (tmp_path / "configuration_so8t_phi3.py").read_text() == (REPO / "so8t_hf/modeling/configuration_so8t_phi3.py").read_text()
    assert (tmp_path / "modeling_so8t_phi3.py").read_text() == (REPO / "so8t_hf/modeling/modeling_so8t_phi3.py").read_text()


def test_remote_code_load_in_a_process_without_so8t_hf(tmp_path):
    model = tiny_so8t(seed=5)
    randomize_rotations(model)
    model.save_pretrained(tmp_path / "ckpt")
    ids = random_ids(2, 13)
    with torch.no_grad():
        expected = model(ids).logits
    assert remote_load_max_diff(tmp_path / "ckpt", ids, expected, tmp_path) == 0.0


def test_trained_rotation_round_trips_through_save(tmp_path):
    model = tiny_so8t(seed=2)
    randomize_rotations(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    for layer, rotation in model.so8_rotations().items():
        torch.testing.assert_close(loaded.so8_rotations()[layer].theta, rotation.theta, rtol=0, atol=0)
    ids = random_ids(1, 11)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- merge


def test_merge_gives_plain_phi3_with_equal_logits(tmp_path):
    model = tiny_so8t(seed=7)
    randomize_rotations(model, scale=0.5)
    plain = merge_so8t_rotations(model)
    assert type(plain) is Phi3ForCausalLM and plain.config.model_type == "phi3"
    assert not any("so8" in n for n, _ in plain.named_parameters())
    ids = random_ids(2, 23)
    with torch.no_grad():
        ref = model(ids).logits
        merged = plain(ids).logits
    assert ((merged - ref).norm() / ref.norm()).item() <= 1e-4
    # the rotation changed the function, so the merge is not vacuous
    w_before = model.model.layers[0].self_attn.o_proj.weight
    assert not torch.allclose(plain.model.layers[0].self_attn.o_proj.weight, w_before)
    # the wrong formula W_o @ R would not match
    r = blockdiag_rotation(model.so8_rotations()[0]).float()
    torch.testing.assert_close(plain.model.layers[0].self_attn.o_proj.weight, w_before @ r.T, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain.model.layers[0].self_attn.o_proj.weight, w_before @ r, atol=1e-4)

    plain.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "phi3" and "auto_map" not in config and "so8t_layers" not in config
    assert not list(tmp_path.glob("*.py"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no remote code
    assert type(reloaded) is Phi3ForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merged, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- real tokenizer


@pytest.mark.skipif(not PHI35_TOKENIZER.is_dir(), reason=f"Phi-3.5 tokenizer fixture not found at {PHI35_TOKENIZER}")
def test_round_trip_with_real_phi35_tokenizer(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(PHI35_TOKENIZER)
    model = tiny_so8t(seed=4, vocab_size=32064, pad_token_id=32000, eos_token_id=32000)
    randomize_rotations(model)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    text = "<|user|>\nSO(8) の回転とは何ですか? What is a rotation?<|end|>\n<|assistant|>\n"
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == tok2(text, return_tensors="pt").input_ids.tolist()
    assert 32010 in ids[0].tolist() and 32001 in ids[0].tolist()  # <|user|>, <|assistant|> are single tokens
    assert tok2.decode(ids[0], skip_special_tokens=True) == "SO(8) の回転とは何ですか? What is a rotation?"
    with torch.no_grad():
        torch.testing.assert_close(model2(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_bf16_load_keeps_so8_generators_fp32(tmp_path):
    model = tiny_so8t(seed=6)
    randomize_rotations(model)
    model.save_pretrained(tmp_path)
    half = So8tPhi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert half.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    for rotation in half.so8_rotations().values():
        assert rotation.theta.dtype == torch.float32
    ids = random_ids(1, 9)
    with torch.no_grad():
        logits = half(ids).logits
        ref = model(ids).logits
    assert logits.dtype == torch.bfloat16
    assert ((logits.float() - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("bumps_version", [True, False])
def test_no_grad_rotation_is_cached_until_theta_changes(bumps_version):
    rotation = So8Rotation(16)
    x = torch.randn(2, 16)
    with torch.no_grad():
        first = rotation(x)
        cached = rotation._cached[2]
        assert rotation(x) is not first and rotation._cached[2] is cached  # reused
        version = rotation.theta._version
        if bumps_version:
            rotation.theta.add_(0.1)  # an optimizer step / load changes the version
        else:
            rotation.theta.data.add_(0.1)  # as fused AdamW does: the value changes, `_version` does not
            assert rotation.theta._version == version
        changed = rotation(x)
    assert rotation._cached[2] is not cached
    torch.testing.assert_close(changed, x @ blockdiag_rotation(rotation).float())
    out = rotation(x)  # with autograd: fresh R, gradients reach theta
    out.sum().backward()
    assert rotation.theta.grad is not None and rotation.theta.grad.abs().sum() > 0


@pytest.mark.parametrize("attn", ["eager", "sdpa", "so8t"])
def test_kv_cache_generation_equals_stock_phi3_and_full_recompute(attn):
    """Decoding with a KV cache (left-padded batch) gives the stock Phi-3's tokens and those of a cache-free
    recompute: the attention must update whichever cache argument the installed transformers passes."""
    stock = tiny_phi3(seed=5)
    model = So8tPhi3ForCausalLM(So8tPhi3Config(**TINY)).eval()
    model.load_state_dict(stock.state_dict(), strict=False)  # identity rotations
    stock.config._attn_implementation = "eager" if attn == "so8t" else attn
    model.config._attn_implementation = attn
    prompt = random_ids(2, 9, seed=8)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, attention_mask=mask)
    expected = stock.generate(prompt, **kwargs)
    cached = model.generate(prompt, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.tolist() == expected.tolist()
    assert uncached.tolist() == expected.tolist()
