"""`so8t-hf serve` / `python -m so8t_hf.serve`: run the /think service with uvicorn.

What: checks the keys, the digest key and the audit DB first (each problem is one line naming its
source, exit 2, before any model is loaded), then loads the model and serves `create_app` on one
pre-bound socket (so `--port 0` picks a free port, printed as `listening on http://HOST:PORT`).
SIGTERM / SIGINT: no new connections; in-flight requests (streams included) get `--graceful-timeout`
seconds to finish, then every one still running ends as a JSON 503 `shutting_down` (or an SSE
`error` event) with its request id and an audit row with that status (a request still uploading its
body included); the workers stop, the audit DB is checkpointed and closed, and the process exits 0.
Headers over `--max-header-bytes` get 431 with a JSON error: from the app (counted in the aggregate
audit rows) when the head arrived whole, from uvicorn's h11 protocol (logged; uvicorn's own answer
would be a plain 400) when it is still arriving past the limit.

Limits: one process (uvicorn `workers` > 1 would load the model once per process and need one
audit DB each); TLS is left to a reverse proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from so8t_hf.inference.loader import DTYPE_NAMES

__all__ = ["add_serve_subparser", "build_parser", "main", "run_serve"]

logger = logging.getLogger("so8t_hf.serve")

DIGEST_KEY_ENV = "SO8T_THINKING_DIGEST_KEY"
DESCRIPTION = "Serve a thinking model: final answers only, Bearer API keys, SQLite audit log."
EPILOG = """\
endpoints:
  POST /think                 {"messages": [{"role", "content"}...]} or {"query": "..."}, with optional
                              max_new_tokens, temperature (0 = greedy; below 0.001 greedy too), top_p,
                              stream (SSE). -> {"final", "usage", "request_id", "finish_reason", "outcome"}
                              ("final" is "" when the generation has no final answer, outcome no_final, or
                              when it is withheld, outcome withheld: fail closed, see README)
                              defaults: temperature 0 (greedy), top_p 1, max_new_tokens --default-max-new-tokens
  POST /v1/chat/completions   OpenAI-compatible (content = the final answer only; stream supported;
                              finish_reason content_filter when the final is withheld)
                              defaults as OpenAI's: temperature 1 (sampling: send "temperature": 0 for
                              greedy), top_p 1; max_tokens / max_completion_tokens --default-max-new-tokens
  GET  /v1/models             OpenAI's model list: {"object": "list", "data": [{"id": --model-name, ...}]}
  GET  /healthz (503 while the audit DB fails or the workers stopped; API requests then get 503
                unavailable with Retry-After), GET /metrics (Prometheus text)
Types are strict: "stream": "yes", "max_new_tokens": "8" or true, "temperature": "0.5" are 422.

API keys (send "Authorization: Bearer <secret>"; secrets of at least 16 characters, UTF-8 welcome):
put them in --api-keys-file or in $SO8T_API_KEYS (entries separated by whitespace), one entry each:
  key_id:secret                  a key in clear (hashed with SHA-256 on load)
  key_id:sha256=<64 hex digits>:chars=N
                                 the same key by the SHA-256 of its secret and the secret's length N (at
                                 least 16): python -m so8t_hf.serve.auth KEY_ID [--new] writes this line
  key_id:<secret or sha256=...>:revoked
                                 a revoked key: 403 instead of 401
The file (UTF-8, a BOM allowed) is re-read when its content changes (checked every second): a bad line,
one that is not UTF-8 included, is logged with file:line and grants nothing, a revoked or removed key
stops working, a deleted file removes its keys.
--api-key KEY also works but puts the secret in the process list (warned).

Thinking digests (off by default): --thinking-digest audit stores an HMAC-SHA256 of the thinking in the
audit DB, --thinking-digest response also returns it as "thinking_hmac"; the key comes from
--thinking-digest-key-file or $SO8T_THINKING_DIGEST_KEY (at least 32 bytes).

