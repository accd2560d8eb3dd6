"""Durable jobs: every update request, its state and its event history, in the job database
(SQLite in the data directory, or Postgres shared by servers and workers on many hosts).

A job is QUEUED, then RUNNING, then ends LIVE, FAILED or CANCELLED. Events are appended with a
per-job sequence number, so a watcher that reconnects resumes where it left off.

A worker claims a job under a lease and renews it while it runs (claim_next says how claims
keep one knowledge base's updates in order). A worker that dies stops renewing; when its lease
runs out another worker claims the job and runs it from the beginning (training is
deterministic; a version the job already published is reused, see service.update). A job's
events, phase and end are written only under its lease, so a worker that lost its lease cannot
touch a job someone else now runs. A job whose workers died MAX_ATTEMPTS times fails.
With SQLite (one host, the server's own worker), jobs found RUNNING at start-up were
interrupted by a crash and go back to the queue at once.
"""

import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from memupdate.database import Database, is_postgres
from memupdate.service.metrics import JOB_TRANSITIONS

QUEUED, RUNNING, LIVE, FAILED, CANCELLED = "QUEUED", "RUNNING", "LIVE", "FAILED", "CANCELLED"
ENDED = (LIVE, FAILED, CANCELLED)
DEFAULT_LEASE_S = 60.0  # a worker's lease on its job (the lease_s setting)
MAX_ATTEMPTS = 3  # claims of a job whose worker died each time (out of memory?) before it fails

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
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    lease_owner TEXT,
    lease_expires_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""
# Added after the first release: databases made before them get them at start-up.
LEASE_COLUMNS = {"lease_owner": "TEXT", "lease_expires_at": "DOUBLE PRECISION"}
COLUMNS = (
    "id, kb, state, phase, message, request, result, idempotency_key, cancel_requested, "
    "attempts, created_at, updated_at, lease_owner"
)


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
    lease_owner: str | None = None


@dataclass
class Event:
    job_id: str
    seq: int
    kind: str
    at: float
    data: dict


