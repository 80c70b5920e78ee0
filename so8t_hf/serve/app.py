"""The FastAPI app: `POST /think`, OpenAI-compatible `POST /v1/chat/completions`, `/healthz`, `/metrics`.

What: every API request is authenticated (Bearer key), size- and shape-checked, queued on the
`GenerationEngine` (503 + Retry-After when the queue is full), answered with the final answer
only, and audited (one committed SQLite row per request, before the response or the last
streamed event leaves). Errors are JSON `{"error": {"type", "message", "request_id"}}`:
400 invalid JSON, 401 missing/unknown key, 403 revoked key, 413 body too large, 422 invalid
request (schema, too many messages, too many input tokens, `max_new_tokens` over the cap),
503 queue full or shutting down, 500 anything else (a fixed message, never exception text).
Nothing returned or logged holds generated text other than the final answer; logs carry ids,
lengths, counts and hashes only.

Limits: one model per process; `/healthz` and `/metrics` are unauthenticated (they expose counts
only); `n` must be 1 and `stop` sequences are not supported on the OpenAI route.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from so8t_hf.serve.audit import AuditLog, AuditRow, Metrics
from so8t_hf.serve.auth import AuthError, KeyStore
from so8t_hf.serve.engine import GenerationEngine, GenParams, GenResult, Job, QueueFull

__all__ = ["ServeSettings", "create_app"]

logger = logging.getLogger("so8t_hf.serve")


@dataclass
class ServeSettings:
    """Request limits (CLI flags of the same names)."""

    max_new_tokens_cap: int = 512
    default_max_new_tokens: int = 256  # used when a request gives none (capped at max_new_tokens_cap)
    max_body_bytes: int = 65536
    max_messages: int = 32
    max_input_tokens: int = 2048


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


# ----------------------------------------------------------------------------------- request schemas
class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ThinkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] | None = Field(None, min_length=1)
    query: str | None = Field(None, min_length=1)
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stream: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> ThinkRequest:
        if (self.messages is None) == (self.query is None):
            raise ValueError("give exactly one of 'messages' or 'query'")
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatRequest(BaseModel):  # unknown OpenAI fields are ignored
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    stop: None = Field(None, description="stop sequences are not supported")


def _validation_message(exc: ValidationError) -> str:
    """Field locations and messages only: pydantic's `input` (the client's data) is never echoed."""
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:10]]
    return "; ".join(parts)[:2000]


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise ApiError(400, "invalid_request", "invalid Content-Length")
        if int(length) > limit:
            raise ApiError(413, "body_too_large", f"the request body is over {limit} bytes")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, "body_too_large", f"the request body is over {limit} bytes")
    return bytes(buf)


def _parse(raw: bytes, schema: type[BaseModel]) -> Any:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_request", "the request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", _validation_message(exc)) from None


class _ClosingStream(StreamingResponse):
    """A streaming response that calls `on_close` when it ends, even if its body never started."""

    def __init__(self, content: Any, on_close: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _Ctx:
    """One request's bookkeeping: id, clocks, key id, whether its audit row is written."""

    def __init__(self, endpoint: str) -> None:
        self.rid = uuid.uuid4().hex
        self.ts, self.t0 = time.time(), time.monotonic()
        self.endpoint, self.key_id, self.stream, self.done = endpoint, None, False, False