limits give 4xx JSON errors {"error": {"type", "message", "request_id"}}: 413 body too large,
408 body too slow, 431 headers over --max-header-bytes, 400 invalid JSON or two Authorization headers,
422 invalid request / too many messages / too many input tokens / max_new_tokens over the cap / role,
special or tag tokens in the content; 503 with Retry-After when the queue is full.
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="saved model directory (with tokenizer; remote code is trusted)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default 8000)")
    p.add_argument("--api-keys-file", metavar="FILE", help="API keys file (format below); or set $SO8T_API_KEYS")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="an API key, key_id:secret or a bare secret (repeatable; visible in ps: prefer the file)")
    p.add_argument("--audit-db", required=True, metavar="PATH", help="SQLite audit database (created if missing)")
    p.add_argument("--audit-store-thinking", action="store_true",
                   help="also store the raw generation, thinking included, in the audit DB (off by default)")
    p.add_argument("--audit-busy-timeout", type=float, default=5.0,
                   help="seconds an audit write waits for a locked DB before the request fails (5)")
    p.add_argument("--audit-aggregate-seconds", type=float, default=10.0,
                   help="time bucket of the aggregate rows of unauthenticated failures (each failure is committed "
                        "into its bucket's row before the 401; 10)")
    p.add_argument("--thinking-digest", default="off", choices=["off", "audit", "response"],
                   help="HMAC of the thinking: off (default), in the audit DB, or also in responses")
    p.add_argument("--thinking-digest-key-file", metavar="FILE",
                   help=f"secret key of the thinking HMAC (or ${DIGEST_KEY_ENV})")
    p.add_argument("--usage-counts-thinking", action="store_true",
                   help="usage.completion_tokens counts thinking tokens too (reveals the thinking's length)")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds to receive a request body (30)")
    p.add_argument("--max-queue", type=_positive, default=16, help="requests waiting for generation before 503 (16)")
    p.add_argument("--max-new-tokens-cap", type=_positive, default=512, help="largest max_new_tokens accepted (512)")
    p.add_argument("--default-max-new-tokens", type=_positive, default=256,
                   help="max_new_tokens when a request gives none (256, capped by the cap)")
    p.add_argument("--max-body-bytes", type=_positive, default=65536, help="largest request body (65536)")
    p.add_argument("--max-header-bytes", type=_positive, default=16384,
                   help="largest request line + headers; more gets 431 (16384)")
    p.add_argument("--max-messages", type=_positive, default=32, help="most messages per request (32)")
    p.add_argument("--max-input-tokens", type=_positive, default=2048, help="most prompt tokens per request (2048)")
    p.add_argument("--workers", type=_positive, default=1, help="generation threads sharing the model (1)")
    p.add_argument("--torch-threads", type=_positive, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 is fastest for tiny models on CPU)")
    p.add_argument("--tags", default="default", help="thinking tag preset: default or reasoning4")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (auto)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                   help="weights dtype; auto = bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--no-merge-rotations", action="store_true",
                   help="serve the SO8T model as is instead of burning its SO(8) rotations into o_proj (same logits)")
    p.add_argument("--model-name", default=None, help="model name reported by the OpenAI route (the directory name)")
    p.add_argument("--graceful-timeout", type=float, default=120.0,
                   help="seconds in-flight requests get on SIGTERM before they end with 503 (120)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", action="store_true", help="turn off uvicorn's access log")


