"""The audit log (SQLite in WAL mode) and the in-memory request metrics behind `GET /metrics`.

What: one `audit` row per API request, written and committed (`synchronous=FULL`) before the response, or
the first byte of a stream, leaves the server: request id, time, endpoint, key id, HTTP status, outcome,
thinking digest (HMAC, only when the operator turns digests on), final length, token counts, finish
reason, latency, and `count` (1). A stream's row is committed with outcome `streaming` before its first
event and rewritten with its end (a `streaming` row is a stream whose process died). Unauthenticated
failures (no key, an unknown key, a bad or doubled Authorization header) are aggregated into one row per
(endpoint, status, outcome) and time bucket of `aggregate_seconds`, whose `count` is the number of
requests; each failure is committed into its row before the 401 leaves (it survives `kill -9`). So the
sum of `count` equals the requests. The raw generation (thinking included) is stored in `generation_text`
only with `--audit-store-thinking`; otherwise that column is NULL and the database holds no thinking.

`AuditLog.open` checks the path before anything else is loaded: it creates the file (and its folder),
sets WAL, creates or checks the table (a table of another shape is refused; a 0.2 table gains the new
columns) and commits a probe write, raising `AuditError("audit DB PATH: cause")` otherwise. A failed
write marks the log unhealthy (`/healthz` 503, requests refused) until a write or a `probe()` succeeds
again. A DB file deleted or replaced under the server is noticed at the next write or `check()` (the app
runs it every second): the log closes the old file, creates a new one at the path and counts it in
`recreated` (logged as an error, in `/metrics` and `/healthz`); rows committed before stay in the old
file only.

All DB work runs on one worker thread (`run`), never on the event loop: a locked DB delays the requests
that wait for their row, not `/healthz` or `/metrics`.

Limits: one writer connection behind a lock (a few ms per row); one server process per database;
no retention policy (rotate the file offline, then restart or let the server recreate it). Metrics are
per process and reset on restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["AUDIT_COLUMNS", "AuditError", "AuditLog", "AuditRow", "Metrics"]

logger = logging.getLogger("so8t_hf.serve")
_PROBE_BUSY_MS = 200  # a probe waits at most this long for a locked DB (health checks stay quick)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    request_id TEXT PRIMARY KEY,    -- agg-... for an aggregate of unauthenticated failures
    ts REAL NOT NULL,               -- unix time the request (or the aggregate's first request) arrived
    ts_iso TEXT NOT NULL,           -- the same, UTC ISO 8601
    endpoint TEXT NOT NULL,
    key_id TEXT,                    -- NULL when no valid key was presented
    status INTEGER NOT NULL,        -- HTTP status (for a stream: 200, or the status of its error event)
    outcome TEXT NOT NULL,          -- ok, malformed, truncated, no_final, withheld, cancelled, or an error code
    stream INTEGER NOT NULL,
    thinking_hmac TEXT,             -- HMAC-SHA256 of the thinking under the server's key; NULL when digests are off
    final_chars INTEGER,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,      -- every generated token, thinking included
    finish_reason TEXT,
    latency_ms REAL NOT NULL,       -- for an aggregate: the mean
    generation_text TEXT,           -- raw generation, thinking included: only with --audit-store-thinking
    count INTEGER NOT NULL DEFAULT 1,
    reason TEXT                     -- why the final was not shown: a thinking.grammar.REASONS code; NULL when shown
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
CREATE TABLE IF NOT EXISTS audit_probe (id INTEGER PRIMARY KEY CHECK (id = 1), ts REAL NOT NULL);
"""
_ADDED = {"thinking_hmac": "TEXT", "count": "INTEGER NOT NULL DEFAULT 1", "reason": "TEXT"}  # columns older tables lack


class AuditError(RuntimeError):
    """The audit DB cannot be used; the message names the path and the cause, on one line."""


@dataclass
class AuditRow:
    request_id: str
    ts: float
    endpoint: str
    status: int
    outcome: str
    latency_ms: float
    key_id: str | None = None
    stream: bool = False
    thinking_hmac: str | None = None
    final_chars: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    generation_text: str | None = None
    count: int = 1
    reason: str | None = None


AUDIT_COLUMNS = (*AuditRow.__dataclass_fields__, "ts_iso")


def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _log_unawaited_failure(job: asyncio.Future) -> None:
    if not job.cancelled() and job.exception() is not None:  # retrieved here, so it is never "never retrieved"
        logger.error("audit write failed: %s", _cause(job.exception()))


