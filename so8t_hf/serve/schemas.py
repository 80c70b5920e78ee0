"""Request schemas, limits and body reading of the /think service (pydantic models; no model code).

What: `ServeSettings` (the CLI's request limits and policies), `ThinkRequest` / `ChatRequest`, `ApiError`
(a JSON error with a status), `read_body` (size limit 413, time limit 408 against slow senders) and
`parse` (400 invalid JSON, 422 schema errors that never echo the client's data). Numbers and flags are
strict JSON types: `"stream": "yes"`, `"max_new_tokens": "8"` or `true`, `"temperature": "0.5"` are 422,
not coerced (an integer temperature such as `0` is a number and accepted). Defaults: `/think` samples
greedily (`temperature` 0, `top_p` 1); `/v1/chat/completions` follows OpenAI (`temperature` 1, `top_p` 1);
both generate at most `ServeSettings.default_max_new_tokens` tokens when the request gives no limit.

Limits: `n` must be 1 and `stop` sequences are not supported on the OpenAI route.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["ApiError", "ChatRequest", "ServeSettings", "ThinkRequest", "parse", "read_body"]


@dataclass
class ServeSettings:
    """Request limits (CLI flags of the same names)."""

    max_new_tokens_cap: int = 512
    default_max_new_tokens: int = 256  # used when a request gives none (capped at max_new_tokens_cap)
    max_body_bytes: int = 65536
    max_messages: int = 32
    max_input_tokens: int = 2048
    body_timeout: float = 30.0  # seconds to receive the whole body (a slow sender gets 408)
    thinking_digest: str = "off"  # "off" | "audit" (HMAC in the audit row) | "response" (also returned to clients)
    usage_counts_thinking: bool = False  # usage.completion_tokens counts thinking tokens too (reveals its length)
    max_header_bytes: int = 16384  # request headers over this get 431


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
    max_new_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False, strict=True)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, strict=True)
    stream: bool = Field(False, strict=True)

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
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, strict=True)  # OpenAI's default
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, strict=True)
    stream: bool = Field(False, strict=True)
    n: int = Field(1, ge=1, le=1, strict=True)
    stop: None = Field(None, description="stop sequences are not supported")


def _validation_message(exc: ValidationError) -> str:
    """Field locations and messages only: pydantic's `input` (the client's data) is never echoed."""
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:10]]
    return "; ".join(parts)[:2000]


async def read_body(request: Request, limit: int, timeout: float, abort: asyncio.Event | None = None) -> bytes:
    """The body, at most `limit` bytes (413), received within `timeout` seconds (408); 503 `shutting_down` as
    soon as `abort` is set (the end of the shutdown grace period: a slow upload does not hold the server)."""
    reading = asyncio.ensure_future(_read_body(request, limit))
    waiters = {reading} | ({asyncio.ensure_future(abort.wait())} if abort is not None else set())
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waiters:
            if not task.done():
                task.cancel()
    if reading in done:
        return reading.result()
    if abort is not None and abort.is_set():
        raise ApiError(503, "shutting_down", "the server is shutting down; retry on another instance or later",
                       {"Connection": "close"})
    raise ApiError(408, "body_timeout", f"the request body did not arrive within {timeout:g} s",
                   {"Connection": "close"})


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


def parse(raw: bytes, schema: type[BaseModel]) -> Any:
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