def add_serve_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `serve` to an argparse subparsers object; the parsed args run with `args.func(args)`."""
    p = subparsers.add_parser("serve", help=DESCRIPTION, description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run_serve)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m so8t_hf.serve", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return p


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY only then
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _digest_key(args: argparse.Namespace) -> bytes | None:
    if args.thinking_digest == "off":
        return None
    if args.thinking_digest_key_file:
        with open(args.thinking_digest_key_file, "rb") as fh:
            key = fh.read().strip()
        where = args.thinking_digest_key_file
    else:
        key, where = os.environ.get(DIGEST_KEY_ENV, "").strip().encode("utf-8"), f"${DIGEST_KEY_ENV}"
    if len(key) < 32:
        raise ValueError(f"--thinking-digest {args.thinking_digest} needs a secret key of at least 32 bytes in "
                         f"--thinking-digest-key-file or ${DIGEST_KEY_ENV} ({where}: {len(key)} bytes)")
    return key


def _protocol_class():
    """uvicorn's h11 protocol answering an oversized head with 431 and a JSON error instead of a plain 400."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _H11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._hint, next_event = 400, self.conn.next_event

            def tracked():  # remember h11's status hint (431 for a head over the limit) for send_400_response
                try:
                    return next_event()
                except h11.RemoteProtocolError as exc:
                    self._hint = exc.error_status_hint
                    raise

            self.conn.next_event = tracked

        def send_400_response(self, msg: str) -> None:
            if self._hint != 431:
                return super().send_400_response(msg)
            logger.warning("431: request headers over --max-header-bytes from %s", (self.client or ("?",))[0])
            body = b'{"error": {"type": "headers_too_large", "message": "the request headers are too large"}}'
            for event in (h11.Response(status_code=431, reason=b"Request Header Fields Too Large", headers=[
                    (b"content-type", b"application/json"), (b"connection", b"close")]),
                    h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return _H11Protocol


def _server_class():
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's graceful shutdown, with our own deadline: when `grace` seconds have passed, the app's drain
        answers what is still in flight (503 / SSE error) before uvicorn would cancel it (a plain-text 500)."""

        def __init__(self, config, drain, grace: float) -> None:
            super().__init__(config)
            self._drain, self._grace = drain, grace

        async def shutdown(self, sockets=None) -> None:
            timer = asyncio.get_running_loop().call_later(self._grace, self._drain)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return _Server


def run_serve(args: argparse.Namespace) -> int:
    """Check keys and audit DB, load, bind, serve until SIGTERM/SIGINT; returns the exit status."""
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(args.log_level.upper())
    import uvicorn

    from so8t_hf.serve.app import ServeSettings, create_app
    from so8t_hf.serve.audit import AuditError, AuditLog
    from so8t_hf.serve.auth import ENV_KEYS, KeyStore
    from so8t_hf.thinking import get_tag_preset

    try:
        keys = KeyStore(args.api_key, args.api_keys_file, os.environ.get(ENV_KEYS))
        tags = get_tag_preset(args.tags)
        digest_key = _digest_key(args)
        audit = AuditLog.open(args.audit_db, args.audit_store_thinking, args.audit_busy_timeout,
                              args.audit_aggregate_seconds)
    except (OSError, ValueError, AuditError) as exc:
        print(f"so8t-hf serve: error: {exc}", file=sys.stderr)
        return 2
    if any("sha256=" not in k for k in args.api_key):
        logger.warning("--api-key puts secrets on the command line, where other users see them (ps, /proc/PID/"
                       "cmdline): use --api-keys-file or $%s", ENV_KEYS)
    settings = ServeSettings(args.max_new_tokens_cap, args.default_max_new_tokens, args.max_body_bytes,
                             args.max_messages, args.max_input_tokens, args.body_timeout, args.thinking_digest,
                             args.usage_counts_thinking, args.max_header_bytes)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    from so8t_hf.inference.loader import load_for_inference
    from so8t_hf.serve.engine import GenerationEngine

    model, tokenizer = load_for_inference(args.model, args.device, args.dtype, merge_rotations=not args.no_merge_rotations)
    name = args.model_name or args.model.rstrip("/").split("/")[-1]
    engine = GenerationEngine(model, tokenizer, tags, args.max_queue, args.workers, name, digest_key)
    app = create_app(engine, keys, audit, settings)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        logger.warning("binding to %s, not loopback: put a TLS-terminating proxy in front (keys travel in headers)",
                       args.host)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=args.log_level, access_log=not args.no_access_log,
                            timeout_graceful_shutdown=args.graceful_timeout + 30, lifespan="on",
                            http=_protocol_class(), h11_max_incomplete_event_size=args.max_header_bytes)
    server = _server_class()(config, app.state.drain, args.graceful_timeout)
    logger.info("model %s loaded (%d API keys, audit %s%s, thinking digest %s); listening on http://%s:%d", name,
                len(keys), args.audit_db, ", storing thinking" if args.audit_store_thinking else "",
                args.thinking_digest, host, port)
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal it handled: make that a no-op
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    logger.info("stopped")
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    return run_serve(build_parser().parse_args(argv))

