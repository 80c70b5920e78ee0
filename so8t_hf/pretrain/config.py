"""Configuration of the from-scratch (pre-training) recipe and its one parser.

Three dataclasses, parsed together by `make_parser()` (TRL's `TrlParser`, as the thinking-SFT recipe's): YAML keys
equal field names (`--config file.yaml`), command-line flags override the YAML, unknown keys fail.

- `PretrainModelConfig`: the shape of the SO8T-Phi3 built from zero (random init; SO(8) generators at zero, R = I),
  its tokenizer, dtype, attention.
- `PretrainDataConfig`: the text (JSONL / JSON / Parquet files, `datasets` save_to_disk folders, a `datasets`
  corpus, streamed or not, or deterministic dummy documents) and how it is packed.
- `PretrainConfig`: `SO8TConfig` (TRL's `SFTConfig` + SO8T settings) plus a GPU memory cap and the best checkpoint.
  `max_length` is the packed block length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import TrlParser

from so8t_hf.inference.loader import DTYPE_NAMES
from so8t_hf.modeling.configuration_so8t_phi3 import SO8_BLOCK, SO8T_ATTN_BACKENDS, normalize_so8t_layers
from so8t_hf.training.config import SO8TConfig

__all__ = ["TINY_TOKENIZER", "PretrainConfig", "PretrainDataConfig", "PretrainModelConfig", "estimate_params",
           "make_parser"]

TINY_TOKENIZER = "tiny"


def _fail(owner: str, name: str, value, what: str) -> None:
    raise ValueError(f"{owner}.{name}={value!r}: {what}")


@dataclass
class PretrainModelConfig:
    """The SO8T-Phi3 trained from zero: a Phi-3 decoder of this shape, random init, the SO(8) rotations (identity at
    step 0) on `so8t_layers`.

    Args:
        tokenizer_name_or_path (`str`): tokenizer folder or Hub id (Phi-3.5's: 32,011 tokens in a 32,064-row
            vocabulary), or `tiny`: the byte-level BPE tokenizer shipped for CPU runs.
        vocab_size (`int`, *optional*): embedding rows; default the tokenizer's length rounded up to 64.
    """

    tokenizer_name_or_path: str = field(
        default="microsoft/Phi-3.5-mini-instruct",
        metadata={"help": "Tokenizer folder or Hub id, or 'tiny' (the shipped byte-level BPE tokenizer, CPU runs)."})
    vocab_size: int | None = field(
        default=None, metadata={"help": "Embedding rows; default: the tokenizer's length rounded up to 64."})
    hidden_size: int = field(default=2048, metadata={"help": "d_model (a multiple of 8 x num_attention_heads)."})
    num_hidden_layers: int = field(default=24, metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(default=16, metadata={"help": "Query heads; head dim = hidden / heads, a "
                                                                   "multiple of 8 (SO(8) blocks never straddle heads)."})
    num_key_value_heads: int | None = field(default=None, metadata={"help": "Key/value heads (GQA); default = heads."})
    intermediate_size: int = field(default=6656, metadata={"help": "MLP width (SwiGLU)."})
    max_position_embeddings: int = field(default=4096, metadata={"help": "Longest position (RoPE table)."})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base."})
    tie_word_embeddings: bool = field(default=False, metadata={"help": "Share embed_tokens and lm_head (Phi-3: no)."})
    initializer_range: float = field(default=0.02, metadata={"help": "Std of the random normal init."})
    so8t_layers: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={"help": "SO8T layers: 'all' or layer indices (YAML: [0, 1]; flags: --so8t_layers 0 1).", "nargs": "+"})
    so8t_attn_backend: str = field(
        default="auto", metadata={"help": "Backend of the so8t attention.", "choices": list(SO8T_ATTN_BACKENDS)})
    attn_implementation: str = field(
        default="so8t", metadata={"help": "Attention implementation: so8t (the project's backends), sdpa, eager."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype: auto (bfloat16 on a GPU that supports it, else float32), bfloat16, "
                          "float16, float32. bf16 weights + an 8-bit optimizer is what fits 1.5B in 10 GB "
                          "(README: Pre-training from scratch).", "choices": list(DTYPE_NAMES)})

    def __post_init__(self):
        self.so8t_layers = normalize_so8t_layers(self.so8t_layers)
        if self.dtype not in DTYPE_NAMES:
            _fail("PretrainModelConfig", "dtype", self.dtype, f"choose one of {', '.join(DTYPE_NAMES)}")
        if self.so8t_attn_backend not in SO8T_ATTN_BACKENDS:
            _fail("PretrainModelConfig", "so8t_attn_backend", self.so8t_attn_backend,
                  f"choose one of {', '.join(SO8T_ATTN_BACKENDS)}")
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % SO8_BLOCK:
            _fail("PretrainModelConfig", "num_attention_heads", self.num_attention_heads,
                  f"hidden_size {self.hidden_size} / heads must be a whole head dim divisible by {SO8_BLOCK}")
        kv = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv:
            _fail("PretrainModelConfig", "num_key_value_heads", kv, "must divide num_attention_heads")


def estimate_params(hidden: int, layers: int, heads: int, kv_heads: int | None, intermediate: int, vocab: int,
                    tied: bool = False) -> int:
    """Parameters of a Phi-3 decoder of this shape (fused qkv / gate_up, RMSNorms, SO(8) generators on every layer)."""
    kv = (kv_heads or heads) * (hidden // heads)
    attention = hidden * (hidden + 2 * kv) + hidden * hidden + (hidden // SO8_BLOCK) * SO8_BLOCK * SO8_BLOCK
    mlp = 3 * hidden * intermediate
    return layers * (attention + mlp + 2 * hidden) + vocab * hidden * (1 if tied else 2) + hidden


@dataclass
class PretrainDataConfig:
    """The pre-training text and its packing.

    Sources (one of): `dataset_path` (JSONL / JSON / Parquet files, folders, globs, or `datasets` save_to_disk
    folders), `dataset_name` (a `datasets` corpus or loader, e.g. `HuggingFaceFW/fineweb-edu`, or `json` with
    `data_files`; `streaming: true` reads it as an IterableDataset), or `dummy_documents` (deterministic synthetic
    text for tests). Packing: each document is tokenised, EOS appended, documents concatenated and cut into
    `max_length`-token blocks; `seq_lengths` keep the document boundaries, so position ids restart per document and
    attention never crosses documents.
    """

    dataset_path: list[str] = field(
        default_factory=list,
        metadata={"help": "JSONL / JSON / Parquet files, folders (recursive), globs, or datasets save_to_disk folders."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "A datasets corpus (Hub id or loader name such as 'json' / 'parquet')."})
    dataset_config: str | None = field(default=None, metadata={"help": "The corpus configuration (subset)."})
    dataset_split: str = field(default="train", metadata={"help": "The corpus split."})
    data_files: list[str] | None = field(default=None, metadata={"help": "data_files for dataset_name's loader."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream dataset_name (IterableDataset: needs max_steps; nothing downloaded "
                                         "in advance)."})
    text_field: str = field(default="text", metadata={"help": "The column / JSON key holding each document's text."})
    dummy_documents: int = field(
        default=0, metadata={"help": "N > 0: train on N deterministic synthetic documents (tests, make pretrain-test)."})
    eval_blocks: int = field(
        default=0, metadata={"help": "Packed blocks held out for eval_loss (random with seed; the stream's first N)."})
    packing_batch_size: int = field(
        default=1000, metadata={"help": "Documents packed together; each group's last block may be shorter "
                                        "(kept, never dropped)."})
    shuffle_buffer_size: int = field(
        default=0, metadata={"help": "Streaming: shuffle buffer of documents (0 = stream order)."})

    def __post_init__(self):
        if isinstance(self.dataset_path, str):
            self.dataset_path = [self.dataset_path]
        sources = [bool(self.dataset_path), self.dataset_name is not None, self.dummy_documents > 0]
        if sum(sources) != 1:
            raise ValueError("PretrainDataConfig: give exactly one source: dataset_path (files / folders), dataset_name "
                             f"(a datasets corpus) or dummy_documents > 0; got dataset_path={self.dataset_path}, "
                             f"dataset_name={self.dataset_name!r}, dummy_documents={self.dummy_documents}.")
        if self.streaming and self.dataset_name is None:
            _fail("PretrainDataConfig", "streaming", True, "streams a dataset_name corpus; set dataset_name (for local "
                  "files: dataset_name: json, data_files: [...])")
        if self.packing_batch_size < 1 or self.eval_blocks < 0:
            raise ValueError("PretrainDataConfig: packing_batch_size must be >= 1 and eval_blocks >= 0.")


@dataclass
class PretrainConfig(SO8TConfig):
    """`SO8TConfig` plus the pre-training settings; `max_length` is the packed block length.

    Args:
        max_memory_gib (`float`, *optional*): cap this process's GPU memory (`torch.cuda.set_per_process_memory_fraction`),
            e.g. 10 to prove a run fits a 10 GB card on a larger one.
        save_best (`bool`, defaults to `True`): keep `best/` (lowest eval_loss so far) beside the checkpoints.
        optimizer_in_backward (`bool`, defaults to `False`): step each parameter in the backward pass as its gradient
            arrives (`so8t_hf/pretrain/optimizer_in_backward.py`): no gradient buffer; needs
            gradient_accumulation_steps 1, max_grad_norm 0, one process, no fp16.
    """

    max_memory_gib: float | None = field(
        default=None, metadata={"help": "Cap this process's GPU memory in GiB (set_per_process_memory_fraction)."})
    save_best: bool = field(default=True, metadata={"help": "Keep best/ (lowest eval_loss) beside the checkpoints."})
    log_line: bool = field(default=True, metadata={"help": "Print 'Step | Loss | PPL | LR | Grad | Time' per log."})
    optimizer_in_backward: bool = field(
        default=False,
        metadata={"help": "Step each parameter in backward as its gradient arrives (no gradient buffer: 2 bytes / "
                          "parameter in bf16). Needs gradient_accumulation_steps 1, max_grad_norm 0, one process."})

    def __post_init__(self):
        super().__post_init__()
        if self.optimizer_in_backward:
            from so8t_hf.pretrain.optimizer_in_backward import check_optimizer_in_backward

            check_optimizer_in_backward(self)  # the settings alone; the process count is checked by the trainer


DATACLASS_TYPES = (PretrainModelConfig, PretrainDataConfig, PretrainConfig)


def make_parser(prog: str | None = None) -> TrlParser:
    """The recipe's parser: `parse_args_and_config(argv)` -> (PretrainModelConfig, PretrainDataConfig, PretrainConfig)."""
    return TrlParser(DATACLASS_TYPES, prog=prog)
