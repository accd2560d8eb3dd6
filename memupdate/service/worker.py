"""The training worker: takes queued jobs one at a time, off the gRPC threads, and runs them."""

import logging
import sqlite3
import threading

from memupdate.memory.facts import Fact, FactError
from memupdate.memory.law import LawError
from memupdate.service.jobs import CANCELLED, FAILED, LIVE, JobRecord, JobStore
from memupdate.service.update import Cancelled, Runtime, UpdateFailed, UpdateRequest, run_update
from memupdate.serving.registry import RegistryError
from memupdate.serving.vllm_client import ServingError

log = logging.getLogger("memupdate.service.worker")
EXPECTED_FAILURES = (UpdateFailed, FactError, LawError, RegistryError, ServingError, ValueError)


def request_from_job(job: JobRecord) -> UpdateRequest:
    data = dict(job.request)
    data["facts"] = [Fact(**f, source=f"facts[{i}]") for i, f in enumerate(data["facts"])]
    return UpdateRequest(**data)


class Worker(threading.Thread):
    def __init__(self, store: JobStore, runtime: Runtime, retry_s: float = 5.0):
        super().__init__(name="memupdate-worker", daemon=True)
        self.store = store
        self.runtime = runtime
        self.retry_s = retry_s  # wait after a job database error before trying again
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.store.claim_next()
                if job is None:
                    self.store.wait_for_change(1.0)
                    continue
                self.run_job(job)
            except sqlite3.Error:
                # The job database cannot be written (disk full, read-only, locked): keep the
                # worker alive and try again; a job left RUNNING is retried at the next start.
                log.exception("job database error; retrying in %.0f s", self.retry_s)
                self._stopping.wait(self.retry_s)

    def run_job(self, job: JobRecord) -> None:
        extra = {"job_id": job.id, "kb": job.kb}
        log.info("job started (attempt %d)", job.attempts, extra=extra)

        def emit(kind: str, data: dict) -> None:
            self.store.add_event(job.id, kind, data)
            self.store.update(job.id, phase=kind)
            log.info("job %s", kind, extra=extra)

        def cancelled() -> bool:
            current = self.store.get(job.id)
            return current is not None and current.cancel_requested

        try:
            result = run_update(self.runtime, request_from_job(job), emit, cancelled)
            self.store.update(job.id, result=result)
            self.store.finish(job.id, LIVE, f"version {result['version']} {result['reason']}")
        except Cancelled:
            self.store.finish(job.id, CANCELLED, "cancelled while running")
        except EXPECTED_FAILURES as err:
            self.store.finish(job.id, FAILED, str(err))
            log.warning("job failed: %s", err, extra=extra)
        except Exception as err:  # a bug: the job must still end in a definite state
            log.exception("job crashed", extra=extra)
            self.store.finish(job.id, FAILED, f"internal error: {type(err).__name__}: {err}")
