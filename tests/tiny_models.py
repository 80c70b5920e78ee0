"""Tiny random Phi-3 / SO8T-Phi3 models for CPU tests (2 layers, hidden 64, GQA 4/2 heads)."""

import torch
from transformers import Phi3Config, Phi3ForCausalLM

from so8t_hf import So8tPhi3Config, So8tPhi3ForCausalLM

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_phi3(seed: int = 0, **overrides) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    return Phi3ForCausalLM(Phi3Config(**{**TINY, **overrides})).eval()


def tiny_so8t(seed: int = 0, **overrides) -> So8tPhi3ForCausalLM:
    torch.manual_seed(seed)
    return So8tPhi3ForCausalLM(So8tPhi3Config(**{**TINY, **overrides})).eval()


def randomize_rotations(model, scale: float = 0.3, seed: int = 1) -> None:
    """Give every SO(8) generator a random non-zero value (a trained-looking rotation)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "so8_rotation" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen)


def tiny_tokenizer(vocab_size: int = TINY["vocab_size"]):
    """A word-level tokenizer over "w3".."w{vocab-1}" with <pad>=0, <s>=1, </s>=2 (no files, no Hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def token_dataset(rows: int = 16, min_len: int = 8, max_len: int = 20, seed: int = 0):
    """A pre-tokenised `datasets.Dataset` of random sequences (column `input_ids`)."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (rows,), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": [torch.randint(3, TINY["vocab_size"], (n,), generator=gen).tolist() for n in lengths]})
