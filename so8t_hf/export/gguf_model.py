"""A plain `Phi3ForCausalLM` (SO(8) rotations and LoRA merged) as one GGUF file for llama.cpp / Ollama.

What: `write_gguf(model, tokenizer, path, quant)` writes architecture `phi3` with llama.cpp's hyper-parameter
keys (context length, `rope_scaling.original_context_length`, rope base and dimension count, head counts, RMS
eps, sliding window), LongRoPE's short / long factors as the `rope_factors_short` / `rope_factors_long`
tensors with their attention factor, the tensors under `gguf.TensorNameMap` names (the fused `attn_qkv` and
`ffn_up` (gate and up) kept fused, not permuted: Phi-3 rotates NeoX-style in both libraries), and the
vocabulary of `gguf_vocab` (thinking tags as single USER_DEFINED tokens, `<|end|>` as the end-of-turn id, the
chat template). `f16`: matrices in float16, norms and rope factors in float32. `q8_0`: matrices whose rows
divide into 32-wide blocks in Q8_0 (`gguf.quants`), the rest as in `f16`. `q4_k_m` needs llama.cpp's
`llama-quantize`: run on the f16 file when it is on PATH, else the f16 file is kept and the command printed.

`general.name` always names Phi-3: llama.cpp gives a Phi-3 model's added tokens their right-strip (HF's role
tokens have `rstrip=True`: `<|user|>\n` is one token) only by that name; it strips after the thinking tags too,
which HF does not, so only a prompt that holds tag text followed by whitespace tokenizes differently. LongRoPE:
llama.cpp takes the long factors for every position once its context (`-c`) exceeds the original context
(Phi-3.5: 4096), HF once the sequence does; run with `-c 4096` or less to match HF on short prompts.

Limits: the merged model is held in memory (fp32 by default: 15 GB for Phi-3.5-mini); the converted tensors
go to a temporary file, not to memory. Weights beyond the float16 range (|w| > 65504) are refused for f16
rather than written as inf.

Origin: `Phi3MiniModel` of llama.cpp's `convert_hf_to_gguf.py` (keys, LongRoPE factors and their attention
factor), written on the `gguf` package (`GGUFWriter`, `TensorNameMap`, `quants`).
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from so8t_hf.export.gguf_vocab import add_vocab, gguf_vocab

__all__ = ["QUANTS", "write_gguf"]

logger = logging.getLogger(__name__)

QUANTS = ("f16", "q8_0", "q4_k_m")
F16_MAX = 65504.0


def _rope(config: Any) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _add_hparams(writer: Any, config: Any, ftype: int) -> list[tuple[str, np.ndarray]]:
    """The `phi3.*` keys; returns the LongRoPE factor tensors to write (none without rope scaling)."""
    import gguf

    rope = _rope(config)
    n_embd, n_head = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or n_embd // n_head
    rope_dims = int(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) * head_dim)
    ctx = config.max_position_embeddings
    orig_ctx = getattr(config, "original_max_position_embeddings", None) or rope.get("original_max_position_embeddings") or ctx
    writer.add_context_length(ctx)
    writer.add_rope_scaling_orig_ctx_len(orig_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.num_key_value_heads or n_head)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(rope_dims)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_file_type(ftype)
    writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)  # 0 tells Phi-3 from Phi-4 in llama.cpp
    kind = str(rope.get("rope_type", rope.get("type", "default"))).lower()
    if kind == "default":
        return []
    scale = ctx / orig_ctx
    if kind in ("su", "longrope"):
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig_ctx)) if scale > 1.0 else 1.0
    elif kind == "yarn":
        attn_factor = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        raise ValueError(f"rope scaling {kind!r}: llama.cpp's Phi-3 takes longrope (su) or yarn")
    writer.add_rope_scaling_attn_factors(attn_factor)
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if long is None or short is None or not len(long) == len(short) == rope_dims // 2:
        raise ValueError(f"rope scaling {kind!r} needs long_factor and short_factor of {rope_dims // 2} values each "
                         f"(got {None if long is None else len(long)} and {None if short is None else len(short)})")
    names = gguf.TENSOR_NAMES
    return [(names[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.asarray(long, dtype=np.float32)),
            (names[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.asarray(short, dtype=np.float32))]


def _convert(name: str, weight: torch.Tensor, quant: str) -> tuple[np.ndarray, Any]:
    """(data, raw gguf type or None): the tensor in the file's type for `quant`."""
    import gguf

    data = weight.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1:  # norms stay float32, as llama.cpp writes them
        return data, None
    if quant == "q8_0" and gguf.quants.Q8_0.can_quantize(data):
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    peak = float(np.abs(data).max(initial=0.0))
    if peak > F16_MAX:
        raise ValueError(f"{name}: |w| reaches {peak:.4g}, beyond float16 ({F16_MAX}); use --quant q8_0")
    if quant == "q8_0":
        logger.info("%s %s: rows of %d do not divide into Q8_0 blocks of 32: written f16", name, data.shape,
                    data.shape[-1])
    return data.astype(np.float16), None


