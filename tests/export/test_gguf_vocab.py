"""The real Phi-3.5 tokenizer (with the thinking tags) as GGUF vocabulary, without a model: read from its
SentencePiece `tokenizer.model` and from the `tokenizer.json` alone (what a run saves), the two agree on every
token and type, score multi-character pieces in the same order, and give the same tag and end-of-turn ids."""

import shutil

import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")

from so8t_hf.export import gguf_vocab  # noqa: E402
from so8t_hf.thinking.chat_template import add_thinking_tokens, apply_thinking_chat_template  # noqa: E402

ROWS = 32064  # Phi-3.5-mini's embedding rows


@pytest.fixture(scope="module")
def phi35(phi35_tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = apply_thinking_chat_template(AutoTokenizer.from_pretrained(phi35_tokenizer_dir))
    ids = add_thinking_tokens(tok)["token_ids"]
    saved = tmp_path_factory.mktemp("phi35_saved")
    tok.save_pretrained(saved)  # as a run's final/ holds it: tokenizer.json, no tokenizer.model
    assert not (saved / "tokenizer.model").exists()
    spm = tmp_path_factory.mktemp("phi35_spm")
    tok.save_pretrained(spm)
    shutil.copy(phi35_tokenizer_dir / "tokenizer.model", spm / "tokenizer.model")
    return tok, ids, AutoTokenizer.from_pretrained(saved), saved, spm


def test_phi35_vocab_count_tags_and_end_of_generation_ids(phi35):
    tok, ids, reloaded, saved, spm = phi35
    for source, tokenizer, folder in (("sentencepiece", tok, spm), ("json", reloaded, saved)):
        vocab = gguf_vocab(tokenizer, ROWS, folder)
        assert source.lower()[:4] in vocab.source.lower() or source == "json" and "tokenizer.json" in vocab.source
        assert vocab.model == "llama" and vocab.pre == "default" and not vocab.merges
        assert len(vocab.tokens) == len(vocab.scores) == len(vocab.types) == ROWS
        assert sorted(ids.values()) == list(range(32011, 32019))
        for tag, tid in ids.items():
            assert vocab.tokens[tid] == tag.encode() and vocab.types[tid] == gguf.TokenType.USER_DEFINED
        assert vocab.special_ids == {"bos": 1, "eos": 32000, "unk": 0, "pad": 32000, "eot": 32007}
        for tid in (32000, 32001, 32006, 32007, 32010):  # <|endoftext|> <|assistant|> <|system|> <|end|> <|user|>
            assert vocab.types[tid] == gguf.TokenType.CONTROL
        assert vocab.types[3] == gguf.TokenType.BYTE and vocab.tokens[3] == b"<0x00>"
        assert vocab.types[0] == gguf.TokenType.UNKNOWN and vocab.types[1] == gguf.TokenType.CONTROL
        assert vocab.tokens[32019:] == [f"[PAD{i}]".encode() for i in range(32019, ROWS)]
        assert not vocab.add_bos and not vocab.add_eos
        assert "<|assistant|>" in vocab.chat_template and "generation %}" not in vocab.chat_template


def test_phi35_json_vocab_equals_the_sentencepiece_vocab(phi35):
    tok, _, reloaded, saved, spm = phi35
    sp, js = gguf_vocab(tok, ROWS, spm), gguf_vocab(reloaded, ROWS, saved)
    assert js.tokens == sp.tokens and js.types == sp.types
    # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose piece scores highest: the two score sets
    # must order every multi-character piece the same way (single characters are never the result of a merge)
    pieces = [i for i in range(3, 32000) if len(sp.tokens[i].decode()) >= 2 and sp.types[i] == gguf.TokenType.NORMAL]
    assert len(pieces) > 29000
    assert sorted(pieces, key=lambda i: (-sp.scores[i], i)) == sorted(pieces, key=lambda i: (-js.scores[i], i))
    assert len({js.scores[i] for i in pieces}) == len(pieces)  # no ties the order would have to break


def test_tags_saved_as_special_tokens_stay_printable(phi35, tmp_path):
    """A tokenizer of so8t_hf 0.1 held the tags as special tokens; in GGUF they must stay USER_DEFINED (a CONTROL
    token is not printed by llama.cpp: the thinking would run into the answer), the role tokens CONTROL."""
    import json

    from transformers import AutoTokenizer

    _, ids, _, saved, _ = phi35
    state = json.loads((saved / "tokenizer.json").read_text())
    for entry in state["added_tokens"]:
        entry["special"] = entry["special"] or entry["id"] in ids.values()
    old = tmp_path / "old"
    old.mkdir()
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        (old / name).write_bytes((saved / name).read_bytes())
    (old / "tokenizer.json").write_text(json.dumps(state))
    tok = AutoTokenizer.from_pretrained(old)
    assert set(ids.values()) <= set(tok.all_special_ids) or all(
        e["special"] for e in json.loads(tok.backend_tokenizer.to_str())["added_tokens"] if e["id"] in ids.values())
    vocab = gguf_vocab(tok, ROWS, old)
    assert all(vocab.types[i] == gguf.TokenType.USER_DEFINED for i in ids.values())
    assert vocab.types[32007] == gguf.TokenType.CONTROL


def test_a_tokenizer_too_long_for_the_model_or_of_another_kind_is_refused(phi35):
    from tiny_models import tiny_tokenizer

    tok, *_ = phi35
    with pytest.raises(ValueError, match="32019 ids but the model only 32000 embedding rows"):
        gguf_vocab(tok, 32000)
    with pytest.raises(ValueError, match="'WordLevel'.*neither SentencePiece nor a byte-level BPE"):
        gguf_vocab(tiny_tokenizer(), 128)


def test_a_phi35_vocabulary_run_exports_the_sentencepiece_vocab_to_the_file(phi35, tmp_path):
    """A model with Phi-3.5's 32,064 rows and its saved tokenizer, through `so8t-hf export --format gguf`."""
    from tiny_models import randomize_rotations, tiny_so8t

    from so8t_hf.cli import main

    tok, ids, reloaded, saved, _ = phi35
    model = tiny_so8t(seed=2, vocab_size=ROWS, bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
    randomize_rotations(model)
    model.save_pretrained(tmp_path / "final")
    reloaded.save_pretrained(tmp_path / "final")
    out = tmp_path / "phi35-f16.gguf"
    assert main(["export", "--model", str(tmp_path / "final"), "--format", "gguf", "--out", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    expect = gguf_vocab(reloaded, ROWS, saved)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama" and len(tokens) == ROWS
    assert [t.encode() for t in tokens] == expect.tokens and types == expect.types and scores == expect.scores
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == 32007
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 32000
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert all(tokens[i] == tag and types[i] == gguf.TokenType.USER_DEFINED for tag, i in ids.items())
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors["token_embd.weight"].shape) == [64, ROWS] and "rope_factors_long.weight" not in tensors
