"""The audit log (SQLite in WAL mode) and the in-memory request metrics behind `GET /metrics`.

What: one `audit` row per API request (authenticated or not, answered or refused), written and
committed synchronously (`synchronous=FULL`) before the response, or the last streamed event,
leaves the server: request id, time, endpoint, key id, HTTP status, outcome, thinking SHA-256,
final length, token counts, finish reason, latency. The raw generation (thinking included) is
stored in `generation_text` only when the server runs with `--audit-store-thinking`; otherwise
that column is NULL and the database holds no thinking text.

Limits: one writer connection behind a lock (a few ms per row); one server process per database;
no retention policy (rotate the file offline). Metrics are per process and reset on restart.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["AuditLog", "AuditRow", "Metrics"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    request_id TEXT PRIMARY KEY,
    ts REAL NOT NULL,               -- unix time the request arrived
    ts_iso TEXT NOT NULL,           -- the same, UTC ISO 8601
    endpoint TEXT NOT NULL,
    key_id TEXT,                    -- NULL when no valid key was presented
    status INTEGER NOT NULL,        -- HTTP status
    outcome TEXT NOT NULL,          -- ok, malformed, truncated, no_final, cancelled, or an error code
    stream INTEGER NOT NULL,
    thinking_sha256 TEXT,
    final_chars INTEGER,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    finish_reason TEXT,
    latency_ms REAL NOT NULL,
    generation_text TEXT            -- raw generation, thinking included: only with --audit-store-thinking
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
"""


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
    thinking_sha256: str | None = None
    final_chars: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    generation_text: str | None = None


class AuditLog:
    """Append-only SQLite audit table; `write` commits before it returns."""

    def __init__(self, path: str | Path, store_thinking: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.store_thinking = store_thinking
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.rows_written = 0

    def write(self, row: AuditRow) -> None:
        values = asdict(row)
        if not self.store_thinking:
            values["generation_text"] = None
        values["stream"] = int(row.stream)
        values["ts_iso"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(row.ts)) + f".{int(row.ts % 1 * 1000):03d}Z"
        cols = ", ".join(values)
        marks = ", ".join(f":{k}" for k in values)
        with self._lock:
            if self._db is None:
                raise RuntimeError("audit log is closed")
            self._db.execute(f"INSERT INTO audit ({cols}) VALUES ({marks})", values)  # autocommit
            self.rows_written += 1

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.close()
                self._db = None


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

    def prometheus(self, queue_depth: int, active: int, max_queue: int, audit_rows: int) -> str:
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
        ):
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"