def _tensors(model: Any) -> list[tuple[str, str, torch.Tensor]]:
    """(gguf name, hf name, tensor) for every weight of a plain Phi-3; an unknown weight is an error."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, model.config.num_hidden_layers)
    out = []
    state = model.state_dict()
    for hf_name, weight in state.items():
        if "so8_rotation" in hf_name:
            raise ValueError(f"{hf_name}: the model still holds SO(8) rotations; merge them first "
                             "(so8t_hf.merge_so8t_rotations)")
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{hf_name} {tuple(weight.shape)} has no llama.cpp Phi-3 tensor name; nothing else of the "
                             "model may be left out, so the export stops")
        out.append((gguf_name, hf_name, weight))
    if "lm_head.weight" not in state:  # tied embeddings: llama.cpp's Phi-3 wants its own output matrix
        out.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight", "lm_head.weight",
                    model.get_output_embeddings().weight))
    return out


def write_gguf(model: Any, tokenizer: Any, path: str | Path, quant: str = "f16", tokenizer_dir: str | Path | None = None,
               name: str | None = None, progress: bool = True) -> dict:
    """Write the plain Phi-3 `model` with `tokenizer` to the GGUF file `path` (see the module docstring).

    Returns `{"path", "quant", "written_quant", "tensors", "vocab", "command"}`: `written_quant` is what the file at
    `path` holds, and `command` is the `llama-quantize` line still to run ("" when none).
    """
    import gguf
    from tqdm.auto import tqdm

    if quant not in QUANTS:
        raise ValueError(f"unknown --quant {quant!r}; use one of {', '.join(QUANTS)}")
    if getattr(model.config, "model_type", None) != "phi3" or hasattr(model, "so8_rotations"):
        raise ValueError(f"{type(model).__name__} ({model.config.model_type}) is not a plain Phi-3: merge the LoRA "
                         "and the SO(8) rotations first (so8t-hf export does)")
    path = Path(path)
    final_path, command = path, ""
    if quant == "q4_k_m":
        path = path.with_name(path.stem + "-f16.gguf")
    ftype = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    rows = model.get_input_embeddings().num_embeddings
    vocab = gguf_vocab(tokenizer, rows, tokenizer_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI3], use_temp_file=True)  # tensors spill to disk
    name = name or final_path.stem
    if not re.search(r"phi-?3", name.lower()):  # llama.cpp gives Phi-3's role tokens their right-strip by this name
        name = f"{name} (Phi-3)"
    writer.add_name(name)
    extra = _add_hparams(writer, model.config, ftype)
    add_vocab(writer, vocab)
    tensors = _tensors(model)
    written = {}
    for gguf_name, hf_name, weight in tqdm(tensors, desc=f"GGUF {quant} tensors", unit="tensor", disable=not progress):
        data, raw = _convert(hf_name, weight, "f16" if quant == "q4_k_m" else quant)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
        written[gguf_name] = (hf_name, raw.name if raw is not None else data.dtype.name)
    for gguf_name, data in extra:
        writer.add_tensor(gguf_name, data)
        written[gguf_name] = ("rope_parameters", "float32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()
    written_quant = "f16" if quant == "q4_k_m" else quant
    if quant == "q4_k_m":
        tool = shutil.which("llama-quantize")
        command = f"llama-quantize {path} {final_path} Q4_K_M"
        if tool:
            logger.info("running %s", command)
            subprocess.run([tool, str(path), str(final_path), "Q4_K_M"], check=True)
            path.unlink()
            path, written_quant, command = final_path, "q4_k_m", ""
        else:
            logger.warning("llama-quantize is not on PATH: wrote f16 to %s; for Q4_K_M run: %s", path, command)
    logger.info("GGUF %s written to %s (%d tensors)", written_quant, path, len(written))
    return {"path": str(path), "quant": quant, "written_quant": written_quant, "tensors": written,
            "vocab": vocab.source, "command": command}