class JobStore:
    """`where`: the SQLite file, or a postgresql:// URL."""

    def __init__(self, where: Path | str):
        self.changed = threading.Condition()  # notified on every event added by this process
        if not is_postgres(where):
            Path(where).parent.mkdir(parents=True, exist_ok=True)
        self.db = Database(where, SCHEMA, "job database", JobStoreError)
        self.db.add_missing_columns("jobs", LEASE_COLUMNS)
        # Lease times come from the database's clock: workers on hosts whose clocks disagree
        # still agree on when a lease ran out.
        self.now = "extract(epoch from clock_timestamp())" if self.db.postgres else "?"

    def _now_args(self) -> tuple:
        return () if self.db.postgres else (time.time(),)

    # --- jobs ---------------------------------------------------------------------------
    def create(
        self, kb: str, request: dict, idempotency_key: str | None, max_queued: int
    ) -> tuple[JobRecord, bool]:
        """(job, created). An existing idempotency key returns its job, created=False.
        Raises OverflowError when `max_queued` jobs are already waiting."""
        now = time.time()
        job_id = uuid.uuid4().hex[:16]
        with self.db.transaction(lock="memupdate-job-create") as db:
            if idempotency_key:
                row = db.execute(
                    f"SELECT {COLUMNS} FROM jobs WHERE idempotency_key=?", (idempotency_key,)
                ).fetchone()
                if row:  # (read on this connection: a second one could wait on this lock)
                    return self._job(row), False
            queued = db.execute("SELECT COUNT(*) FROM jobs WHERE state=?", (QUEUED,)).fetchone()[0]
            if queued >= max_queued:
                raise OverflowError(f"{queued} jobs are already queued (limit {max_queued})")
            db.execute(
                "INSERT INTO jobs (id, kb, state, request, idempotency_key, created_at, "
                "updated_at) VALUES (?,?,?,?,?,?,?)",
                (job_id, kb, QUEUED, json.dumps(request), idempotency_key or None, now, now),
            )
        self.add_event(job_id, "queued", {})
        JOB_TRANSITIONS.labels(QUEUED).inc()
        return self.get(job_id), True

    def get(self, job_id: str) -> JobRecord | None:
        rows = self.db.query(f"SELECT {COLUMNS} FROM jobs WHERE id=?", (job_id,))
        return self._job(rows[0]) if rows else None

    def list_jobs(
        self, kb: str = "", state: str = "", limit: int = 50, after: tuple[float, str] | None = None
    ) -> list[JobRecord]:
        """Newest first; `after` is the (created_at, id) of the last job of the previous page."""
        sql, args = f"SELECT {COLUMNS} FROM jobs WHERE 1=1", []
        if kb:
            sql, args = sql + " AND kb=?", [*args, kb]
        if state:
            sql, args = sql + " AND state=?", [*args, state]
        if after:
            sql += " AND (created_at < ? OR (created_at = ? AND id < ?))"
            args += [after[0], after[0], after[1]]
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        return [self._job(r) for r in self.db.query(sql, [*args, limit])]

    def claim_next(self, owner: str, lease_s: float) -> JobRecord | None:
        """Take the oldest job that is queued, or running under a lease that ran out (its
        worker died), of a knowledge base no other worker is updating (one base's updates run
        in order, one at a time), and mark it RUNNING under `owner`'s lease (attempts + 1)."""
        # Claims take turns (the claim lock; SQLite's write lock does the same): with SKIP
        # LOCKED alone, two workers could take two updates of one knowledge base at once, each
        # from the same live version, and the second to go live would drop the first's facts.
        # And the row is locked without SKIP LOCKED: with claims taking turns, a locked row is
        # one a heartbeat or a cancel is writing, and skipping it would let a later update of
        # the same base go first.
        for_update = " FOR UPDATE" if self.db.postgres else ""
        with self.db.transaction(lock="memupdate-claim") as db:
            row = db.execute(
                f"SELECT id, state, attempts, lease_owner FROM jobs "
                f"WHERE (state=? OR (state=? AND lease_expires_at < {self.now})) "
                f"AND kb NOT IN (SELECT kb FROM jobs WHERE state=? "
                f"AND (lease_expires_at IS NULL OR lease_expires_at >= {self.now})) "
                f"ORDER BY created_at LIMIT 1{for_update}",
                (QUEUED, RUNNING, *self._now_args(), RUNNING, *self._now_args()),
            ).fetchone()
            if row is None:
                return None
            job_id, state, attempts, dead_owner = row
            reclaimed = state == RUNNING  # its worker died: the lease ran out
            exhausted = reclaimed and attempts >= MAX_ATTEMPTS
            if reclaimed:  # its event in this transaction, under the job's event lock
                self.db.lock(db, f"memupdate-events-{job_id}")
            if exhausted:
                ended = f"its worker died {attempts} times while running it (out of memory?)"
                db.execute(
                    "UPDATE jobs SET state=?, message=?, phase='', updated_at=? WHERE id=?",
                    (FAILED, ended, time.time(), job_id),
                )
                self._insert_event(db, job_id, "failed", {"message": ended})
            else:
                db.execute(
                    f"UPDATE jobs SET state=?, attempts=attempts+1, lease_owner=?, "
                    f"lease_expires_at={self.now} + ?, updated_at=? WHERE id=?",
                    (RUNNING, owner, *self._now_args(), lease_s, time.time(), job_id),
                )
                if reclaimed:
                    retried = f"the lease of worker {dead_owner} ran out; retried by {owner}"
                    self._insert_event(db, job_id, "retried", {"message": retried})
        if reclaimed:
            self._notify()
        if exhausted:
            JOB_TRANSITIONS.labels(FAILED).inc()
            return None
        JOB_TRANSITIONS.labels(RUNNING).inc()
        return self.get(job_id)

    def _held(self, owner: str) -> tuple[str, tuple]:
        """SQL condition (and its arguments): `owner` holds the job's lease, not run out. A lease
        that ran out is gone for good, even before another worker claims the job."""
        condition = f"lease_owner=? AND state=? AND lease_expires_at >= {self.now}"
        return condition, (owner, RUNNING, *self._now_args())

    def renew_lease(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend `owner`'s lease; False when it no longer holds one (it ran out, or the job
        was cancelled or taken by another worker)."""
        held, args = self._held(owner)
        changed = self.db.execute(
            f"UPDATE jobs SET lease_expires_at={self.now} + ? WHERE id=? AND {held}",
            (*self._now_args(), lease_s, job_id, *args),
        )
        return changed == 1

    def holds_lease(self, job_id: str, owner: str) -> bool:
        held, args = self._held(owner)
        return bool(self.db.query(f"SELECT 1 FROM jobs WHERE id=? AND {held}", (job_id, *args)))

    def update(self, job_id: str, owner: str | None = None, **fields) -> bool:
        """Set fields; with `owner`, only while that worker holds the lease. False if not."""
        if "result" in fields:
            fields["result"] = json.dumps(fields["result"])
        fields["updated_at"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        held, args = self._held(owner) if owner else ("1=1", ())
        changed = self.db.execute(
            f"UPDATE jobs SET {cols} WHERE id=? AND {held}", (*fields.values(), job_id, *args)
        )
        return changed == 1

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """A queued job is cancelled at once; a running one at its next checkpoint."""
        job = self.get(job_id)
        if job is None or job.state in ENDED:
            return job
        if job.state == QUEUED:  # (unless a worker claims it first: then at its checkpoint)
            self.finish(job_id, CANCELLED, "cancelled before it started", from_state=QUEUED)
        else:
            self.update(job_id, cancel_requested=1)
        return self.get(job_id)

    def finish(
        self,
        job_id: str,
        state: str,
        message: str,
        owner: str | None = None,
        result: dict | None = None,
        from_state: str | None = None,
    ) -> bool:
        """End the job (with its final event and `result`, in one transaction: a watch stream
        that sees the end also sees the event). With `owner`, only while that worker holds the
        job's lease; with `from_state`, only from that state; else from any state but an end.
        False when the job was not ended here."""
        with self.db.transaction(lock=f"memupdate-events-{job_id}") as db:
            if owner is not None:
                guard, args = self._held(owner)
            elif from_state is not None:
                guard, args = "state=?", (from_state,)
            else:
                guard, args = "state NOT IN (?,?,?)", ENDED
            changed = db.execute(
                f"UPDATE jobs SET state=?, message=?, phase='', result=COALESCE(?, result), "
                f"updated_at=? WHERE id=? AND {guard}",
                (state, message, result and json.dumps(result), time.time(), job_id, *args),
            ).rowcount
            if changed:
                self._insert_event(db, job_id, state.lower(), {"message": message})
        if changed:
            self._notify()
            JOB_TRANSITIONS.labels(state).inc()
        return bool(changed)

    def recover_interrupted(self) -> list[str]:
        """Jobs RUNNING when the process died go back to the queue (retried from the start).
        Only for the embedded SQLite store, whose one server runs every job: with a shared
        store, other workers' jobs are RUNNING too, and their leases say who died."""
        rows = self.db.query("SELECT id FROM jobs WHERE state=?", (RUNNING,))
        for (job_id,) in rows:
            self.update(
                job_id,
                state=QUEUED,
                phase="",
                lease_owner=None,
                message="interrupted by a server restart; retried from the start",
            )
            self.add_event(job_id, "queued", {"message": "retried after a server restart"})
            JOB_TRANSITIONS.labels(QUEUED).inc()
        return [r[0] for r in rows]

    def count_by_state(self) -> dict[str, int]:
        rows = self.db.query("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {state: dict(rows).get(state, 0) for state in (QUEUED, RUNNING, *ENDED)}

    # --- events -------------------------------------------------------------------------
    def add_event(self, job_id: str, kind: str, data: dict, owner: str | None = None) -> bool:
        """Append an event; with `owner`, only while that worker holds the job's lease (a
        worker that lost it never writes after another worker's events). False if not."""
        with self.db.transaction(lock=f"memupdate-events-{job_id}") as db:
            if owner is not None:
                held, args = self._held(owner)
                if not db.execute(
                    f"SELECT 1 FROM jobs WHERE id=? AND {held}", (job_id, *args)
                ).fetchone():
                    return False
            self._insert_event(db, job_id, kind, data)
        self._notify()
        return True

    @staticmethod
    def _insert_event(db, job_id: str, kind: str, data: dict) -> None:
        """Inside a transaction that numbers the job's events (SQLite's write lock, or the
        job's advisory lock on Postgres)."""
        seq = db.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id=?", (job_id,)
        ).fetchone()[0]
        db.execute(
            "INSERT INTO events VALUES (?,?,?,?,?)",
            (job_id, seq, kind, time.time(), json.dumps(data)),
        )

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def events(self, job_id: str, after_seq: int = 0) -> list[Event]:
        rows = self.db.query(
            "SELECT job_id, seq, kind, at, data FROM events WHERE job_id=? AND seq>? ORDER BY seq",
            (job_id, after_seq),
        )
        return [Event(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    def wait_for_change(self, timeout_s: float) -> None:
        """Until this process adds an event, or `timeout_s` (events written by workers in
        other processes are seen at the next poll)."""
        with self.changed:
            self.changed.wait(timeout_s)

    @staticmethod
    def _job(row) -> JobRecord:
        return JobRecord(
            *row[:5],
            json.loads(row[5]),
            json.loads(row[6]),
            row[7],
            bool(row[8]),
            *row[9:13],
        )
