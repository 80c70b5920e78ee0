"""The /think service: final answers only, Bearer API keys, a SQLite audit log, a bounded queue.

What: `create_app` (FastAPI) over a `GenerationEngine` (model + worker threads), a `KeyStore`
and an `AuditLog`; `so8t-hf serve` / `python -m so8t_hf.serve` run it with uvicorn. Users only
ever see the `<final>` answer (`read_final`, which fails closed); operators can turn on a keyed
digest of the thinking (`thinking_hash` with an HMAC key) per request in the audit log.

Limits: needs the `serve` extra (fastapi, uvicorn); importing this package does not import them
or torch models until `create_app` is used.
"""

__all__ = ["AuditLog", "AuthError", "GenerationEngine", "KeyStore", "ServeSettings", "create_app", "hash_secret",
           "visible_final_prefix"]


def __getattr__(name: str):  # lazy: fastapi / transformers only when asked for
    if name in ("AuthError", "KeyStore", "hash_secret"):  # lazy too: `python -m so8t_hf.serve.auth` runs cleanly
        from so8t_hf.serve import auth
        return getattr(auth, name)
    if name in ("ServeSettings", "create_app"):
        from so8t_hf.serve import app
        return getattr(app, name)
    if name == "AuditLog":
        from so8t_hf.serve.audit import AuditLog
        return AuditLog
    if name in ("GenerationEngine", "visible_final_prefix"):
        from so8t_hf.serve import engine
        return getattr(engine, name)
    raise AttributeError(name)
