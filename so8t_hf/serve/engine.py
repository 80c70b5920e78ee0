"""Model loading, a bounded generation queue with worker threads, and final-only streaming.

What:
- `GenerationEngine`: requests wait in a bounded queue (`submit` raises `QueueFull` when it holds
  `max_queue` jobs, with a Retry-After measured from the recent jobs' service time) and are generated
  one at a time per worker thread with `model.generate`. Generation stops at the end-of-turn tokens,
  at `max_new_tokens`, when the first final answer is closed, or when the job is cancelled (client
  gone, or shutdown: `drain`).
- `encode_messages` refuses (`ForbiddenContent`) message content that the tokenizer would encode as
  any of its added tokens: role tokens (`<|system|>`, `<|assistant|>`...), specials (`</s>`), and the
  thinking / final tags whatever their `special` flag, so client text can never forge a turn or a tag.
- What is delivered is decided by the positive grammar (`thinking.grammar`), on token ids when the tags are
  single tokens of the tokenizer (a tag is its id, never a spelling), else on the decoded text (logged at
  start). It is read incrementally after every token (O(1) per token): generation stops once the final
  closes, or as soon as the output can no longer be shown (withheld: nothing more is worth generating). A
  stream sends the final in one delta once the generation is over, and only when the result shows it: a
  stream never shows anything that the non-streaming answer would not (`GenResult.reason` says why not).
- The thinking digest is an HMAC under the operator's key (`digest_key`), never a plain hash; without
  a key there is none.

Limits: batch size 1 per worker (no continuous batching); a stream gets the final only at the end of the
generation (any later token could still withhold it); thinking text never leaves this module except through
`GenResult.text`, which the app only writes to the audit DB under `--audit-store-thinking`. The time
a request takes still says how long its thinking was (a timing side channel this service does not hide).
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria

from so8t_hf.inference.generation import GREEDY_BELOW, prompt_ids, sampling_kwargs, stop_token_ids
from so8t_hf.thinking.format import (
    DEFAULT_TAGS,
    ThinkingTags,
    final_is_closed,
    find_thinking_problems,
    thinking_hash,
    visible_final_prefix,
)
from so8t_hf.thinking.grammar import IdReader, IdTable, read_ids, read_text
from so8t_hf.thinking.lexer import until_turn_end

__all__ = ["GREEDY_BELOW", "ForbiddenContent", "GenParams", "GenResult", "GenerationEngine", "Job", "QueueFull",
           "final_is_closed", "visible_final_prefix"]

logger = logging.getLogger("so8t_hf.serve")



class ForbiddenContent(ValueError):
    """Message content holds text the tokenizer encodes as a control token (a role token, a special, a tag)."""

    def __init__(self, index: int, token: str) -> None:
        super().__init__(f"messages[{index}].content contains {token!r}, which this model's tokenizer encodes as a "
                         "control token (a role, special or thinking tag); remove it")
        self.index, self.token = index, token


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
    final: str  # what the user may see ("" when there is none or it is withheld)
    status: str  # read_final's: "final" | "no_final" | "withheld"
    thinking_hmac: str | None  # HMAC-SHA256 of the thinking under the server's key; None when digests are off
    prompt_tokens: int
    completion_tokens: int  # every generated token, thinking included
    final_tokens: int  # tokens of the final shown (what `usage` reports unless the operator asks for all)
    finish_reason: str  # "stop" | "length" | "cancelled"
    well_formed: bool
    text: str = field(repr=False)  # raw generation, thinking included: audit DB only, never returned
    reason: str = ""  # the grammar's reason code (thinking.grammar.REASONS): why the final is not shown

    @property
    def outcome(self) -> str:
        if self.finish_reason == "cancelled":
            return "cancelled"
        if self.status == "withheld":
            return "withheld"
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
        self.failed = False
        self._fail_lock = threading.Lock()
        self.sent = ""  # final text already streamed

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def fail(self, reason: str) -> None:
        """End the job with an error event (once) and stop its generation at the next token."""
        with self._fail_lock:
            if self.failed:
                return
            self.failed = True
        self.cancel.set()
        self.emit("error", reason)


class _StepHook(StoppingCriteria):
    """Called by `generate` after every new token: reads it into the grammar (O(1) per token on ids) and stops
    once the final is closed or the output is withheld already (nothing more could be shown)."""

    def __init__(self, engine: GenerationEngine, job: Job, prompt_len: int) -> None:
        self.engine, self.job, self.prompt_len = engine, job, prompt_len
        self.seen = 0
        self.reader = IdReader(engine.id_table) if engine.id_table is not None else None
        self.tail = ""  # text mode: the decoded last tokens, to see the final's closing tag arrive

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        job, eng = self.job, self.engine
        stop = job.cancel.is_set()
        new = input_ids[0, self.prompt_len + self.seen :].tolist()
        self.seen += len(new)
        if self.reader is not None:
            with eng._tok_lock:  # text between blocks is decoded (one token) to see whether it is whitespace
                for tid in new:
                    self.reader.feed(tid)
            stop |= self.reader.grammar.done
        elif new:
            close = f"</{eng.tags.final}>"
            self.tail = (self.tail + eng.decode(new))[-4 * len(close) :]
            if self.tail.endswith(close):
                stop |= final_is_closed(eng.decode(input_ids[0, self.prompt_len :].tolist()), eng.tags)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class GenerationEngine:
    """A bounded queue of generation jobs served by `workers` threads sharing one model."""

    def __init__(self, model: Any, tokenizer: Any, tags: ThinkingTags = DEFAULT_TAGS, max_queue: int = 16,
                 workers: int = 1, model_name: str = "so8t", digest_key: bytes | None = None) -> None:
        self.model, self.tokenizer, self.tags = model, tokenizer, tags
        self.model_name = model_name
        self.max_queue, self.n_workers = max_queue, workers
        self.digest_key = digest_key
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe for concurrent use
        self._threads: list[threading.Thread] = []
        self._running: set[Job] = set()
        self._lock = threading.Lock()
        self._service_s: deque[float] = deque(maxlen=32)  # generation time of the recent jobs, for Retry-After
        self.final_close_id = tokenizer.get_vocab().get(f"</{tags.final}>")
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._control_ids = {int(i): str(t) for i, t in decoder.items()}  # every added token: roles, specials, tags
        try:
            self.id_table: IdTable | None = IdTable.of(tokenizer, tags, self.stop_ids)
            logger.info("finals are read on token ids (the thinking tags are single tokens)")
        except ValueError as exc:
            self.id_table = None
            logger.warning("finals are read on decoded text: %s", exc)

    # -- tokenizer ------------------------------------------------------------------------------
    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids of a chat (chat template with the generation prompt); `ForbiddenContent` when a
        message's content would be encoded with one of the tokenizer's added (control) tokens."""
        with self._tok_lock:
            for i, message in enumerate(messages):
                ids = self.tokenizer.encode(message["content"], add_special_tokens=False)
                bad = next((t for t in ids if t in self._control_ids), None)
                if bad is not None:
                    raise ForbiddenContent(i, self._control_ids[bad])
            return prompt_ids(self.tokenizer, messages)

    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def count_tokens(self, text: str) -> int:
        if not text:
            return 0
        with self._tok_lock:
            return len(self.tokenizer.encode(text, add_special_tokens=False))

    # -- final / stream helpers ------------------------------------------------------------------
    def stream_delta(self, job: Job, visible: str) -> None:
        if job.failed:
            return
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
        return len(self._running)

    def retry_after(self) -> int:
        """Seconds until the queue has room: the jobs ahead times the mean service time of the last 32 jobs,
        over the workers (whole seconds, 1 to 60; 1 before any job has been measured)."""
        if not self._service_s:
            return 1
        mean = sum(self._service_s) / len(self._service_s)
        ahead = self.queue_depth + self.active
        return max(1, min(60, math.ceil(mean * ahead / max(1, self.n_workers))))

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
            raise QueueFull(self.retry_after()) from None

    def drain(self, reason: str = "ShuttingDown") -> int:
        """End every waiting and running job now with an error event `reason` (their requests answer 503);
        running generations stop at their next token. Returns the number of jobs ended."""
        ended = 0
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.fail(reason)
                ended += 1
        with self._lock:
            running = list(self._running)
        for job in running:
            job.fail(reason)
            ended += 1
        return ended

    def stop(self, timeout: float = 30.0) -> None:
        """Fail the waiting jobs, stop the running ones at their next token, and join the workers."""
        self.drain()
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
                job.fail("Cancelled")
                continue
            with self._lock:
                self._running.add(job)
            t0 = time.monotonic()
            try:
                result = self._generate(job)
                if not job.failed:
                    job.emit("done", result)
            except Exception as exc:  # noqa: BLE001 - never log its message: it could quote generated text
                logger.error("generation failed: %s", type(exc).__name__)
                job.fail(type(exc).__name__)
            finally:
                with self._lock:
                    self._running.discard(job)
                self._service_s.append(time.monotonic() - t0)

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
        with self._tok_lock:
            reading = read_ids(new, self.id_table) if self.id_table is not None else read_text(text, self.tags)
        if job.stream and not job.cancel.is_set():
            self.stream_delta(job, reading.final)  # the whole final, once: what the JSON answer shows
        if job.cancel.is_set():
            reason = "cancelled"
        elif new and (new[-1] in self.stop_ids or reading.closed):
            reason = "stop"
        else:
            reason = "length" if len(new) >= p.max_new_tokens else "stop"
        digest = thinking_hash(text, self.tags, key=self.digest_key) if self.digest_key else None
        return GenResult(
            final=reading.final, status=reading.status, thinking_hmac=digest, prompt_tokens=len(job.prompt_ids),
            completion_tokens=len(new), final_tokens=self.count_tokens(reading.final), finish_reason=reason,
            well_formed=not find_thinking_problems(until_turn_end(text, self.tags).strip(), self.tags), text=text,
            reason=reading.reason,
        )
