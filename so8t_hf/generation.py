"""Generate one assistant turn from chat messages; the raw text keeps its thinking tags (callers show only
`extract_final` of it to users)."""

from __future__ import annotations

import torch


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` rendered with the chat template and the assistant generation prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def stop_token_ids(tokenizer) -> list[int]:
    """`<|end|>` (end of the assistant turn) and the EOS token, where the vocabulary has them."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


@torch.no_grad()
def generate_reply(model, tokenizer, messages, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0):
    """(raw assistant text with tags, prompt token count, generated token count); greedy when temperature == 0."""
    ids = torch.tensor([prompt_ids(tokenizer, messages)], device=model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **sampling,
    )
    new = out[0, ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=False), ids.shape[1], int(new.numel())
