"""Durable jobs: every update request, its state and its event history, in SQLite (WAL).

A job is QUEUED, then RUNNING, then ends LIVE, FAILED or CANCELLED. Events are appended with a
per-job sequence number, so a watcher that reconnects resumes where it left off. On start-up,
jobs found RUNNING were interrupted by a crash: they go back to QUEUED and are retried from the
beginning (training is deterministic and a half-published version is never listed), with their
attempt count kept.
"""

import json
import sqlite3
import threading
import time
import uuid
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from memupdate.database import check_database, connect
from memupdate.service.metrics import JOB_TRANSITIONS

QUEUED, RUNNING, LIVE, FAILED, CANCELLED = "QUEUED", "RUNNING", "LIVE", "FAILED", "CANCELLED"
ENDED = (LIVE, FAILED, CANCELLED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kb TEXT NOT NULL,
    state TEXT NOT NULL,
    phase TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT '',
    request TEXT NOT NULL,
    result TEXT NOT NULL DEFAULT '{}',
    idempotency_key TEXT UNIQUE,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    at REAL NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


class JobStoreError(RuntimeError):
    """The job database cannot be opened or used; the message says what to do."""


@dataclass
class JobRecord:
    id: str
    kb: str
    state: str
    phase: str
    message: str
    request: dict
    result: dict
    idempotency_key: str | None
    cancel_requested: bool
    attempts: int
    created_at: float
    updated_at: float


@dataclass
class Event:
    job_id: str
    seq: int
    kind: str
    at: float
    data: dict


class JobStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.changed = threading.Condition()  # notified on every new event
        check_database(self.path, SCHEMA, "job database", JobStoreError)

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path, timeout_s=10)

    def _query(self, sql: str, args=()) -> list[tuple]:
        with closing(self._connect()) as db:
            return db.execute(sql, args).fetchall()

    # --- jobs ---------------------------------------------------------------------------
    def create(
        self, kb: str, request: dict, idempotency_key: str | None, max_queued: int
    ) -> tuple[JobRecord, bool]:
        """(job, created). An existing idempotency key returns its job, created=False.
        Raises OverflowError when `max_queued` jobs are already waiting."""
        now = time.time()
        job_id = uuid.uuid4().hex[:16]
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                if idempotency_key:
                    row = db.execute(
                        "SELECT id FROM jobs WHERE idempotency_key=?", (idempotency_key,)
                    ).fetchone()
                    if row:
                        db.execute("COMMIT")
                        return self.get(row[0]), False
                queued = db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE state=?", (QUEUED,)
                ).fetchone()[0]
                if queued >= max_queued:
                    raise OverflowError(f"{queued} jobs are already queued (limit {max_queued})")
                db.execute(
                    "INSERT INTO jobs (id, kb, state, request, idempotency_key, created_at, "
                    "updated_at) VALUES (?,?,?,?,?,?,?)",
                    (job_id, kb, QUEUED, json.dumps(request), idempotency_key or None, now, now),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        self.add_event(job_id, "queued", {})
        JOB_TRANSITIONS.labels(QUEUED).inc()
        return self.get(job_id), True

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE id=?", (job_id,))
        return self._job(rows[0]) if rows else None

    def list_jobs(
        self, kb: str = "", state: str = "", limit: int = 50, after: tuple[float, str] | None = None
    ) -> list[JobRecord]:
        """Newest first; `after` is the (created_at, id) of the last job of the previous page."""
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if kb:
            sql, args = sql + " AND kb=?", [*args, kb]
        if state:
            sql, args = sql + " AND state=?", [*args, state]
        if after:
            sql += " AND (created_at < ? OR (created_at = ? AND id < ?))"
            args += [after[0], after[0], after[1]]
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        return [self._job(r) for r in self._query(sql, [*args, limit])]

    def claim_next(self) -> JobRecord | None:
        """Atomically take the oldest queued job and mark it RUNNING (attempts + 1)."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT id FROM jobs WHERE state=? ORDER BY created_at LIMIT 1", (QUEUED,)
            ).fetchone()
            if row:
                db.execute(
                    "UPDATE jobs SET state=?, attempts=attempts+1, updated_at=? WHERE id=?",
                    (RUNNING, time.time(), row[0]),
                )
            db.execute("COMMIT")
        if row is None:
            return None
        JOB_TRANSITIONS.labels(RUNNING).inc()
        return self.get(row[0])

    def update(self, job_id: str, **fields) -> None:
        if "result" in fields:
            fields["result"] = json.dumps(fields["result"])
        fields["updated_at"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        with closing(self._connect()) as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE id=?", (*fields.values(), job_id))

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """A queued job is cancelled at once; a running one at its next checkpoint."""
        job = self.get(job_id)
        if job is None or job.state in ENDED:
            return job
        if job.state == QUEUED:
            self.finish(job_id, CANCELLED, "cancelled before it started")
        else:
            self.update(job_id, cancel_requested=1)
        return self.get(job_id)

    def finish(self, job_id: str, state: str, message: str) -> None:
        # The event first: a watch stream ends once the job has ended and no event is left, so
        # with the state written first it could end without the final event.
        self.add_event(job_id, state.lower(), {"message": message})
        self.update(job_id, state=state, message=message, phase="")
        JOB_TRANSITIONS.labels(state).inc()

    def recover_interrupted(self) -> list[str]:
        """Jobs RUNNING when the process died go back to the queue (retried from the start)."""
        rows = self._query("SELECT id FROM jobs WHERE state=?", (RUNNING,))
        for (job_id,) in rows:
            self.update(
                job_id,
                state=QUEUED,
                phase="",
                message="interrupted by a server restart; retried from the start",
            )
            self.add_event(job_id, "queued", {"message": "retried after a server restart"})
            JOB_TRANSITIONS.labels(QUEUED).inc()
        return [r[0] for r in rows]

    def count_by_state(self) -> dict[str, int]:
        rows = self._query("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {state: dict(rows).get(state, 0) for state in (QUEUED, RUNNING, *ENDED)}

    # --- events -------------------------------------------------------------------------
    def add_event(self, job_id: str, kind: str, data: dict) -> None:
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            seq = db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id=?", (job_id,)
            ).fetchone()[0]
            db.execute(
                "INSERT INTO events VALUES (?,?,?,?,?)",
                (job_id, seq, kind, time.time(), json.dumps(data)),
            )
            db.execute("COMMIT")
        with self.changed:
            self.changed.notify_all()

    def events(self, job_id: str, after_seq: int = 0) -> list[Event]:
        rows = self._query(
            "SELECT * FROM events WHERE job_id=? AND seq>? ORDER BY seq", (job_id, after_seq)
        )
        return [Event(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    def wait_for_change(self, timeout_s: float) -> None:
        with self.changed:
            self.changed.wait(timeout_s)

    @staticmethod
    def _job(row) -> JobRecord:
        return JobRecord(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            json.loads(row[5]),
            json.loads(row[6]),
            row[7],
            bool(row[8]),
            row[9],
            row[10],
            row[11],
        )