class AuditLog:
    """Append-only SQLite audit table; `write` commits before it returns; `run` calls it on the DB thread."""

    def __init__(self, path: str | Path, store_thinking: bool = False, busy_timeout: float = 5.0,
                 aggregate_seconds: float = 10.0) -> None:
        self.path = Path(path)
        self.store_thinking = store_thinking
        self.busy_timeout = busy_timeout
        self.aggregate_seconds = aggregate_seconds
        self.rows_written = 0
        self.healthy = True
        self.last_error = ""
        self.recreated = 0  # times the DB file was found deleted or replaced and created anew
        self.recreated_at = ""
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._file_id: tuple[int, int] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="so8t-audit")
        self._connect()

    def _connect(self) -> None:
        """Open (creating it if needed) and check the DB at `self.path`, or raise `AuditError`."""
        try:
            if self.path.is_dir():
                raise IsADirectoryError("it is a directory")
            for parent in self.path.parents:
                if parent.exists() and not parent.is_dir():
                    raise NotADirectoryError(f"{parent} is a file, not a folder")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                       timeout=self.busy_timeout)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL journaling here (got {mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            self._check_table()
            self._db.executescript(_SCHEMA)
            self._probe()
            st = os.stat(self.path)
            self._file_id = (st.st_dev, st.st_ino)
        except (AuditError, OSError, sqlite3.Error) as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            if isinstance(exc, AuditError):
                raise
            cause = _cause(exc)
            if "unable to open" in cause:  # SQLite does not say why: ask the OS
                try:
                    with open(self.path, "ab"):
                        pass
                except OSError as os_exc:
                    cause += f" ({os_exc.strerror or type(os_exc).__name__})"
            raise AuditError(f"audit DB {self.path}: {cause}") from None

    @classmethod
    def open(cls, path: str | Path, store_thinking: bool = False, busy_timeout: float = 5.0,
             aggregate_seconds: float = 10.0) -> AuditLog:
        """`AuditLog(...)`: open and check the DB, or raise `AuditError` naming the path and the cause."""
        return cls(path, store_thinking, busy_timeout, aggregate_seconds)

    async def run(self, fn, *args):
        """`fn(*args)` on the audit thread (writes stay in order; the event loop never waits on SQLite).

        Shielded: a caller cancelled while its write waits in the queue (a client that disconnected) still gets its
        row written; a failure nobody awaits any more is logged."""
        job = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(_log_unawaited_failure)
            raise

    def _check_table(self) -> None:
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(audit)")}
        if not cols:
            return
        missing = set(AUDIT_COLUMNS) - cols
        if missing - set(_ADDED):
            raise AuditError(f"audit DB {self.path}: its table 'audit' is not an so8t_hf audit table (no columns "
                             f"{sorted(missing - set(_ADDED))}); use another file")
        for name in sorted(missing):
            self._db.execute(f"ALTER TABLE audit ADD COLUMN {name} {_ADDED[name]}")

    def _probe(self) -> None:
        self._db.execute("INSERT OR REPLACE INTO audit_probe (id, ts) VALUES (1, ?)", (time.time(),))

    def _failed(self, exc: BaseException) -> None:
        self.healthy, self.last_error = False, type(exc).__name__

    def _ensure_file(self) -> None:
        """Under the lock: if the file at `path` is gone or another one, close the old and create it anew (a
        failed re-creation is retried at the next call)."""
        if self._closed:
            raise RuntimeError("audit log is closed")
        if self._db is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._file_id:
                    return
            except FileNotFoundError:
                pass
            logger.error("audit DB %s was deleted or replaced under the server: creating it anew (rows committed "
                         "before are only in the old file)", self.path)
            old, self._db = self._db, None
            try:
                old.close()  # checkpoints into the old file and removes its -wal / -shm
            except sqlite3.Error:
                pass
        self._connect()
        self.recreated += 1
        self.recreated_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def probe(self) -> bool:
        """Commit a probe write (outside the audit table) waiting at most 0.2 s for a lock; True and healthy
        again when it succeeds."""
        with self._lock:
            try:
                self._ensure_file()
                self._db.execute(f"PRAGMA busy_timeout={_PROBE_BUSY_MS}")
                try:
                    self._probe()
                finally:
                    self._db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
                return False
            self.healthy = True
            return True

    def check(self) -> bool:
        """The periodic check: notice a deleted or replaced file (recreate it), probe while unhealthy."""
        if not self.healthy:
            return self.probe()
        with self._lock:
            try:
                self._ensure_file()
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
                return False
        return True

    @staticmethod
    def _values(row: AuditRow, store_thinking: bool) -> dict:
        values = asdict(row)
        if not store_thinking:
            values["generation_text"] = None
        values["stream"] = int(row.stream)
        values["ts_iso"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(row.ts)) + f".{int(row.ts % 1 * 1000):03d}Z"
        return values

    def _execute(self, statements) -> list[int]:
        """Run (sql, params) statements in one committed transaction (under the lock); their row counts."""
        with self._lock:
            try:
                self._ensure_file()
                if len(statements) == 1:
                    return [self._db.execute(*statements[0]).rowcount]  # autocommit
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    counts = [self._db.execute(*st).rowcount for st in statements]
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                return counts
            except Exception as exc:
                self._failed(exc)
                raise

    def write(self, row: AuditRow, update: bool = False) -> None:
        """Commit `row`; `update=True` replaces the row this request committed before (a stream's first row)."""
        values = self._values(row, self.store_thinking)
        cols = ", ".join(values)
        marks = ", ".join(f":{k}" for k in values)
        verb = "INSERT OR REPLACE" if update else "INSERT"
        self._execute([(f"{verb} INTO audit ({cols}) VALUES ({marks})", values)])
        self.healthy = True
        self.rows_written += 0 if update else 1

    def count_unauthenticated(self, endpoint: str, status: int, outcome: str, ts: float, latency_ms: float) -> None:
        """Commit one unauthenticated failure into its aggregate row (endpoint, status, outcome, time bucket)."""
        bucket = int(ts // self.aggregate_seconds) if self.aggregate_seconds > 0 else int(ts)
        rid = f"agg-{bucket}-{status}-{outcome}-{endpoint}"
        values = self._values(AuditRow(rid, ts, endpoint, status, outcome, latency_ms), False)
        cols = ", ".join(values)
        marks = ", ".join(f":{k}" for k in values)
        updated, *_ = self._execute([
            ("UPDATE audit SET latency_ms = (latency_ms * count + :latency_ms) / (count + 1), count = count + 1 "
             "WHERE request_id = :request_id", values),
            (f"INSERT OR IGNORE INTO audit ({cols}) VALUES ({marks})", values),
        ])
        self.healthy = True
        self.rows_written += 0 if updated else 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._db is not None:
                try:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                finally:
                    self._db.close()
                    self._db = None
        self._executor.shutdown(wait=False)


class Metrics:
    """Request counts by endpoint and outcome, a latency summary over the last 2048 requests, gauges."""

    QUANTILES = (0.5, 0.9, 0.99)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.status: Counter[int] = Counter()
        self._latencies: deque[float] = deque(maxlen=2048)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.in_flight = 0

    def record(self, endpoint: str, outcome: str, status: int, latency_s: float,
               prompt_tokens: int | None = None, completion_tokens: int | None = None) -> None:
        with self._lock:
            self.counts[(endpoint, outcome)] += 1
            self.status[status] += 1
            self._latencies.append(latency_s)
            self.latency_sum += latency_s
            self.latency_count += 1
            self.prompt_tokens += prompt_tokens or 0
            self.completion_tokens += completion_tokens or 0

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def quantiles(self) -> dict[float, float]:
        with self._lock:
            lat = sorted(self._latencies)
        if not lat:
            return {q: 0.0 for q in self.QUANTILES}
        return {q: lat[min(len(lat) - 1, int(q * len(lat)))] for q in self.QUANTILES}

    def prometheus(self, queue_depth: int, active: int, max_queue: int, audit_rows: int, audit_ok: bool = True,
                   audit_recreated: int = 0) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        out = ["# HELP so8t_requests_total API requests by endpoint and outcome.",
               "# TYPE so8t_requests_total counter"]
        with self._lock:
            counts, status = dict(self.counts), dict(self.status)
            lsum, lcount, ptok, ctok, inflight = (self.latency_sum, self.latency_count, self.prompt_tokens,
                                                  self.completion_tokens, self.in_flight)
        for (endpoint, outcome), n in sorted(counts.items()):
            out.append(f'so8t_requests_total{{endpoint="{endpoint}",outcome="{outcome}"}} {n}')
        out += ["# HELP so8t_responses_total API responses by HTTP status.", "# TYPE so8t_responses_total counter"]
        out += [f'so8t_responses_total{{status="{s}"}} {n}' for s, n in sorted(status.items())]
        out += ["# HELP so8t_request_latency_seconds Request latency (quantiles over the last 2048).",
                "# TYPE so8t_request_latency_seconds summary"]
        out += [f'so8t_request_latency_seconds{{quantile="{q}"}} {v:.6f}' for q, v in self.quantiles().items()]
        out += [f"so8t_request_latency_seconds_sum {lsum:.6f}", f"so8t_request_latency_seconds_count {lcount}"]
        for name, kind, value, help_ in (
            ("so8t_queue_depth", "gauge", queue_depth, "Jobs waiting for a generation worker."),
            ("so8t_queue_capacity", "gauge", max_queue, "Maximum waiting jobs before 503."),
            ("so8t_generating", "gauge", active, "Jobs being generated now."),
            ("so8t_in_flight_requests", "gauge", inflight, "API requests being handled now."),
            ("so8t_prompt_tokens_total", "counter", ptok, "Prompt tokens of generated requests."),
            ("so8t_completion_tokens_total", "counter", ctok, "Generated tokens."),
            ("so8t_audit_rows_total", "counter", audit_rows, "Audit rows committed by this process."),
            ("so8t_audit_ok", "gauge", int(audit_ok), "1 while audit writes succeed."),
            ("so8t_audit_db_recreated_total", "counter", audit_recreated,
             "Times the audit DB file was found deleted or replaced and created anew."),
        ):
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"
