"""Bearer API keys: stored as SHA-256 digests, revocable, from a keys file, an environment variable or flags.

Entries, one per line of a keys file (`--api-keys-file`; UTF-8, a BOM allowed; blank lines and `#`
comments ignored), or separated by whitespace in `$SO8T_API_KEYS`:

    key_id:secret                      a key given in clear (hashed on load, never kept in memory)
    key_id:sha256=<64 hex>:chars=N     the same key given by the SHA-256 hex digest of its secret's UTF-8
                                       bytes and the secret's length in characters (N >= MIN_SECRET_CHARS)
    key_id:<either>:revoked            a revoked key: its bearer gets 403 instead of 401

A digest cannot show how long its secret was, so a digest entry states it (`chars=N`) and one without it,
or with N under the minimum, is refused with that reason. `key_entry(key_id, secret)` (or
`python -m so8t_hf.serve.auth KEY_ID`, the secret on stdin, `--new` to make one) writes such a line after
checking the secret itself; a stated length is the operator's word, not something the server can verify.

`key_id` is a name for logs and the audit DB ([A-Za-z0-9_.-], at most 64 characters). A secret has at
least `MIN_SECRET_CHARS` characters, no `:`, whitespace or control characters; any other Unicode is fine:
it is compared as the UTF-8 bytes a client sends (HTTP header bytes, which starlette hands over as
Latin-1 text). `--api-key` takes `key_id:secret` or a bare secret (key id `key-` + 8 hex digits of its
digest); a secret on the command line is visible in `ps`, so the server warns about it.

Reloading: the keys file is read at most once a second and re-parsed when its content (SHA-256 of its
bytes) changes, whatever its size and modification time say. Each line stands alone: a bad line (one that
is not UTF-8 included) is logged with `file:line` and grants nothing, the others take effect, so a revoked
or removed key stops working at the next check whatever else the file holds. A deleted file means no keys
from it (logged). Start-up is strict: any bad entry is an error that names its source and line.

Limits: the secret's SHA-256 is looked up in a dict (the digest, not the secret, is what timing could
reveal); no rate limiting per key; no key scopes.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENV_KEYS", "MIN_SECRET_CHARS", "AuthError", "KeyRecord", "KeyStore", "hash_secret", "key_entry",
           "parse_key_line"]

logger = logging.getLogger("so8t_hf.serve")

ENV_KEYS = "SO8T_API_KEYS"
MIN_SECRET_CHARS = 16
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX_RE = re.compile(r"[0-9a-f]{64}")
_CHARS_RE = re.compile(r"chars=([0-9]{1,4})")
_HOW = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(24))'"


def hash_secret(secret: str | bytes) -> str:
    """SHA-256 hex digest of an API key secret (of its UTF-8 bytes when given as text)."""
    return hashlib.sha256(secret.encode("utf-8") if isinstance(secret, str) else secret).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    digest: str
    revoked: bool = False


class AuthError(Exception):
    """400 (two Authorization headers), 401 (missing or unknown key) or 403 (revoked key); names no secret."""

    def __init__(self, status: int, code: str, message: str, key_id: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.key_id = status, code, key_id


def _check_secret(secret: str, where: str, key_id: str) -> None:
    if not secret or any(c.isspace() or not c.isprintable() for c in secret):
        raise ValueError(f"{where}: empty secret, or whitespace or control characters in the secret of key {key_id!r}")
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"{where}: the secret of key {key_id!r} has {len(secret)} characters; use at least "
                         f"{MIN_SECRET_CHARS} ({_HOW})")


def parse_key_line(line: str, where: str = "--api-key", allow_bare: bool = False) -> KeyRecord:
    """One `key_id:secret[:revoked]` / `key_id:sha256=<hex>:chars=N[:revoked]` entry (or a bare secret)."""
    parts = line.strip().split(":")
    if allow_bare and len(parts) == 1 and parts[0]:
        digest = hash_secret(parts[0])
        _check_secret(parts[0], where, f"key-{digest[:8]}")
        return KeyRecord(f"key-{digest[:8]}", digest)
    revoked = len(parts) >= 3 and parts[-1] == "revoked"
    key_id, secret, extra = parts[0], (parts[1] if len(parts) > 1 else ""), parts[2:len(parts) - revoked]
    digest_entry = secret.startswith("sha256=")
    if len(parts) < 2 or len(extra) > int(digest_entry) or (extra and not _CHARS_RE.fullmatch(extra[0])):
        raise ValueError(f"{where}: expected key_id:secret[:revoked] or key_id:sha256=<hex>:chars=N[:revoked]")
    if not _ID_RE.fullmatch(key_id):
        raise ValueError(f"{where}: key id must be 1-64 of [A-Za-z0-9_.-]")
    if digest_entry:
        digest = secret[len("sha256="):].lower()
        if not _HEX_RE.fullmatch(digest):
            raise ValueError(f"{where}: sha256= needs 64 hex digits (key {key_id!r})")
        if not extra:
            raise ValueError(f"{where}: a sha256= digest cannot show how long the secret of key {key_id!r} is: "
                             f"state it as key_id:sha256=<hex>:chars=N (N >= {MIN_SECRET_CHARS}), or make the "
                             "line with: python -m so8t_hf.serve.auth KEY_ID")
        chars = int(_CHARS_RE.fullmatch(extra[0]).group(1))
        if chars < MIN_SECRET_CHARS:
            raise ValueError(f"{where}: the secret of key {key_id!r} has {chars} characters (chars={chars}); use "
                             f"at least {MIN_SECRET_CHARS} ({_HOW})")
    else:
        _check_secret(secret, where, key_id)
        digest = hash_secret(secret)
    return KeyRecord(key_id, digest, revoked)


def key_entry(key_id: str, secret: str, revoked: bool = False) -> str:
    """A keys-file line `key_id:sha256=<hex>:chars=N` for `secret` (checked: length, characters)."""
    _check_secret(secret, "key_entry", key_id)
    line = f"{key_id}:sha256={hash_secret(secret)}:chars={len(secret)}" + (":revoked" if revoked else "")
    parse_key_line(line, "key_entry")
    return line


def _parse_lines(lines: list[str] | list[bytes], source: str, strict: bool) -> list[KeyRecord]:
    """Records of `lines` ("source:n" names each; bytes are decoded as UTF-8 line by line); a bad line raises
    when `strict`, else is logged and skipped."""
    records = []
    for n, line in enumerate(lines, 1):
        try:
            if isinstance(line, bytes):
                if not line.strip() or line.lstrip().startswith(b"#"):  # a comment need not be UTF-8
                    continue
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{source}:{n}: not UTF-8 (byte 0x{line[exc.start]:02x} at column "
                                     f"{exc.start + 1}); save the file as UTF-8") from None
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            records.append(parse_key_line(line, f"{source}:{n}"))
        except ValueError as exc:
            if strict:
                raise
            logger.error("API keys: %s; this line grants nothing until it is fixed", exc)
    return records


def _file_lines(data: bytes) -> list[bytes]:
    return (data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data).splitlines()


def _by_digest(records: list[KeyRecord]) -> dict[str, KeyRecord]:
    out: dict[str, KeyRecord] = {}
    for rec in records:  # a revocation wins over a live entry with the same secret
        old = out.get(rec.digest)
        out[rec.digest] = rec if old is None or rec.revoked else old
    return out


class KeyStore:
    """Digest -> key record, from `--api-key` entries, `$SO8T_API_KEYS` and an optional keys file (re-read live)."""

    def __init__(self, keys: list[str] | None = None, keys_file: str | os.PathLike | None = None,
                 env_keys: str | None = None, check_every: float = 1.0) -> None:
        self._static = [parse_key_line(k, f"--api-key #{i + 1}", allow_bare=True) for i, k in enumerate(keys or [])]
        self._static += _parse_lines((env_keys or "").split(), f"${ENV_KEYS} entry", strict=True)
        self._file = Path(keys_file) if keys_file else None
        self._check_every = check_every
        self._stamp: str | None = None  # SHA-256 of the file's bytes when it was last parsed
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self._file_records: list[KeyRecord] = []
        if self._file is not None:
            data = self._file.read_bytes()
            self._stamp = hashlib.sha256(data).hexdigest()
            self._file_records = _parse_lines(_file_lines(data), str(self._file), strict=True)
        self._by_digest = _by_digest(self._static + self._file_records)
        if not self._by_digest:
            raise ValueError(f"no API keys: give --api-keys-file, ${ENV_KEYS} or --api-key")

    def _maybe_reload(self) -> None:
        if self._file is None or time.monotonic() - self._checked < self._check_every:
            return
        with self._lock:
            self._checked = time.monotonic()
            try:
                data = self._file.read_bytes()
            except FileNotFoundError:
                if self._stamp is not None:
                    logger.warning("API keys file %s is gone: its keys no longer authenticate", self._file)
                self._stamp, self._file_records = None, []
                self._by_digest = _by_digest(self._static)
                return
            except OSError as exc:
                logger.error("API keys file %s cannot be read (%s): its keys no longer authenticate",
                             self._file, type(exc).__name__)
                self._stamp, self._file_records = None, []
                self._by_digest = _by_digest(self._static)
                return
            stamp = hashlib.sha256(data).hexdigest()
            if stamp == self._stamp:
                return
            records = _parse_lines(_file_lines(data), str(self._file), strict=False)
            self._stamp, self._file_records = stamp, records
            self._by_digest = _by_digest(self._static + records)
            logger.info("API keys file %s re-read: %d entries", self._file, len(records))

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, authorization: str | list[str] | None) -> KeyRecord:
        """The key record of an `Authorization: Bearer <secret>` header (or the list of such headers), or
        raise `AuthError`. A header value is taken as starlette gives it: its bytes decoded as Latin-1."""
        self._maybe_reload()
        values = [authorization] if isinstance(authorization, str) else list(authorization or [])
        if len(values) > 1:
            raise AuthError(400, "duplicate_authorization", "send exactly one Authorization header")
        if not values or not values[0]:
            raise AuthError(401, "missing_api_key", "send Authorization: Bearer <api key>")
        scheme, _, secret = values[0].strip().partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise AuthError(401, "invalid_authorization", "the Authorization header must be 'Bearer <api key>'")
        try:
            raw = secret.encode("latin-1")  # the bytes the client sent
        except UnicodeEncodeError:  # not from a socket (a test client passing text): its UTF-8 bytes
            raw = secret.encode("utf-8")
        rec = self._by_digest.get(hash_secret(raw))
        if rec is None:
            raise AuthError(401, "invalid_api_key", "unknown API key")
        if rec.revoked:
            raise AuthError(403, "revoked_api_key", "this API key has been revoked", rec.key_id)
        return rec


def main(argv: list[str] | None = None) -> int:
    """`python -m so8t_hf.serve.auth KEY_ID [--new] [--revoked]`: print a keys-file line for a secret read from
    stdin (or a new one, printed to stderr), refusing short secrets."""
    import argparse
    import secrets
    import sys

    p = argparse.ArgumentParser(prog="python -m so8t_hf.serve.auth", description=main.__doc__)
    p.add_argument("key_id")
    p.add_argument("--new", action="store_true", help="make a new random secret (printed to stderr)")
    p.add_argument("--revoked", action="store_true", help="write the line of a revoked key")
    args = p.parse_args(argv)
    secret = secrets.token_urlsafe(24) if args.new else sys.stdin.readline().rstrip("\r\n")
    try:
        line = key_entry(args.key_id, secret, args.revoked)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.new:
        print(f"secret (give it to the client; it is not stored): {secret}", file=sys.stderr)
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
