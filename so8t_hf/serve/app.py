"""The FastAPI app: `POST /think`, OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`,
`/healthz`, `/metrics`.

What: every API request is authenticated (one Bearer key), size-, time- and shape-checked, queued on
the `GenerationEngine` (503 + Retry-After from measured throughput when the queue is full), answered
with the final answer only (the positive grammar of `thinking.grammar`: a withheld final is "" with outcome
`withheld` and a `reason` code, also in the audit row's `reason` column, and `finish_reason`
`content_filter` on the OpenAI route), and audited: nothing is delivered that was not
audited. One committed SQLite row per authenticated request before the response leaves; a stream commits
its row before its first byte (an audit failure is then the same JSON 500 `audit_unavailable` as without
streaming) and rewrites it before its last event; unauthenticated failures are committed into aggregate
rows before the 401. All DB work runs on the audit thread, off the event loop. While `/healthz` would be
503 (audit writes failing, workers stopped), every API request gets 503 `unavailable` with Retry-After
at once, without touching the DB (no audit row then: it is in `/metrics` and the log).

Errors are JSON `{"error": {"type", "message", "request_id"}}`: 400 invalid JSON or two Authorization
headers, 401 missing/unknown key, 403 revoked key, 408 body not received in time, 413 body too large,
431 request headers too large, 422 invalid request (schema and strict types, too many messages, too many
input tokens, `max_new_tokens` over the cap, content holding a role / special / tag token), 503 queue
full, shutting down or unavailable, 500 anything else (a fixed message, never exception text). On
shutdown, requests still in flight when the grace period ends (`drain`) get a JSON 503 or an SSE `error`
event with their request id, audited with that status; one still uploading its body gets the JSON 503
then too. Nothing returned or logged holds generated text other than the final answer; logs carry ids,
lengths, counts and keyed digests only. `usage.completion_tokens` counts the final's tokens unless the
operator asks for every generated token (it would reveal the thinking's length); the thinking digest (an
HMAC under the operator's key) is returned only when turned on.

Limits: one model per process; `/healthz` and `/metrics` are unauthenticated (they expose counts
only, but the generated-token counter moves by each request's total: keep `/metrics` internal);
response times still reveal roughly how long the thinking was.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from so8t_hf.serve.audit import AuditLog, AuditRow, Metrics
from so8t_hf.serve.auth import AuthError, KeyStore
from so8t_hf.serve.engine import ForbiddenContent, GenerationEngine, GenParams, GenResult, Job, QueueFull
from so8t_hf.serve.schemas import ApiError, ChatRequest, ServeSettings, ThinkRequest, parse, read_body

__all__ = ["ServeSettings", "create_app"]

logger = logging.getLogger("so8t_hf.serve")
AUDIT_CHECK_SECONDS = 1.0  # how often the audit DB file is checked (deleted? replaced?) and, while failing, probed
UNAVAILABLE_RETRY_AFTER = 2  # Retry-After (seconds) of a 503 `unavailable`


class _ClosingStream(StreamingResponse):
    """A streaming response that awaits `on_close()` when it ends, even if its body never started."""

    def __init__(self, content: Any, on_close: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self._on_close())


class _HeaderLimit:
    """ASGI middleware: request headers over `limit` bytes get 431 (`on_refuse(path)` audits it first)."""

    def __init__(self, app: Any, limit: int, on_refuse: Any) -> None:
        self.app, self.limit, self.on_refuse = app, limit, on_refuse

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) > self.limit:
            rid = uuid.uuid4().hex
            await self.on_refuse(scope.get("path", ""))
            body = {"error": {"type": "headers_too_large", "message": f"the request headers are over {self.limit} "
                              "bytes", "request_id": rid}}
            await JSONResponse(body, status_code=431, headers={"X-Request-ID": rid, "Connection": "close"})(
                scope, receive, send)
            return
        await self.app(scope, receive, send)


class _Ctx:
    """One request's bookkeeping: id, clocks, key id, whether its audit row is written."""

    def __init__(self, endpoint: str) -> None:
        self.rid = uuid.uuid4().hex
        self.ts, self.t0 = time.time(), time.monotonic()
        self.endpoint, self.key_id, self.stream, self.done = endpoint, None, False, False
        self.begun = False  # a stream's first row (outcome `streaming`) is committed


