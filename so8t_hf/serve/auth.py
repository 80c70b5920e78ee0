"""Bearer API keys: stored as SHA-256 digests, revocable, loaded from flags or a keys file.

Keys file (`--api-keys-file`), one key per line; blank lines and `#` comments are ignored:

    key_id:secret              a key given in clear (hashed on load, never kept in memory)
    key_id:sha256=<64 hex>     the same key given by the SHA-256 hex digest of its secret
    key_id:<either>:revoked    a revoked key: its bearer gets 403 instead of 401

`key_id` is a name for logs and the audit DB ([A-Za-z0-9_.-], at most 64 characters); secrets
contain no `:` or whitespace. `--api-key` takes `key_id:secret` or a bare secret (its key id is
then `key-` + the first 8 hex digits of its digest). The file is re-read when its modification
time changes (checked at most once a second), so revoking a key needs no restart.

Limits: the secret's SHA-256 is looked up in a dict (the digest, not the secret, is what timing
could reveal); no rate limiting per key; no key scopes.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AuthError", "KeyRecord", "KeyStore", "hash_secret", "parse_key_line"]

_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX_RE = re.compile(r"[0-9a-f]{64}")


def hash_secret(secret: str) -> str:
    """SHA-256 hex digest of an API key secret."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    digest: str
    revoked: bool = False


class AuthError(Exception):
    """401 (missing or unknown key) or 403 (revoked key); the message names no secret."""

    def __init__(self, status: int, code: str, message: str, key_id: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.key_id = status, code, key_id


def parse_key_line(line: str, where: str = "--api-key", allow_bare: bool = False) -> KeyRecord:
    """One `key_id:secret[:revoked]` / `key_id:sha256=<hex>[:revoked]` entry (or a bare secret)."""
    parts = line.strip().split(":")
    if allow_bare and len(parts) == 1 and parts[0]:
        digest = hash_secret(parts[0])
        return KeyRecord(f"key-{digest[:8]}", digest)
    revoked = len(parts) == 3 and parts[2] == "revoked"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not revoked):
        raise ValueError(f"{where}: expected key_id:secret[:revoked] or key_id:sha256=<hex>[:revoked]")
    key_id, secret = parts[0], parts[1]
    if not _ID_RE.fullmatch(key_id):
        raise ValueError(f"{where}: key id must be 1-64 of [A-Za-z0-9_.-]")
    if not secret or any(c.isspace() for c in secret):
        raise ValueError(f"{where}: empty secret or whitespace in the secret of key {key_id!r}")
    if secret.startswith("sha256="):
        digest = secret[len("sha256="):].lower()
        if not _HEX_RE.fullmatch(digest):
            raise ValueError(f"{where}: sha256= needs 64 hex digits (key {key_id!r})")
    else:
        digest = hash_secret(secret)
    return KeyRecord(key_id, digest, revoked)


def _parse_file(path: Path) -> list[KeyRecord]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            records.append(parse_key_line(line, f"{path}:{n}"))
    return records


class KeyStore:
    """Digest -> key record, from `--api-key` entries and an optional keys file (hot re-read)."""

    def __init__(self, keys: list[str] | None = None, keys_file: str | os.PathLike | None = None) -> None:
        self._static = [parse_key_line(k, allow_bare=True) for k in keys or []]
        self._file = Path(keys_file) if keys_file else None
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._by_digest: dict[str, KeyRecord] = {}
        self._load()
        if not self._by_digest:
            raise ValueError("no API keys: give --api-key or a non-empty --api-keys-file")

    def _load(self) -> None:
        records = list(self._static)
        if self._file is not None:
            self._mtime = self._file.stat().st_mtime
            records += _parse_file(self._file)
        by_digest: dict[str, KeyRecord] = {}
        for rec in records:  # a revocation wins over a live entry with the same secret
            old = by_digest.get(rec.digest)
            by_digest[rec.digest] = rec if old is None or rec.revoked else old
        self._by_digest = by_digest

    def _maybe_reload(self) -> None:
        if self._file is None or time.monotonic() - self._checked < 1.0:
            return
        with self._lock:
            self._checked = time.monotonic()
            try:
                if self._file.stat().st_mtime != self._mtime:
                    self._load()
            except (OSError, ValueError):  # keep the last good keys; a broken file must not open the door
                pass

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, authorization: str | None) -> KeyRecord:
        """The key record of an `Authorization: Bearer <secret>` header, or raise `AuthError`."""
        self._maybe_reload()
        if not authorization:
            raise AuthError(401, "missing_api_key", "send Authorization: Bearer <api key>")
        scheme, _, secret = authorization.strip().partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise AuthError(401, "invalid_authorization", "the Authorization header must be 'Bearer <api key>'")
        rec = self._by_digest.get(hash_secret(secret))
        if rec is None:
            raise AuthError(401, "invalid_api_key", "unknown API key")
        if rec.revoked:
            raise AuthError(403, "revoked_api_key", "this API key has been revoked", rec.key_id)
        return rec
