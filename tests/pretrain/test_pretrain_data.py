"""Pre-training data: packing (EOS between documents, nothing dropped, position ids restarting per document, no
label across a boundary), attention that never crosses documents, the model built from config, the sources (JSONL,
Parquet, save_to_disk, streaming) and their errors."""

import json

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from so8t_hf.pretrain.config import PretrainDataConfig, PretrainModelConfig, estimate_params
from so8t_hf.pretrain.data import dummy_documents, load_documents, pack_documents
from so8t_hf.pretrain.pipeline import build_model, build_tokenizer
from so8t_hf.thinking.readers import DataValidationError

TINY = dict(tokenizer_name_or_path="tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(PretrainModelConfig(**TINY))


def _blocks(tokenizer, docs, length, batch_size=1000):
    return pack_documents(load_documents(PretrainDataConfig(dummy_documents=1)).from_dict({"text": docs}),
                          tokenizer, length, batch_size)


def test_packing_keeps_every_token_with_eos_between_documents(tokenizer):
    docs = dummy_documents(30, seed=3)
    blocks = _blocks(tokenizer, docs, 16, batch_size=7)
    expected = [t for d in docs for t in tokenizer(d, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]]
    flat = [t for ids in blocks["input_ids"] for t in ids]
    assert flat == expected  # nothing dropped, EOS after every document, order kept
    assert all(len(ids) <= 16 for ids in blocks["input_ids"])
    assert all(sum(s) == len(ids) for s, ids in zip(blocks["seq_lengths"], blocks["input_ids"], strict=True))
    assert blocks["labels"] == blocks["input_ids"]
    full = sum(len(ids) == 16 for ids in blocks["input_ids"])
    assert len(blocks) - full <= -(-30 // 7)  # at most one shorter block per packing group


def test_collated_positions_restart_and_labels_never_cross_documents(tokenizer):
    blocks = _blocks(tokenizer, ["one two three", "four five", "six seven eight nine"], 64)
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)([blocks[0]])
    lengths = blocks[0]["seq_lengths"]
    assert len(lengths) == 3
    expected = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(batch["position_ids"][0], expected)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
    assert (batch["labels"][0, starts] == -100).all()  # no document is predicted from the one before
    assert batch["cu_seq_lens_q"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]


def test_attention_in_a_packed_block_never_crosses_documents(tokenizer):
    torch.manual_seed(0)
    model = build_model(PretrainModelConfig(**TINY), tokenizer, device="cpu").eval()
    docs = ["one two three four", "five six", "seven eight nine ten eleven"]
    blocks = _blocks(tokenizer, docs, 64)
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)([blocks[0]])
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                    "max_length_k")}
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        alone, start = [], 0
        for n in blocks[0]["seq_lengths"]:
            alone.append(model(input_ids=batch["input_ids"][:, start:start + n]).logits[0])
            start += n
    torch.testing.assert_close(packed, torch.cat(alone), atol=2e-5, rtol=1e-4)


def test_model_from_config_random_init_identity_rotations_on_chosen_layers(tokenizer):
    args = PretrainModelConfig(**{**TINY, "so8t_layers": ["1"]})
    model = build_model(args, tokenizer, device="cpu")
    assert model.training and list(model.so8_rotations()) == [1]
    theta = model.so8_rotations()[1].theta
    assert theta.dtype == torch.float32 and torch.count_nonzero(theta) == 0  # R = I at step 0
    weight = model.model.layers[0].mlp.down_proj.weight
    assert 0.01 < weight.std().item() < 0.03  # random normal init (initializer_range 0.02), not zeros
    n = sum(p.numel() for p in model.parameters())
    extra = 64 // 8 * 64  # estimate_params counts SO(8) generators on every layer; here only one has them
    assert estimate_params(64, 2, 4, 2, 128, model.config.vocab_size) == n + extra
    assert model.config.vocab_size == 3008  # 3,000 tokens rounded up to 64
    with pytest.raises(ValueError, match="num_attention_heads"):
        PretrainModelConfig(**{**TINY, "num_attention_heads": 16})  # head dim 4: SO(8) blocks would straddle heads
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_model(PretrainModelConfig(**{**TINY, "vocab_size": 100}), tokenizer, device="cpu")


