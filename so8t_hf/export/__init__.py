"""Export to the serving ecosystem: a merged plain Phi-3 as GGUF (llama.cpp, Ollama), with `gguf` (an extra)."""

from so8t_hf.export.gguf_model import QUANTS, write_gguf
from so8t_hf.export.gguf_vocab import GGUFVocab, gguf_vocab

__all__ = ["GGUFVocab", "QUANTS", "gguf_vocab", "write_gguf"]