def create_app(engine: GenerationEngine, keys: KeyStore, audit: AuditLog, settings: ServeSettings | None = None,
               start_engine: bool = True) -> FastAPI:
    """The app; the lifespan starts the engine's workers and, on shutdown, stops them and closes the audit DB."""
    settings = settings or ServeSettings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)
            audit.close()
            logger.info("shutdown complete: %d audit rows committed", audit.rows_written)

    app = FastAPI(title="so8t_hf serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.audit = engine, metrics, audit

    def finish(ctx: _Ctx, status: int, outcome: str, result: GenResult | None = None) -> bool:
        """Commit the audit row (once), count it, log it (ids, lengths, hashes only). False if the write failed."""
        if ctx.done:
            return True
        ctx.done = True
        latency = time.monotonic() - ctx.t0
        row = AuditRow(ctx.rid, ctx.ts, ctx.endpoint, status, outcome, latency * 1000, ctx.key_id, ctx.stream)
        if result is not None:
            row.thinking_sha256, row.final_chars = result.thinking_sha256, len(result.final)
            row.prompt_tokens, row.completion_tokens = result.prompt_tokens, result.completion_tokens
            row.finish_reason, row.generation_text = result.finish_reason, result.text
        ok = True
        try:
            audit.write(row)
        except Exception as exc:  # noqa: BLE001
            logger.error("audit write failed: request_id=%s error=%s", ctx.rid, type(exc).__name__)
            ok = False
        metrics.record(ctx.endpoint, outcome, status, latency, row.prompt_tokens, row.completion_tokens)
        logger.info(
            "request_id=%s endpoint=%s key_id=%s status=%d outcome=%s stream=%d final_chars=%s prompt_tokens=%s "
            "completion_tokens=%s thinking_sha256=%s latency_ms=%.1f", ctx.rid, ctx.endpoint, ctx.key_id, status,
            outcome, ctx.stream, row.final_chars, row.prompt_tokens, row.completion_tokens, row.thinking_sha256,
            latency * 1000,
        )
        return ok

    def error(ctx: _Ctx, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        if not finish(ctx, status, code) and status < 500:
            status, code, message = 500, "audit_unavailable", "the request could not be audited"
        body = {"error": {"type": code, "message": message, "request_id": ctx.rid}}
        return JSONResponse(body, status_code=status, headers={"X-Request-ID": ctx.rid, **(headers or {})})

    def gen_inputs(req: Any, openai: bool) -> tuple[list[dict[str, str]], GenParams]:
        if openai:
            messages = [{"role": "system" if m.role == "developer" else m.role,
                         "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                        for m in req.messages]
            max_new = req.max_completion_tokens or req.max_tokens
        else:
            messages = ([m.model_dump() for m in req.messages] if req.messages is not None
                        else [{"role": "user", "content": req.query}])
            max_new = req.max_new_tokens
        if len(messages) > settings.max_messages:
            raise ApiError(422, "too_many_messages", f"{len(messages)} messages; the limit is {settings.max_messages}")
        cap = settings.max_new_tokens_cap
        if max_new is None:
            max_new = min(settings.default_max_new_tokens, cap)
        elif max_new > cap:
            raise ApiError(422, "max_new_tokens_over_cap", f"max_new_tokens {max_new} is over the cap of {cap}")
        return messages, GenParams(max_new, req.temperature, req.top_p)

    def encode(messages: list[dict[str, str]], max_new: int) -> list[int]:
        try:
            ids = engine.encode_messages(messages)
        except Exception:  # noqa: BLE001
            raise ApiError(422, "invalid_request", "the chat template rejected these messages") from None
        if len(ids) > settings.max_input_tokens:
            raise ApiError(422, "too_many_input_tokens",
                           f"the prompt has {len(ids)} tokens; the limit is {settings.max_input_tokens}")
        if engine.max_positions and len(ids) + max_new > engine.max_positions:
            raise ApiError(422, "context_length_exceeded", f"prompt ({len(ids)}) + max_new_tokens ({max_new}) "
                           f"exceeds the model's {engine.max_positions} positions")
        return ids

    async def wait_result(job: Job) -> GenResult:
        while True:
            kind, value = await job.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise ApiError(503, "shutting_down", "the server is shutting down") if value == "ShuttingDown" \
                    else ApiError(500, "generation_failed", "generation failed")

    def body_of(ctx: _Ctx, r: GenResult, openai: bool) -> dict[str, Any]:
        usage = {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                 "total_tokens": r.prompt_tokens + r.completion_tokens}
        if not openai:
            return {"request_id": ctx.rid, "final": r.final, "thinking_sha256": r.thinking_sha256, "usage": usage,
                    "finish_reason": r.finish_reason, "outcome": r.outcome}
        choice = {"index": 0, "message": {"role": "assistant", "content": r.final},
                  "finish_reason": "length" if r.finish_reason == "length" else "stop"}
        return {"id": f"chatcmpl-{ctx.rid}", "object": "chat.completion", "created": int(ctx.ts),
                "model": engine.model_name, "choices": [choice], "usage": usage, "request_id": ctx.rid,
                "thinking_sha256": r.thinking_sha256}

    def sse(data: Any, event: str | None = None) -> str:
        return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def chunk(ctx: _Ctx, delta: dict[str, str], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return sse({"id": f"chatcmpl-{ctx.rid}", "object": "chat.completion.chunk", "created": int(ctx.ts),
                    "model": engine.model_name, "choices": [choice]})

    async def stream_events(ctx: _Ctx, job: Job, openai: bool):
        try:
            if openai:
                yield chunk(ctx, {"role": "assistant"})
            while True:
                kind, value = await job.events.get()
                if kind == "delta":
                    yield chunk(ctx, {"content": value}) if openai else sse({"text": value}, "delta")
                    continue
                if kind == "done" and finish(ctx, 200, value.outcome, value):
                    if openai:
                        yield chunk(ctx, {}, "length" if value.finish_reason == "length" else "stop")
                        yield "data: [DONE]\n\n"
                    else:
                        yield sse(body_of(ctx, value, False), "done")
                    return
                code = "audit_unavailable" if kind == "done" else "shutting_down" if value == "ShuttingDown" \
                    else "generation_failed"
                finish(ctx, 503 if code == "shutting_down" else 500, code)
                yield sse({"error": {"type": code, "message": code.replace("_", " "), "request_id": ctx.rid}}, "error")
                return
        except Exception as exc:  # noqa: BLE001 - log the type only; end the stream with a fixed error event
            logger.error("stream error: request_id=%s error=%s", ctx.rid, type(exc).__name__)
            finish(ctx, 500, "internal_error")
            yield sse({"error": {"type": "internal_error", "message": "internal server error", "request_id": ctx.rid}},
                      "error")
        finally:
            job.cancel.set()
            finish(ctx, 499, "client_disconnected")

    def closer(ctx: _Ctx, job: Job):
        def close() -> None:  # runs once the streaming response ends, however it ends
            job.cancel.set()
            finish(ctx, 499, "client_disconnected")
            metrics.leave()
        return close

    async def handle(request: Request, endpoint: str, openai: bool):
        ctx = _Ctx(endpoint)
        metrics.enter()
        job = None
        handed_off = False
        try:
            try:
                ctx.key_id = keys.authenticate(request.headers.get("authorization")).key_id
                raw = await _read_body(request, settings.max_body_bytes)
                req = _parse(raw, ChatRequest if openai else ThinkRequest)
                ctx.stream = bool(req.stream)
                messages, params = gen_inputs(req, openai)
                job = Job(encode(messages, params.max_new_tokens), params, asyncio.get_running_loop(), ctx.stream)
                engine.submit(job)
                if ctx.stream:
                    handed_off = True
                    return _ClosingStream(stream_events(ctx, job, openai), closer(ctx, job),
                                          media_type="text/event-stream",
                                          headers={"X-Request-ID": ctx.rid, "Cache-Control": "no-cache"})
                result = await wait_result(job)
            except AuthError as exc:
                ctx.key_id = exc.key_id
                challenge = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
                return error(ctx, exc.status, exc.code, str(exc), challenge)
            except QueueFull as exc:
                return error(ctx, 503, "queue_full", "the request queue is full; retry later",
                             {"Retry-After": str(exc.retry_after)})
            except ApiError as exc:
                return error(ctx, exc.status, exc.code, exc.message, exc.headers)
            if not finish(ctx, 200, result.outcome, result):  # no answer leaves without its audit row
                return error(ctx, 500, "audit_unavailable", "the request could not be audited")
            return JSONResponse(body_of(ctx, result, openai), headers={"X-Request-ID": ctx.rid})
        except asyncio.CancelledError:
            finish(ctx, 499, "cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - log type + code locations only: its text could quote data
            frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
            logger.error("internal error: request_id=%s error=%s\n%s", ctx.rid, type(exc).__name__, frames)
            return error(ctx, 500, "internal_error", "internal server error")
        finally:
            if job is not None and not handed_off:
                job.cancel.set()
            if not handed_off:
                metrics.leave()

    @app.post("/think")
    async def think(request: Request):
        return await handle(request, "/think", openai=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "/v1/chat/completions", openai=True)

    @app.get("/healthz")
    async def healthz():
        alive = engine.workers_alive
        body = {"status": "ok" if alive else "unavailable", "model": engine.model_name,
                "queue_depth": engine.queue_depth, "generating": engine.active}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        text = metrics.prometheus(engine.queue_depth, engine.active, engine.max_queue, audit.rows_written)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": {"type": code, "message": code.replace("_", " ")}}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.error("unhandled error: %s", type(exc).__name__)
        return JSONResponse({"error": {"type": "internal_error", "message": "internal server error"}}, status_code=500)

    return app