def create_app(engine: GenerationEngine, keys: KeyStore, audit: AuditLog, settings: ServeSettings | None = None,
               start_engine: bool = True) -> FastAPI:
    """The app; the lifespan starts the engine's workers and the audit check and, on shutdown, stops them and
    closes the audit DB. `app.state.drain()` ends every request still in flight with a 503 (the server's grace
    period calls it)."""
    settings = settings or ServeSettings()
    metrics = Metrics()
    draining = asyncio.Event()

    created = int(time.time())

    async def check_every(seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await audit.run(audit.check)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            engine.start()
        checker = asyncio.create_task(check_every(AUDIT_CHECK_SECONDS))
        try:
            yield
        finally:
            checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker
            await asyncio.to_thread(engine.stop)
            try:
                await audit.run(audit.close)
            except Exception as exc:  # noqa: BLE001
                logger.error("audit close failed: %s", type(exc).__name__)
            logger.info("shutdown complete: %d audit rows committed", audit.rows_written)

    app = FastAPI(title="so8t_hf serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.audit = engine, metrics, audit

    def drain() -> int:
        """Refuse new requests and end the ones in flight with 503 shutting_down."""
        draining.set()
        ended = engine.drain("ShuttingDown")
        logger.warning("grace period over: %d request(s) still in flight end with 503 shutting_down", ended)
        return ended

    app.state.drain = drain

    async def headers_too_large(path: str) -> None:
        endpoint = path if path in ("/think", "/v1/chat/completions", "/v1/models") else "other"
        metrics.record(endpoint, "headers_too_large", 431, 0.0)
        try:
            await audit.run(audit.count_unauthenticated, endpoint, 431, "headers_too_large", time.time(), 0.0)
        except Exception as exc:  # noqa: BLE001 - the 431 goes out anyway: it delivers nothing
            logger.error("audit write failed: 431 headers_too_large error=%s", type(exc).__name__)

    app.add_middleware(_HeaderLimit, limit=settings.max_header_bytes, on_refuse=headers_too_large)

    def log_line(ctx: _Ctx, status: int, outcome: str, row: AuditRow, latency: float) -> None:
        logger.info(
            "request_id=%s endpoint=%s key_id=%s status=%d outcome=%s stream=%d final_chars=%s prompt_tokens=%s "
            "completion_tokens=%s thinking_hmac=%s reason=%s latency_ms=%.1f", ctx.rid, ctx.endpoint, ctx.key_id,
            status,
            outcome, ctx.stream, row.final_chars, row.prompt_tokens, row.completion_tokens, row.thinking_hmac,
            row.reason, latency * 1000,
        )

    async def begin(ctx: _Ctx) -> bool:
        """A stream's row, committed before its first byte (outcome `streaming`); False if the write failed."""
        try:
            await audit.run(audit.write, AuditRow(ctx.rid, ctx.ts, ctx.endpoint, 200, "streaming", 0.0, ctx.key_id,
                                                  True))
        except Exception as exc:  # noqa: BLE001
            logger.error("audit write failed: request_id=%s error=%s", ctx.rid, type(exc).__name__)
            return False
        ctx.begun = True
        return True

    async def finish(ctx: _Ctx, status: int, outcome: str, result: GenResult | None = None) -> bool:
        """Commit the audit row (once), count it, log it (ids, lengths, digests only). False if the write failed."""
        if ctx.done:
            return True
        ctx.done = True
        latency = time.monotonic() - ctx.t0
        row = AuditRow(ctx.rid, ctx.ts, ctx.endpoint, status, outcome, latency * 1000, ctx.key_id, ctx.stream)
        if result is not None:
            row.thinking_hmac, row.final_chars = result.thinking_hmac, len(result.final)
            row.prompt_tokens, row.completion_tokens = result.prompt_tokens, result.completion_tokens
            row.finish_reason, row.generation_text = result.finish_reason, result.text
            row.reason = result.reason or None  # the grammar's reason code: why the final was not shown
        ok = True
        try:
            await audit.run(audit.write, row, ctx.begun)
        except Exception as exc:  # noqa: BLE001
            logger.error("audit write failed: request_id=%s error=%s", ctx.rid, type(exc).__name__)
            ok = False
        metrics.record(ctx.endpoint, outcome, status, latency, row.prompt_tokens, row.completion_tokens)
        log_line(ctx, status, outcome, row, latency)
        return ok

    def respond(ctx: _Ctx, status: int, code: str, message: str, headers: dict[str, str] | None) -> JSONResponse:
        body = {"error": {"type": code, "message": message, "request_id": ctx.rid}}
        return JSONResponse(body, status_code=status, headers={"X-Request-ID": ctx.rid, **(headers or {})})

    async def error(ctx: _Ctx, status: int, code: str, message: str,
                    headers: dict[str, str] | None = None) -> JSONResponse:
        if not await finish(ctx, status, code) and status < 500:
            status, code, message = 500, "audit_unavailable", "the request could not be audited"
        return respond(ctx, status, code, message, headers)

    async def unauthenticated(ctx: _Ctx, exc: AuthError) -> JSONResponse:
        """No valid key: committed into an aggregate audit row (not one row each) before the answer, logged."""
        ctx.done = True
        latency = time.monotonic() - ctx.t0
        status, code, message = exc.status, exc.code, str(exc)
        try:
            await audit.run(audit.count_unauthenticated, ctx.endpoint, exc.status, exc.code, ctx.ts, latency * 1000)
        except Exception as err:  # noqa: BLE001
            logger.error("audit write failed: request_id=%s error=%s", ctx.rid, type(err).__name__)
            status, code, message = 500, "audit_unavailable", "the request could not be audited"
        metrics.record(ctx.endpoint, code, status, latency)
        log_line(ctx, status, code, AuditRow(ctx.rid, ctx.ts, ctx.endpoint, status, code, 0), latency)
        challenge = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return respond(ctx, status, code, message, challenge)

    def unavailable_reason() -> str | None:
        """Why `/healthz` is 503 now (audit writes failing, workers stopped), or None."""
        if not audit.healthy:
            return f"audit failing ({audit.last_error})"
        if start_engine and not engine.workers_alive:
            return "generation workers stopped"
        return None

    def refuse_unavailable(ctx: _Ctx, why: str) -> JSONResponse:
        """503 at once, no DB work (it is failing or nothing can be generated): in /metrics and the log."""
        ctx.done = True
        latency = time.monotonic() - ctx.t0
        metrics.record(ctx.endpoint, "unavailable", 503, latency)
        log_line(ctx, 503, "unavailable", AuditRow(ctx.rid, ctx.ts, ctx.endpoint, 503, "unavailable", 0), latency)
        return respond(ctx, 503, "unavailable", f"the server cannot take requests now ({why}); retry later",
                       {"Retry-After": str(UNAVAILABLE_RETRY_AFTER)})

    async def admit(ctx: _Ctx, request: Request) -> JSONResponse | None:
        """Refuse (draining, unavailable, authentication) with the response, or None when the request may go on."""
        if draining.is_set():
            err = job_error("ShuttingDown")
            return await error(ctx, err.status, err.code, err.message)
        why = unavailable_reason()
        if why is not None:
            return refuse_unavailable(ctx, why)
        try:
            ctx.key_id = keys.authenticate(request.headers.getlist("authorization")).key_id
        except AuthError as exc:
            if exc.status == 403:
                ctx.key_id = exc.key_id
                return await error(ctx, exc.status, exc.code, str(exc))
            return await unauthenticated(ctx, exc)
        return None

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
        except ForbiddenContent as exc:
            raise ApiError(422, "forbidden_token", str(exc)) from None
        except Exception:  # noqa: BLE001
            raise ApiError(422, "invalid_request", "the chat template rejected these messages") from None
        if len(ids) > settings.max_input_tokens:
            raise ApiError(422, "too_many_input_tokens",
                           f"the prompt has {len(ids)} tokens; the limit is {settings.max_input_tokens}")
        if engine.max_positions and len(ids) + max_new > engine.max_positions:
            raise ApiError(422, "context_length_exceeded", f"prompt ({len(ids)}) + max_new_tokens ({max_new}) "
                           f"exceeds the model's {engine.max_positions} positions")
        return ids

    def job_error(value: str) -> ApiError:
        if value == "ShuttingDown":
            return ApiError(503, "shutting_down", "the server is shutting down; retry on another instance or later")
        return ApiError(500, "generation_failed", "generation failed")

    async def wait_result(job: Job) -> GenResult:
        while True:
            kind, value = await job.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise job_error(value)

    def finish_reason(r: GenResult) -> str:
        return "content_filter" if r.outcome == "withheld" else "length" if r.finish_reason == "length" else "stop"

    def body_of(ctx: _Ctx, r: GenResult, openai: bool) -> dict[str, Any]:
        shown = r.completion_tokens if settings.usage_counts_thinking else r.final_tokens
        usage = {"prompt_tokens": r.prompt_tokens, "completion_tokens": shown, "total_tokens": r.prompt_tokens + shown}
        digest = {"thinking_hmac": r.thinking_hmac} if settings.thinking_digest == "response" else {}
        if not openai:
            return {"request_id": ctx.rid, "final": r.final, "usage": usage, "finish_reason": r.finish_reason,
                    "outcome": r.outcome, "reason": r.reason, **digest}
        choice = {"index": 0, "message": {"role": "assistant", "content": r.final}, "finish_reason": finish_reason(r)}
        return {"id": f"chatcmpl-{ctx.rid}", "object": "chat.completion", "created": int(ctx.ts),
                "model": engine.model_name, "choices": [choice], "usage": usage, "request_id": ctx.rid,
                "reason": r.reason, **digest}

    def sse(data: Any, event: str | None = None) -> str:
        return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def chunk(ctx: _Ctx, delta: dict[str, str], reason: str | None = None, extra: dict | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        return sse({"id": f"chatcmpl-{ctx.rid}", "object": "chat.completion.chunk", "created": int(ctx.ts),
                    "model": engine.model_name, "choices": [choice], **(extra or {})})

    def sse_error(ctx: _Ctx, code: str, message: str) -> str:
        return sse({"error": {"type": code, "message": message, "request_id": ctx.rid}}, "error")

    async def stream_events(ctx: _Ctx, job: Job, openai: bool):
        try:
            if openai:
                yield chunk(ctx, {"role": "assistant"})
            while True:
                kind, value = await job.events.get()
                if kind == "delta":
                    yield chunk(ctx, {"content": value}) if openai else sse({"text": value}, "delta")
                    continue
                if kind == "done" and await finish(ctx, 200, value.outcome, value):
                    if openai:
                        yield chunk(ctx, {}, finish_reason(value), {"reason": value.reason})
                        yield "data: [DONE]\n\n"
                    else:
                        yield sse(body_of(ctx, value, False), "done")
                    return
                err = ApiError(500, "audit_unavailable", "the request could not be audited") if kind == "done" \
                    else job_error(value)
                await finish(ctx, err.status, err.code)
                yield sse_error(ctx, err.code, err.message)
                return
        except Exception as exc:  # noqa: BLE001 - log the type only; end the stream with a fixed error event
            logger.error("stream error: request_id=%s error=%s", ctx.rid, type(exc).__name__)
            await finish(ctx, 500, "internal_error")
            yield sse_error(ctx, "internal_error", "internal server error")
        finally:
            job.cancel.set()

    def closer(ctx: _Ctx, job: Job):
        async def close() -> None:  # runs once the streaming response ends, however it ends
            job.cancel.set()
            try:
                await finish(ctx, 499, "client_disconnected")
            finally:
                metrics.leave()
        return close

    async def handle(request: Request, endpoint: str, openai: bool):
        ctx = _Ctx(endpoint)
        metrics.enter()
        job = None
        handed_off = False
        try:
            try:
                refused = await admit(ctx, request)
                if refused is not None:
                    return refused
                raw = await read_body(request, settings.max_body_bytes, settings.body_timeout, draining)
                req = parse(raw, ChatRequest if openai else ThinkRequest)
                ctx.stream = bool(req.stream)
                messages, params = gen_inputs(req, openai)
                job = Job(encode(messages, params.max_new_tokens), params, asyncio.get_running_loop(), ctx.stream)
                if ctx.stream and not await begin(ctx):  # no byte of a stream leaves before its row is committed
                    await finish(ctx, 500, "audit_unavailable")
                    return respond(ctx, 500, "audit_unavailable", "the request could not be audited", None)
                engine.submit(job)
                if ctx.stream:
                    handed_off = True
                    return _ClosingStream(stream_events(ctx, job, openai), closer(ctx, job),
                                          media_type="text/event-stream",
                                          headers={"X-Request-ID": ctx.rid, "Cache-Control": "no-cache"})
                result = await wait_result(job)
            except QueueFull as exc:
                return await error(ctx, 503, "queue_full", "the request queue is full; retry later",
                                   {"Retry-After": str(exc.retry_after)})
            except ApiError as exc:
                return await error(ctx, exc.status, exc.code, exc.message, exc.headers)
            if not await finish(ctx, 200, result.outcome, result):  # no answer leaves without its audit row
                return respond(ctx, 500, "audit_unavailable", "the request could not be audited", None)
            return JSONResponse(body_of(ctx, result, openai), headers={"X-Request-ID": ctx.rid})
        except asyncio.CancelledError:
            await asyncio.shield(finish(ctx, 499, "cancelled"))
            raise
        except Exception as exc:  # noqa: BLE001 - log type + code locations only: its text could quote data
            frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
            logger.error("internal error: request_id=%s error=%s\n%s", ctx.rid, type(exc).__name__, frames)
            return await error(ctx, 500, "internal_error", "internal server error")
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

    @app.get("/v1/models")
    async def list_models(request: Request):
        """OpenAI's model list (the one model served); authenticated and audited like the other routes."""
        ctx = _Ctx("/v1/models")
        refused = await admit(ctx, request)
        if refused is not None:
            return refused
        if not await finish(ctx, 200, "ok"):
            return respond(ctx, 500, "audit_unavailable", "the request could not be audited", None)
        model = {"id": engine.model_name, "object": "model", "created": created, "owned_by": "so8t_hf"}
        return JSONResponse({"object": "list", "data": [model]}, headers={"X-Request-ID": ctx.rid})

    @app.get("/healthz")
    async def healthz():
        """200 when the workers run, the audit DB takes writes and no drain began. Never waits on a locked DB:
        while failing, a probe (at most 0.2 s on a lock) gets 0.5 s on the audit thread, else the state stands."""
        alive = engine.workers_alive
        if not audit.healthy:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(audit.run(audit.probe), 0.5)
        audit_ok = audit.healthy
        ok = alive and audit_ok and not draining.is_set()
        detail = "ok" if audit_ok else f"failing ({audit.last_error})"
        if audit.recreated:
            detail += (f"; the DB file was deleted or replaced and recreated {audit.recreated} time(s), last at "
                       f"{audit.recreated_at}: earlier rows are not in {audit.path}")
        body = {"status": "ok" if ok else "unavailable", "model": engine.model_name, "queue_depth": engine.queue_depth,
                "generating": engine.active, "workers": "ok" if alive else "stopped", "audit": detail}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        text = metrics.prometheus(engine.queue_depth, engine.active, engine.max_queue, audit.rows_written,
                                  audit.healthy, audit.recreated)
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
