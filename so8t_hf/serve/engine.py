"""Model loading, a bounded generation queue with worker threads, and final-only streaming.

What:
- `GenerationEngine`: requests wait in a bounded queue (`submit` raises `QueueFull` when it holds
  `max_queue` jobs) and are generated one at a time per worker thread with `model.generate`.
  Generation stops at the end-of-turn tokens, at `max_new_tokens`, when the first final answer
  is closed, or when the job is cancelled (client gone).
- `visible_final_prefix(text)`: the streaming hold-back rule. Only text that `extract_final`
  shows for the text so far AND that no continuation can turn into thinking is streamed:
  everything from the last `<` that has no `>` after it is held back (it may still become a
  thinking tag, a final tag or a special), then `extract_final` is applied (it drops any thinking
  region and anything unterminated) and trailing whitespace and incomplete UTF-8 (U+FFFD) wait.
  Tags are lexed left to right, and a `<` followed by a `<` or `>` is already decided, so the
  result only ever grows by appending; the last delta is `extract_final(full text)` minus what
  was sent.

Limits: batch size 1 per worker (no continuous batching); a literal `<` in an answer delays the
stream until the next `>` or the end; thinking text never leaves this module except through
`GenResult.text`, which the app only writes to the audit DB under `--audit-store-thinking`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria

from so8t_hf.inference.generation import prompt_ids, sampling_kwargs, stop_token_ids
from so8t_hf.thinking.format import (
    DEFAULT_TAGS,
    TURN_END_TOKENS,
    ThinkingTags,
    extract_final,
    find_thinking_problems,
    thinking_hash,
)

__all__ = ["GenParams", "GenResult", "GenerationEngine", "Job", "QueueFull", "final_is_closed", "visible_final_prefix"]

logger = logging.getLogger("so8t_hf.serve")


def visible_final_prefix(text: str, tags: ThinkingTags = DEFAULT_TAGS) -> str:
    """What may be streamed of a partial generation: a prefix of `extract_final` of every continuation."""
    text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence at the end decodes to U+FFFD
    lt = text.rfind("<")
    if lt >= 0 and ">" not in text[lt:]:
        text = text[:lt]
    return extract_final(text, tags)


def final_is_closed(text: str, tags: ThinkingTags = DEFAULT_TAGS) -> bool:
    """True when `text` ends with the tag that closes the first final, so generation can stop.

    Probed with extra text: the final was open before the closing tag, and now neither the final
    nor the thinking would take more text (a `</final>` inside thinking does not stop).
    """
    probe = " probe"
    before = text[: text.rfind(f"</{tags.final}>")]
    return (extract_final(before + probe, tags) != extract_final(before, tags)
            and extract_final(text + probe, tags) == extract_final(text, tags)
            and thinking_hash(text + probe, tags) == thinking_hash(text, tags))


class QueueFull(Exception):
    """The request queue is full; `retry_after` is a suggested wait in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("request queue is full")
        self.retry_after = retry_after


@dataclass
class GenParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0


@dataclass
class GenResult:
    final: str
    thinking_sha256: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    well_formed: bool
    text: str = field(repr=False)  # raw generation, thinking included: audit DB only, never returned

    @property
    def outcome(self) -> str:
        if self.finish_reason == "cancelled":
            return "cancelled"
        if not self.final:
            return "no_final"
        if self.finish_reason == "length":
            return "truncated"
        return "ok" if self.well_formed else "malformed"


