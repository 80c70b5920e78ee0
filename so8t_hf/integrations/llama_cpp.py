"""Final-only output for llama.cpp through `llama-cpp-python`: wrap a `llama_cpp.Llama` so that only `<final>` shows.

What: a GGUF file of a thinking run (`so8t-hf export ... --format gguf`) holds the thinking tags as plain
(USER_DEFINED) tokens, so a raw `llama-cli` / `llama-server` / `Llama.create_chat_completion` chat shows the whole
generation: thinking sections included. `FinalOnlyLlama(llama)` (or `load_final_only(path)`) returns the same
OpenAI-shaped dicts as `Llama.create_chat_completion` / `create_completion`, streaming or not, with each choice's
content replaced by the project's fail-closed reading (`so8t_hf.thinking.format`): `read_final(...).final` when
the generation ends, `visible_final_prefix` while it streams (never text a later token could turn into
thinking). A withheld final is "" with `finish_reason: "content_filter"`, as the `/think` service answers; each
choice also carries `outcome` (`final`, `no_final`, `withheld`). `logprobs` are refused (they would list the
thinking tokens). Every other attribute is the wrapped `Llama`'s.

Limits: `usage.completion_tokens` counts the thinking tokens too; a stream may already have shown the first words
of a final that is withheld at its end (never thinking text), as in the service. `llama-cpp-python` builds
llama.cpp from source on install (minutes): it is not a dependency; `load_final_only` imports it when called.

Origin: the final-only rule of the project's `/think` service (`so8t_hf.serve.engine`), applied to the
`llama-cpp-python` API (`Llama.create_chat_completion`, `Llama.create_completion`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from so8t_hf.thinking.format import DEFAULT_TAGS, TURN_END_TOKENS, ThinkingTags, read_final, visible_final_prefix

__all__ = ["FinalOnlyLlama", "load_final_only"]


def load_final_only(model_path: str, tags: ThinkingTags = DEFAULT_TAGS, **llama_kwargs: Any) -> "FinalOnlyLlama":
    """`FinalOnlyLlama(llama_cpp.Llama(model_path=model_path, **llama_kwargs))`."""
    try:
        from llama_cpp import Llama
    except ImportError as err:
        raise ImportError("so8t_hf.integrations.llama_cpp needs llama-cpp-python: pip install llama-cpp-python "
                          "(it builds llama.cpp from source)") from err
    return FinalOnlyLlama(Llama(model_path=model_path, **llama_kwargs), tags)


class FinalOnlyLlama:
    """A `llama_cpp.Llama` whose chat and completion outputs carry the final answer only (module docstring)."""

    def __init__(self, llama: Any, tags: ThinkingTags = DEFAULT_TAGS):
        self.llama = llama
        self.tags = tags

    def __getattr__(self, name: str) -> Any:
        return getattr(self.llama, name)

    def __call__(self, prompt: str, **kwargs: Any):
        return self.create_completion(prompt, **kwargs)

    def create_chat_completion(self, messages: list[dict], stream: bool = False, **kwargs: Any):
        out = self.llama.create_chat_completion(messages=messages, stream=stream, **self._kwargs(kwargs))
        if stream:
            return self._stream(out, chat=True)
        return self._whole(out, chat=True)

    def create_completion(self, prompt: Any, stream: bool = False, **kwargs: Any):
        out = self.llama.create_completion(prompt=prompt, stream=stream, **self._kwargs(kwargs))
        if stream:
            return self._stream(out, chat=False)
        return self._whole(out, chat=False)

    # ---------------------------------------------------------------------------------------------

    @staticmethod
    def _kwargs(kwargs: dict) -> dict:
        if kwargs.get("logprobs") or kwargs.get("top_logprobs"):
            raise ValueError("logprobs would show the thinking tokens: the final-only wrapper refuses them")
        stop = kwargs.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        kwargs["stop"] = list(dict.fromkeys([*stop, *TURN_END_TOKENS]))  # the project's one set of turn ends
        return kwargs

    def _whole(self, response: dict, chat: bool) -> dict:
        for choice in response.get("choices", []):
            raw = (choice.get("message") or {}).get("content") if chat else choice.get("text")
            reading = read_final(raw or "", self.tags)
            if chat:
                choice["message"] = {**choice["message"], "content": reading.final}
                choice["message"].pop("reasoning_content", None)
            else:
                choice["text"] = reading.final
            choice["logprobs"] = None
            choice["outcome"] = reading.status
            if reading.status == "withheld":
                choice["finish_reason"] = "content_filter"
        return response

    def _stream(self, chunks: Iterator[dict], chat: bool) -> Iterator[dict]:
        raw: dict[int, str] = {}
        sent: dict[int, str] = {}
        stopped: set[int] = set()  # choices whose final was withheld: nothing more is sent for them
        for chunk in chunks:
            choices = []
            for choice in chunk.get("choices", []):
                i = choice.get("index", 0)
                delta = (choice.get("delta") or {}) if chat else {}
                raw[i] = raw.get(i, "") + ((delta.get("content") or "") if chat else (choice.get("text") or ""))
                sent.setdefault(i, "")
                done = choice.get("finish_reason") is not None
                if done:
                    reading = read_final(raw[i], self.tags)
                    visible, outcome = reading.final, reading.status
                else:
                    visible, outcome = visible_final_prefix(raw[i], self.tags), None
                new = ""
                if i not in stopped:
                    if visible.startswith(sent[i]):
                        new = visible[len(sent[i]):]
                        sent[i] = visible
                    elif not done or outcome == "withheld" or not visible:
                        stopped.add(i)  # withheld (or a prefix that no longer holds): stop the text here
                out = {k: v for k, v in choice.items() if k not in ("delta", "text", "logprobs")}
                out["logprobs"] = None
                if chat:
                    out["delta"] = {k: v for k, v in delta.items() if k == "role"}
                    if new:
                        out["delta"]["content"] = new
                else:
                    out["text"] = new
                if done:
                    out["outcome"] = outcome
                    if outcome == "withheld":
                        out["finish_reason"] = "content_filter"
                if new or done or (chat and "role" in out["delta"]):
                    choices.append(out)
            if choices:
                yield {**chunk, "choices": choices}
