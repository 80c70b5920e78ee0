"""A vLLM reasoning parser for so8t_hf models: thinking sections -> `reasoning_content`, the final -> `content`.

Use (the merged model folder of `so8t-hf export`, a plain Phi-3):

    vllm serve MERGED_DIR --reasoning-parser-plugin so8t_hf/integrations/vllm_reasoning.py --reasoning-parser so8t

What: `So8tReasoning` is the parse logic, a thin adapter over the project's positive grammar
(`so8t_hf.thinking.grammar`), testable without vLLM; `So8tReasoningParser` (defined only when vLLM imports)
is the `vllm.reasoning.ReasoningParser` subclass registered as `so8t` with `ReasoningParserManager`. Content is
the final of an output that parses under the grammar (the configured sections, one `<final>...</final>` that
holds nothing tag-like, then only turn-end tokens), else None: nothing outside a clean final reaches `content`.
- non-streaming (`extract_reasoning`, older vLLM `extract_reasoning_content`): vLLM passes the text only (tags
  are plain added tokens, so they survive `skip_special_tokens`); read with `grammar.read_text`. Reasoning is
  the text outside the final: the whole output when the final is withheld.
- streaming (`extract_reasoning_streaming`, older `extract_reasoning_content_streaming`): the delta token ids
  go to `grammar.IdReader` (a tag is its id). Text before the final streams as reasoning; the final's text is
  held, and sent as one content delta once a turn-end id (`<|end|>`, which vLLM passes in the last delta)
  follows the closed final and the grammar accepts it. A stream never shows content that the non-streaming
  reading would withhold.
- `is_reasoning_end`: the final's opening id was generated; `extract_content_ids`: the final's ids when the
  grammar accepts the output, else [].

Limits: the tag set is the model folder's `config.json` `thinking_tags` (the default set when it has none);
the tags must be single tokens of the tokenizer. A stream that ends without a turn-end token (a length limit)
gets no content. Origin: vLLM's reasoning-parser plugin interface (`--reasoning-parser-plugin`); written for
this project (issue 23).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from so8t_hf.thinking.format import DEFAULT_TAGS, ThinkingTags
from so8t_hf.thinking.grammar import IdReader, IdTable, read_ids, read_text

__all__ = ["So8tReasoning", "tags_of"]

logger = logging.getLogger(__name__)


def tags_of(tokenizer: Any) -> ThinkingTags:
    """The model folder's tag set (`config.json` `thinking_tags` next to the tokenizer), else the default."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    try:
        tags = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("thinking_tags")
    except (OSError, ValueError):
        tags = None
    return ThinkingTags(tuple(tags["sections"]), tags["final"]) if tags else DEFAULT_TAGS


class So8tReasoning:
    """The parse logic (module docstring). `stream` returns (reasoning delta, content delta) or None."""

    def __init__(self, tokenizer: Any, tags: ThinkingTags | None = None) -> None:
        self.tags = tags or tags_of(tokenizer)
        self.table = IdTable.of(tokenizer, self.tags)
        self.final_open = next(i for i, (n, c) in self.table.tag_of.items() if n == self.tags.final and not c)
        self.reader = IdReader(self.table)
        self.released = False

    def extract(self, model_output: str) -> tuple[str | None, str | None]:
        reading = read_text(model_output, self.tags)
        if reading.status != "final":
            return model_output or None, None
        open_tag, close_tag = f"<{self.tags.final}>", f"</{self.tags.final}>"
        start = model_output.index(open_tag)
        end = model_output.index(close_tag, start) + len(close_tag)
        reasoning = (model_output[:start] + model_output[end:]).strip()
        return reasoning or None, reading.final

    def stream(self, previous_text: str, current_text: str, delta_text: str, previous_token_ids: Sequence[int],
               current_token_ids: Sequence[int], delta_token_ids: Sequence[int]
               ) -> tuple[str | None, str | None] | None:
        if not previous_token_ids:  # a new request on this instance
            self.reader, self.released = IdReader(self.table), False
        grammar = self.reader.grammar
        before = grammar.state
        ended = False
        for tid in delta_token_ids:
            if grammar.state == "after" and tid in self.table.ends:
                ended = True
            self.reader.feed(int(tid))
        content = None
        if ended and not self.released and not grammar.failed:
            reading = self.reader.reading()
            if reading.status == "final":
                content, self.released = reading.final, True
        in_final = before in ("final", "after") or grammar.state in ("final", "after")
        reasoning = delta_text if delta_text and (grammar.failed or not in_final) else None
        if reasoning is None and content is None:
            return None
        return reasoning, content

    def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
        return self.final_open in input_ids

    def extract_content_ids(self, input_ids: list[int]) -> list[int]:
        ids = list(input_ids)
        if read_ids(ids, self.table).status != "final":
            return []
        start = ids.index(self.final_open) + 1
        close = next(i for i, (n, c) in self.table.tag_of.items() if n == self.tags.final and c)
        return ids[start : ids.index(close, start)]


try:  # vLLM is optional: the parse logic above is what the tests run
    from vllm.reasoning import ReasoningParser, ReasoningParserManager
except ImportError:  # pragma: no cover - depends on the environment
    ReasoningParser = None

if ReasoningParser is not None:  # pragma: no cover - needs vLLM
    try:
        from vllm.entrypoints.openai.engine.protocol import DeltaMessage
    except ImportError:
        from vllm.entrypoints.openai.protocol import DeltaMessage

    _REASONING_FIELD = "reasoning" if "reasoning" in getattr(DeltaMessage, "model_fields", {}) else "reasoning_content"

    class So8tReasoningParser(ReasoningParser):
        """vLLM's `ReasoningParser` over `So8tReasoning` (module docstring)."""

        def __init__(self, tokenizer: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(tokenizer, *args, **kwargs)
            self.so8t = So8tReasoning(tokenizer)

        def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
            return self.so8t.is_reasoning_end(input_ids)

        def extract_content_ids(self, input_ids: list[int]) -> list[int]:
            return self.so8t.extract_content_ids(input_ids)

        def extract_reasoning(self, model_output: str, request: Any) -> tuple[str | None, str | None]:
            return self.so8t.extract(model_output)

        def extract_reasoning_streaming(self, previous_text, current_text, delta_text, previous_token_ids,
                                        current_token_ids, delta_token_ids):
            out = self.so8t.stream(previous_text, current_text, delta_text, previous_token_ids, current_token_ids,
                                   delta_token_ids)
            if out is None:
                return None
            return DeltaMessage(**{_REASONING_FIELD: out[0], "content": out[1]})

        extract_reasoning_content = extract_reasoning  # the names of vLLM before 0.11
        extract_reasoning_content_streaming = extract_reasoning_streaming

    ReasoningParserManager.register_module("so8t", module=So8tReasoningParser)
    __all__ += ["So8tReasoningParser"]