class Job:
    """One request's generation. Events go to the event loop's queue: ("delta", str), ("done", GenResult),
    ("error", exception type name)."""

    def __init__(self, prompt_ids: list[int], params: GenParams, loop: asyncio.AbstractEventLoop, stream: bool):
        self.prompt_ids = prompt_ids
        self.params = params
        self.stream = stream
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.sent = ""  # final text already streamed

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class _StepHook(StoppingCriteria):
    """Called by `generate` after every new token: streams safe final deltas, stops on a closed final."""

    def __init__(self, engine: GenerationEngine, job: Job, prompt_len: int) -> None:
        self.engine, self.job, self.prompt_len = engine, job, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        job, eng = self.job, self.engine
        stop = job.cancel.is_set()
        new = input_ids[0, self.prompt_len :].tolist()
        if job.stream or (new and new[-1] == eng.final_close_id):
            text = eng.decode(new)
            if job.stream:
                eng.stream_delta(job, visible_final_prefix(text, eng.tags))
            if new and new[-1] == eng.final_close_id:
                stop |= final_is_closed(text, eng.tags)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class GenerationEngine:
    """A bounded queue of generation jobs served by `workers` threads sharing one model."""

    def __init__(self, model: Any, tokenizer: Any, tags: ThinkingTags = DEFAULT_TAGS, max_queue: int = 16,
                 workers: int = 1, model_name: str = "so8t") -> None:
        self.model, self.tokenizer, self.tags = model, tokenizer, tags
        self.model_name = model_name
        self.max_queue, self.n_workers = max_queue, workers
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe for concurrent use
        self._threads: list[threading.Thread] = []
        self._active = 0
        self._lock = threading.Lock()
        self._recent_s = 1.0  # moving average of the generation time of one job, for Retry-After
        self.final_close_id = tokenizer.get_vocab().get(f"</{tags.final}>")
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    # -- tokenizer ------------------------------------------------------------------------------
    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids of a chat (chat template with the generation prompt)."""
        with self._tok_lock:
            return prompt_ids(self.tokenizer, messages)

    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # -- final / stream helpers ------------------------------------------------------------------
    def stream_delta(self, job: Job, visible: str) -> None:
        if visible.startswith(job.sent) and len(visible) > len(job.sent):
            job.emit("delta", visible[len(job.sent) :])
            job.sent = visible

    # -- queue -----------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def workers_alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    @property
    def active(self) -> int:
        return self._active

    def start(self) -> None:
        for i in range(self.n_workers):
            t = threading.Thread(target=self._worker, name=f"so8t-gen-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise `QueueFull` with a Retry-After estimate."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            wait = self._recent_s * (self.max_queue + self._active) / max(1, self.n_workers)
            raise QueueFull(max(1, min(60, int(wait + 0.999)))) from None

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running jobs, fail the waiting ones, and join the workers."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", "ShuttingDown")
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancel.is_set():
                job.emit("error", "Cancelled")
                continue
            with self._lock:
                self._active += 1
            t0 = time.monotonic()
            try:
                job.emit("done", self._generate(job))
            except Exception as exc:  # noqa: BLE001 - never log its message: it could quote generated text
                logger.error("generation failed: %s", type(exc).__name__)
                job.emit("error", type(exc).__name__)
            finally:
                with self._lock:
                    self._active -= 1
                self._recent_s = 0.8 * self._recent_s + 0.2 * (time.monotonic() - t0)

    @torch.inference_mode()
    def _generate(self, job: Job) -> GenResult:
        p = job.params
        device = next(self.model.parameters()).device
        ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=device)
        config = GenerationConfig(max_new_tokens=p.max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                                  **sampling_kwargs(p.temperature, p.top_p))
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
            stopping_criteria=[_StepHook(self, job, ids.shape[1])],
        )
        new = out[0, ids.shape[1] :].tolist()
        text = self.decode(new)
        final = extract_final(text, self.tags)
        if job.stream:
            self.stream_delta(job, final)
            if not final.startswith(job.sent):
                logger.warning("stream diverged from the final answer (sent %d chars)", len(job.sent))
        if job.cancel.is_set():
            reason = "cancelled"
        elif new and (new[-1] in self.stop_ids or final_is_closed(text, self.tags)):
            reason = "stop"
        else:
            reason = "length" if len(new) >= p.max_new_tokens else "stop"
        body = text
        for end in TURN_END_TOKENS:
            cut = body.find(end)
            body = body if cut < 0 else body[:cut]
        return GenResult(
            final=final, thinking_sha256=thinking_hash(text, self.tags), prompt_tokens=len(job.prompt_ids),
            completion_tokens=len(new), finish_reason=reason,
            well_formed=not find_thinking_problems(body.strip(), self.tags), text=text,
        )