def test_sources_jsonl_parquet_saved_and_streaming_give_the_same_blocks(tmp_path, tokenizer):
    from datasets import Dataset

    docs = dummy_documents(25, seed=1)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "b.parquet"))
    Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "saved"))
    reference = pack_documents(load_documents(PretrainDataConfig(dataset_path=[str(jsonl)])), tokenizer, 32)
    parquet = pack_documents(load_documents(PretrainDataConfig(dataset_path=[str(tmp_path / "b.parquet")])), tokenizer, 32)
    saved = pack_documents(load_documents(PretrainDataConfig(dataset_path=[str(tmp_path / "saved")], text_field="body")),
                           tokenizer, 32)
    stream = load_documents(PretrainDataConfig(dataset_name="json", data_files=[str(jsonl)], streaming=True))
    assert type(stream).__name__ == "IterableDataset"
    streamed = list(pack_documents(stream, tokenizer, 32))
    for other in (parquet, saved):
        assert other["input_ids"] == reference["input_ids"] and other["seq_lengths"] == reference["seq_lengths"]
    assert [b["input_ids"] for b in streamed] == reference["input_ids"]
    assert [b["seq_lengths"] for b in streamed] == reference["seq_lengths"]


def test_bad_rows_and_sources_name_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text"}\n{"text": 3}\nnot json\n')
    with pytest.raises(DataValidationError) as err:
        load_documents(PretrainDataConfig(dataset_path=[str(bad)]))
    message = str(err.value)
    assert f"{bad}:2: field 'text': needs a string, got missing" in message
    assert f"{bad}:3: field 'text': needs a string, got int" in message and f"{bad}:4: invalid JSON" in message
    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match="no column 'text'.*text_field"):
        load_documents(PretrainDataConfig(dataset_name="json", data_files=[str(other)]))
    with pytest.raises(ValueError, match="no column 'text'.*text_field"):  # a stream too, before the first step
        load_documents(PretrainDataConfig(dataset_name="json", data_files=[str(other)], streaming=True))
    with pytest.raises(ValueError, match="exactly one source"):
        PretrainDataConfig()
    with pytest.raises(ValueError, match="streaming.*dataset_name"):
        PretrainDataConfig(dataset_path=[str(bad)], streaming=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(PretrainDataConfig(dataset_path=[str(tmp_path / "missing.jsonl")]))


@pytest.mark.parametrize("name, params, length, batch, accumulation, in_backward", [
    ("pretrain_1p5b.yaml", 1.516e9, 1024, 16, 1, True),  # optimizer in backward: the same 16,384 tokens per step
    ("pretrain_1b.yaml", 0.995e9, 512, 1, 16, False)])
def test_shipped_configs_parse_to_the_sizes_they_name(name, params, length, batch, accumulation, in_backward):
    from paths import REPO

    from so8t_hf.pretrain import make_parser

    argv = ["--config", str(REPO / "recipes" / "configs" / name), "--use_cpu", "true"]  # bf16 is checked against the GPU
    model, data, args = make_parser().parse_args_and_config(argv)
    assert (model.hidden_size // model.num_attention_heads) % 8 == 0
    n = estimate_params(model.hidden_size, model.num_hidden_layers, model.num_attention_heads,
                        model.num_key_value_heads, model.intermediate_size, 32064)
    assert n == pytest.approx(params, rel=1e-3)
    assert args.max_length == length and args.per_device_train_batch_size == batch
    assert args.gradient_accumulation_steps == accumulation and args.optimizer_in_backward is in_backward
    assert args.max_grad_norm == (0 if in_backward else 1.0)  # in backward there is no global clipping
    assert args.learning_rate == 3e-4 and args.warmup_steps == 2000
    assert args.num_train_epochs == 10 and args.save_steps == 2000 and args.optim == "adamw_bnb_8bit"
    assert args.bf16 and args.activation_checkpointing and model.dtype == "bfloat16"
