"""`so8t-hf serve` / `python -m so8t_hf.serve`: run the /think service with uvicorn.

What: loads the model, then serves `create_app` on one pre-bound socket (so `--port 0` picks a
free port, printed as `listening on http://HOST:PORT`). SIGTERM / SIGINT use uvicorn's graceful
shutdown: no new connections, in-flight requests (streams included) finish and are audited, the
workers stop, the audit DB is checkpointed and closed, and the process exits 0.

Limits: one process (uvicorn `workers` > 1 would load the model once per process and need one
audit DB each); TLS is left to a reverse proxy.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys

from so8t_hf.inference.loader import DTYPE_NAMES

__all__ = ["add_serve_subparser", "build_parser", "main", "run_serve"]

logger = logging.getLogger("so8t_hf.serve")

DESCRIPTION = "Serve a thinking model: final answers only, Bearer API keys, SQLite audit log."
EPILOG = """\
endpoints:
  POST /think                 {"messages": [{"role", "content"}...]} or {"query": "..."}, with optional
                              max_new_tokens, temperature (0 = greedy), top_p, stream (SSE).
                              -> {"final", "thinking_sha256", "usage", "request_id", "finish_reason", "outcome"}
                              ("final" is "" when the generation has no final answer: outcome no_final)
  POST /v1/chat/completions   OpenAI-compatible (content = the final answer only; stream supported)
  GET  /healthz, GET /metrics (Prometheus text; no key needed)

API keys (send "Authorization: Bearer <secret>"): --api-key takes key_id:secret or a bare secret
(repeatable). --api-keys-file holds one key per line ('#' comments and blank lines ignored):
  key_id:secret                  a key in clear (hashed with SHA-256 on load)
  key_id:sha256=<64 hex digits>  the same key by the SHA-256 of its secret (printf %s SECRET | sha256sum)
  key_id:<secret or sha256=...>:revoked
                                 a revoked key: 403 instead of 401
The file is re-read when it changes (within a second), so keys can be added or revoked live.
Key ids are 1-64 of [A-Za-z0-9_.-]; secrets contain no ':' or whitespace.

limits give 4xx JSON errors {"error": {"type", "message", "request_id"}}: 413 body too large,
400 invalid JSON, 422 invalid request / too many messages / too many input tokens /
max_new_tokens over the cap; 503 with Retry-After when the queue is full.
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
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="an API key, key_id:secret or a bare secret (repeatable)")
    p.add_argument("--api-keys-file", metavar="FILE", help="API keys file (format below)")
    p.add_argument("--audit-db", required=True, metavar="PATH", help="SQLite audit database (created if missing)")
    p.add_argument("--audit-store-thinking", action="store_true",
                   help="also store the raw generation, thinking included, in the audit DB (off by default)")
    p.add_argument("--max-queue", type=_positive, default=16, help="requests waiting for generation before 503 (16)")
    p.add_argument("--max-new-tokens-cap", type=_positive, default=512, help="largest max_new_tokens accepted (512)")
    p.add_argument("--default-max-new-tokens", type=_positive, default=256,
                   help="max_new_tokens when a request gives none (256, capped by the cap)")
    p.add_argument("--max-body-bytes", type=_positive, default=65536, help="largest request body (65536)")
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
                   help="seconds to wait for in-flight requests on SIGTERM before cancelling them (120)")
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


def run_serve(args: argparse.Namespace) -> int:
    """Load, bind, serve until SIGTERM/SIGINT; returns the exit status."""
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(args.log_level.upper())
    import uvicorn

    from so8t_hf.inference.loader import load_for_inference
    from so8t_hf.serve.app import ServeSettings, create_app
    from so8t_hf.serve.audit import AuditLog
    from so8t_hf.serve.auth import KeyStore
    from so8t_hf.serve.engine import GenerationEngine
    from so8t_hf.thinking import get_tag_preset

    try:
        keys = KeyStore(args.api_key, args.api_keys_file)
        tags = get_tag_preset(args.tags)
    except (OSError, ValueError) as exc:
        print(f"so8t-hf serve: error: {exc}", file=sys.stderr)
        return 2
    settings = ServeSettings(args.max_new_tokens_cap, args.default_max_new_tokens, args.max_body_bytes,
                             args.max_messages, args.max_input_tokens)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    model, tokenizer = load_for_inference(args.model, args.device, args.dtype, merge_rotations=not args.no_merge_rotations)
    name = args.model_name or args.model.rstrip("/").split("/")[-1]
    engine = GenerationEngine(model, tokenizer, tags, args.max_queue, args.workers, name)
    audit = AuditLog(args.audit_db, store_thinking=args.audit_store_thinking)
    app = create_app(engine, keys, audit, settings)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        logger.warning("binding to %s, not loopback: put a TLS-terminating proxy in front (keys travel in headers)",
                       args.host)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=args.log_level, access_log=not args.no_access_log,
                            timeout_graceful_shutdown=args.graceful_timeout, lifespan="on")
    server = uvicorn.Server(config)
    logger.info("model %s loaded (%d API keys, audit %s%s); listening on http://%s:%d", name, len(keys),
                args.audit_db, ", storing thinking" if args.audit_store_thinking else "", host, port)
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal it handled: make that a no-op
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    logger.info("stopped")
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    return run_serve(build_parser().parse_args(argv))

