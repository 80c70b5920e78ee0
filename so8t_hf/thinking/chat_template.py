"""The tokenizer side of the thinking format: Phi-3 chat template, tag tokens, loss labels.

What:
- `PHI3_THINKING_CHAT_TEMPLATE`: renders exactly what the Phi-3.5-mini-instruct template renders
  (`<|system|>\\n...<|end|>\\n<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n`, then
  `<|assistant|>\\n` with `add_generation_prompt`, else the EOS token), with
  `{% generation %}` around each assistant content + `<|end|>`, so that
  `return_assistant_tokens_mask=True` and TRL's `assistant_only_loss=True` train exactly the
  answer and the token that ends the turn. Earlier turns render as training renders them
  (`drop_earlier_thinking`, the default): an assistant turn before the last user turn becomes the stripped
  text of its first `<final>` block ("" when it has thinking but no final; plain text stays, stripped), so a
  history holding whole replies gives the tokens the model was trained on. `keep_earlier_thinking=True`
  (a template variable: `apply_chat_template(..., keep_earlier_thinking=True)`) keeps them whole, for rows
  loaded with `drop_earlier_thinking=False`. `thinking_chat_template(tags)` is the same template for
  another tag set.
- `add_thinking_tokens`: the tags as added, NON-special tokens (one id each, `normalized=False`), in the
  model's spare embedding rows when there are any (Phi-3.5: 32,064 rows for 32,011 tokens), else by
  resizing. Non-special, so `decode(..., skip_special_tokens=True)` (what `pipeline("text-generation")`
  does) keeps them: the thinking stays marked as thinking instead of running into the answer.
- `thinking_labels`: labels for the loss modes `assistant`, `final_only` and `all`, computed from
  token ids alone (role and tag ids), so they hold for packed sequences too. An assistant turn without
  any tag (earlier turns whose thinking was dropped) is context in `assistant` and `final_only` mode.

Limits: Phi-3 role tokens (`<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`) must be single
tokens; `<|assistant|>` must absorb the newline after it (as Phi-3's does: rstrip) for the
id-based `assistant` span to equal the template's generation span.

Origin: the Phi-3.5-mini-instruct chat template; generation markers as in transformers / TRL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import json

import torch
from transformers import AddedToken

from so8t_hf.thinking.format import DEFAULT_TAGS, ThinkingTags

__all__ = [
    "LOSS_MODES",
    "PHI3_THINKING_CHAT_TEMPLATE",
    "thinking_chat_template",
    "add_thinking_tokens",
    "make_room_for_tokens",
    "apply_thinking_chat_template",
    "thinking_labels",
]

LOSS_MODES = ("assistant", "final_only", "all")
IGNORE_INDEX = -100

_TEMPLATE = r"""{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- if message['content'] %}
            {{- '<|system|>\n' + message['content'] + '<|end|>\n' }}
        {%- endif %}
    {%- elif message['role'] == 'user' %}
        {{- '<|user|>\n' + message['content'] + '<|end|>\n' }}
    {%- elif message['role'] == 'assistant' %}
        {%- set content = message['content'] %}
        {%- if loop.index0 < ns.last_user and not (keep_earlier_thinking is defined and keep_earlier_thinking) %}
            {%- if '@FINAL_OPEN@' in content %}
                {%- set content = content.split('@FINAL_OPEN@', 1)[1].split('@FINAL_CLOSE@', 1)[0] %}
            {%- elif @HAS_THINKING@ %}
                {%- set content = '' %}
            {%- endif %}
            {%- set content = content | trim %}
        {%- endif %}
        {{- '<|assistant|>\n' }}
        {%- generation %}
            {{- content + '<|end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- raise_exception('Phi-3 has no role ' + message['role']) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\n' }}
{%- else %}
    {{- eos_token }}
{%- endif %}"""


def thinking_chat_template(tags: ThinkingTags = DEFAULT_TAGS) -> str:
    """The Phi-3 thinking chat template for the tag set `tags` (see the module docstring)."""
    has_thinking = " or ".join(f"'<{name}>' in content" for name in tags.sections)
    return (_TEMPLATE.replace("@FINAL_OPEN@", f"<{tags.final}>").replace("@FINAL_CLOSE@", f"</{tags.final}>")
            .replace("@HAS_THINKING@", has_thinking))


PHI3_THINKING_CHAT_TEMPLATE = thinking_chat_template(DEFAULT_TAGS)


def apply_thinking_chat_template(tokenizer: Any, tags: ThinkingTags = DEFAULT_TAGS) -> Any:
    """Set the thinking chat template of `tags` (default: `PHI3_THINKING_CHAT_TEMPLATE`); return the tokenizer."""
    tokenizer.chat_template = thinking_chat_template(tags)
    return tokenizer


def _single_id(tokenizer: Any, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"{token!r} is not a single token of this tokenizer (got {ids}); add it first")
    return ids[0]


@torch.no_grad()
def _init_rows_to_mean(model: Any, ids: list[int], n_trained: int) -> None:
    """Set rows `ids` of the input and output embeddings to the mean of their first `n_trained` rows."""
    weights = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            weights[id(module.weight)] = module.weight
    for w in weights.values():  # (V, hidden) for both nn.Embedding and the lm_head nn.Linear
        w[ids] = w[:n_trained].float().mean(dim=0).to(w.dtype)


def add_thinking_tokens(tokenizer: Any, model: Any = None, tags: ThinkingTags = DEFAULT_TAGS) -> dict[str, Any]:
    """Add `tags.tokens` to the tokenizer as non-special added tokens (one id each); with `model`, also
    `make_room_for_tokens` for the ones this call added. Calling it again adds and changes nothing.

    Tags that a tokenizer already holds as *special* tokens (tokenizers saved by so8t_hf 0.1) are turned into
    non-special ones, keeping their ids. Returns `{"token_ids": {tag: id}, "new_ids": [...], "old_len": int,
    "resized": bool, "num_embeddings": int | None}`.
    """
    old_len = len(tokenizer)
    _unspecial(tokenizer, tags.tokens)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in tags.tokens])
    token_ids = {t: _single_id(tokenizer, t) for t in tags.tokens}
    new_ids = sorted(i for i in token_ids.values() if i >= old_len)
    summary = {"token_ids": token_ids, "new_ids": new_ids, "old_len": old_len, "resized": False, "num_embeddings": None}
    if model is not None:
        summary.update(make_room_for_tokens(model, tokenizer, new_ids, old_len))
    return summary


def _unspecial(tokenizer: Any, tokens: Sequence[str]) -> None:
    """Turn those of `tokens` that `tokenizer` holds as special tokens into plain added tokens (same ids)."""
    special = [t for t in tokens if t in set(tokenizer.all_special_tokens)]
    if not special:
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"the tokenizer holds the thinking tags {special} as special tokens, and only a fast "
                         "(tokenizers) tokenizer can be changed in place: load it with use_fast=True.")
    from tokenizers import Tokenizer

    extra = getattr(tokenizer, "extra_special_tokens", None)
    if isinstance(extra, (list, tuple)):
        tokenizer.extra_special_tokens = [t for t in extra if str(t) not in special]
    state = json.loads(backend.to_str())
    for entry in state["added_tokens"]:
        if entry["content"] in special:
            entry["special"] = False
    # the Rust tokenizer keeps its set of special ids when a flag changes: rebuild it from its own state
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))


def make_room_for_tokens(model: Any, tokenizer: Any, new_ids: list[int], old_len: int) -> dict[str, Any]:
    """Give the tokenizer's tokens `new_ids` (added after its first `old_len`) embedding rows in `model`.

    Ids in spare rows (Phi-3.5: 32,064 rows for 32,011 tokens) have those rows of the input and output
    embeddings set to the mean of the rows of the `old_len` earlier tokens; a tokenizer longer than the
    embedding triggers `model.resize_token_embeddings(len(tokenizer), mean_resizing=True)`. Call it before
    wrapping the model (PEFT, FSDP). Returns `{"resized": bool, "num_embeddings": int}`.
    """
    rows = model.get_input_embeddings().num_embeddings
    spare = [i for i in new_ids if i < rows]
    if spare:
        _init_rows_to_mean(model, spare, min(old_len, rows))
    resized = len(tokenizer) > rows
    if resized:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        rows = model.get_input_embeddings().num_embeddings
    return {"resized": resized, "num_embeddings": rows}


def _tagged_turns(ids: list[int], sid: dict[str, int], stops: set[int], tag_ids: set[int]) -> set[int]:
    """Positions of the `<|assistant|>` tokens whose turn holds at least one tag token."""
    tagged: set[int] = set()
    start = None
    for i, t in enumerate(ids):
        if t in stops or t == sid["end"]:
            start = i if t == sid["assistant"] else None
        elif start is not None and t in tag_ids:
            tagged.add(start)
    return tagged


def _labels_1d(ids: list[int], mode: str, sid: dict[str, int], stops: set[int], tag_ids: set[int]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    tagged = _tagged_turns(ids, sid, stops, tag_ids)
    in_turn = in_final = has_final = False
    for i, t in enumerate(ids):
        if t in stops:  # a role token or EOS ends an assistant turn left open (truncated)
            in_turn, in_final, has_final = t == sid["assistant"] and i in tagged, False, False
            continue
        if not in_turn:
            continue
        if t == sid["end"]:
            if mode == "assistant" or has_final:
                labels[i] = t
            in_turn = in_final = False
            continue
        if t == sid["final_open"]:
            in_final = has_final = True
        if mode == "assistant" or in_final:
            labels[i] = t
        if t == sid["final_close"]:
            in_final = False
    return labels


def thinking_labels(
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    tokenizer: Any,
    mode: str = "assistant",
    tags: ThinkingTags = DEFAULT_TAGS,
    attention_mask: torch.Tensor | Sequence[int] | Sequence[Sequence[int]] | None = None,
) -> torch.Tensor | list[int] | list[list[int]]:
    """Causal-LM labels for one sequence or a batch (packed sequences welcome): ids or -100.

    - `assistant`: every token after each `<|assistant|>` up to and including the `<|end|>`
      that closes the turn (thinking, final and `<|end|>`); an unclosed turn ends before the next
      role token or EOS. Equals the template's `{% generation %}` span, except that a turn holding no
      tag token (an earlier turn kept as its final text only, as chat history keeps it) is context:
      the model must never learn to answer without thinking.
    - `final_only`: within assistant turns, each `<final>` ... `</final>` block, both tags
      included (the model must learn to leave thinking and to close the answer), plus the turn's
      `<|end|>` when the turn has a final (so it learns to stop); thinking is context only.
    - `all`: every token.
    Positions where `attention_mask` is 0 are -100 in every mode. Returns the input's type
    (a LongTensor on the same device for tensors, else lists).
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown loss mode {mode!r}; choose one of {LOSS_MODES}")
    sid = {
        "assistant": _single_id(tokenizer, "<|assistant|>"),
        "end": _single_id(tokenizer, "<|end|>"),
        "final_open": _single_id(tokenizer, f"<{tags.final}>"),
        "final_close": _single_id(tokenizer, f"</{tags.final}>"),
    }
    stops = {sid["assistant"], _single_id(tokenizer, "<|user|>"), _single_id(tokenizer, "<|system|>")}
    stops |= {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
    stops.discard(sid["end"])  # some Phi-3 tokenizers use <|end|> as EOS or padding

    is_tensor = isinstance(input_ids, torch.Tensor)
    rows = input_ids.tolist() if is_tensor else input_ids
    batched = input_ids.dim() == 2 if is_tensor else len(rows) > 0 and hasattr(rows[0], "__len__")
    seqs = [list(r) for r in rows] if batched else [list(rows)]
    tag_ids = {_single_id(tokenizer, t) for t in tags.tokens}
    labels = [list(s) if mode == "all" else _labels_1d(s, mode, sid, stops, tag_ids) for s in seqs]
    if attention_mask is not None:
        masks = attention_mask.tolist() if isinstance(attention_mask, torch.Tensor) else attention_mask
        masks = masks if batched else [masks]
        labels = [
            [lab if m else IGNORE_INDEX for lab, m in zip(ls, ms, strict=True)]
            for ls, ms in zip(labels, masks, strict=True)
        ]
    out = labels if batched else labels[0]
    return torch.tensor(out, dtype=torch.long, device=input_ids.device) if is_tensor else out
