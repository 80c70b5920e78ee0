"""Generation of assistant turns from chat messages, batched, with the one set of stop rules.

The raw text keeps its thinking tags: callers show users only `extract_final` of it. Stop rules: a
generation ends at any turn-ending token of the vocabulary (`TURN_END_TOKENS`: `<|end|>`, `<|endoftext|>`,
`<|user|>`, `<|system|>`, `</s>`), the tokenizer's EOS and the model's `generation_config.eos_token_id`;
`extract_final` reads a generation up to the same tokens. A `streamer=` (TextStreamer, TextIteratorStreamer)
receives the final alone, once the generation is over (`thinking.grammar.FinalOnlyStreamer`), never the raw ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from so8t_hf.thinking.format import TURN_END_TOKENS

__all__ = ["GREEDY_BELOW", "generate_replies", "generate_reply", "prompt_ids", "sampling_kwargs", "stop_token_ids"]


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` rendered with the chat template and the assistant generation prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def stop_token_ids(tokenizer, model: Any = None) -> list[int]:
    """Every id that ends an assistant turn: the turn-end tokens in the vocabulary, the tokenizer's EOS and
    the model's `generation_config.eos_token_id`."""
    vocab = tokenizer.get_vocab()
    stop = {vocab[t] for t in TURN_END_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    stop.discard(getattr(tokenizer, "unk_token_id", None))
    return sorted(i for i in stop if i is not None)


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_ids(tokenizer)[0]


GREEDY_BELOW = 1e-3  # a temperature under this samples like greedy decoding (and 1e-300 would overflow): greedy


def sampling_kwargs(temperature: float, top_p: float = 1.0) -> dict[str, Any]:
    """`generate` kwargs: greedy when `temperature` is below `GREEDY_BELOW` (0 included), else nucleus sampling."""
    if temperature >= GREEDY_BELOW:
        return dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: Sequence[list[dict[str, str]]], max_new_tokens: int = 256,
                     temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8,
                     progress: bool = False, streamer: Any = None) -> list[tuple[str, int, int]]:
    """(raw text with tags, prompt tokens, generated tokens) per conversation, generated `batch_size` at a time
    (left-padded, longest prompts first), with a progress bar over the rows when `progress`. Generation stops
    per row at `stop_token_ids`; greedy decoding gives the same text as one row at a time
    (tests/inference/test_generation.py). `streamer`: one conversation only; it receives the final answer of
    the positive grammar (thinking.grammar), never the thinking."""
    from tqdm.auto import tqdm

    from so8t_hf.thinking.grammar import FinalOnlyStreamer, IdTable

    if streamer is not None:
        if len(conversations) != 1:
            raise ValueError(f"a streamer takes one conversation at a time, got {len(conversations)}")
        if not isinstance(streamer, FinalOnlyStreamer):
            tags = _model_tags(model)
            streamer = FinalOnlyStreamer(streamer, IdTable.of(tokenizer, tags, stop_token_ids(tokenizer, model)))

    encoded = [prompt_ids(tokenizer, messages) for messages in conversations]
    stops, pad = stop_token_ids(tokenizer, model), pad_token_id(tokenizer)
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    results: list[tuple[str, int, int] | None] = [None] * len(encoded)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(total=len(encoded), desc="Generating", unit="row", disable=not progress)
    for batch in batches:
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             eos_token_id=stops, pad_token_id=pad, streamer=streamer,
                             **sampling_kwargs(temperature, top_p))
        for row, i in enumerate(batch):
            new = out[row, width:].tolist()
            end = next((j + 1 for j, t in enumerate(new) if t in stops), len(new))  # drop the padding after a stop
            new = new[:end]
            results[i] = (tokenizer.decode(new, skip_special_tokens=False), len(encoded[i]), len(new))
        bar.update(len(batch))
    bar.close()
    return results  # type: ignore[return-value]


def generate_reply(model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int = 256,
                   temperature: float = 0.0, top_p: float = 1.0, streamer: Any = None) -> tuple[str, int, int]:
    """(raw assistant text with tags, prompt token count, generated token count) for one conversation;
    `streamer` receives the final answer only (`generate_replies`)."""
    return generate_replies(model, tokenizer, [messages], max_new_tokens, temperature, top_p, batch_size=1,
                            streamer=streamer)[0]


def _model_tags(model: Any):
    from so8t_hf.thinking.format import DEFAULT_TAGS, ThinkingTags

    tags = getattr(getattr(model, "config", None), "thinking_tags", None)
    return ThinkingTags(tuple(tags["sections"]), tags["final"]) if tags else DEFAULT_TAGS
