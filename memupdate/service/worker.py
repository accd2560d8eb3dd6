"""The training worker: claims queued jobs one at a time and runs them to an end.

It runs as a thread of `memupdate serve` (the embedded default) or as a process of its own
(`memupdate worker`, one per GPU or CPU host, sharing a Postgres job store). Either way it holds
each job under a lease that a heartbeat thread renews; a worker that loses the lease (it stalled
past it, or the database was unreachable that long) stops the job, because another worker may
already run it, and never ends it.
"""

import logging
import os
import socket
import threading
import uuid

from memupdate.database import DATABASE_ERRORS
from memupdate.memory.facts import Fact, FactError
from memupdate.memory.law import LawError
from memupdate.service.jobs import (
    CANCELLED,
    DEFAULT_LEASE_S,
    FAILED,
    LIVE,
    JobRecord,
    JobStore,
)
from memupdate.service.update import Cancelled, Runtime, UpdateFailed, UpdateRequest, run_update
from memupdate.serving.registry import RegistryError
from memupdate.serving.vllm_client import ServingError

log = logging.getLogger("memupdate.service.worker")
EXPECTED_FAILURES = (UpdateFailed, FactError, LawError, RegistryError, ServingError, ValueError)


def request_from_job(job: JobRecord) -> UpdateRequest:
    data = dict(job.request)
    data["facts"] = [Fact(**f, source=f"facts[{i}]") for i, f in enumerate(data["facts"])]
    return UpdateRequest(**data, job_id=job.id)


def worker_name() -> str:
    """Unique per worker: host, process, and a random part (several workers per process)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Heartbeat(threading.Thread):
    """Renews a job's lease every third of its length until stopped; `lost` is set when the
    lease could not be renewed (another worker may own the job now)."""

    def __init__(self, store: JobStore, job_id: str, owner: str, lease_s: float):
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.store, self.job_id, self.owner, self.lease_s = store, job_id, owner, lease_s
        self.lost = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.lease_s / 3):
            try:
                if not self.store.renew_lease(self.job_id, self.owner, self.lease_s):
                    self.lost.set()
                    return
            except DATABASE_ERRORS:  # try again; the lease may still run out meanwhile
                log.exception("could not renew the lease", extra={"job_id": self.job_id})

    def stop(self) -> None:
        self._halt.set()
        self.join()


class Worker(threading.Thread):
    def __init__(
        self,
        store: JobStore,
        runtime: Runtime,
        retry_s: float = 5.0,
        lease_s: float = DEFAULT_LEASE_S,
    ):
        self.worker_id = worker_name()
        super().__init__(name=f"memupdate-worker-{self.worker_id}", daemon=True)
        self.store = store
        self.runtime = runtime
        self.retry_s = retry_s  # wait after a job database error before trying again
        self.lease_s = lease_s
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()

    def run(self) -> None:
        log.info("worker %s taking jobs", self.worker_id)
        while not self._stopping.is_set():
            try:
                job = self.store.claim_next(self.worker_id, self.lease_s)
                if job is None:
                    self.store.wait_for_change(1.0)
                    continue
                self.run_job(job)
            except DATABASE_ERRORS:
                # The job database cannot be written (disk full, read-only, locked, server
                # gone): keep the worker alive and try again; a job it held is retried.
                log.exception("job database error; retrying in %.0f s", self.retry_s)
                self._stopping.wait(self.retry_s)

    def run_job(self, job: JobRecord) -> None:
        extra = {"job_id": job.id, "kb": job.kb}
        log.info("job started by %s (attempt %d)", self.worker_id, job.attempts, extra=extra)
        heartbeat = Heartbeat(self.store, job.id, self.worker_id, self.lease_s)
        heartbeat.start()

        def emit(kind: str, data: dict) -> None:
            # Written only under the lease: once it is lost, the job is someone else's.
            if not self.store.add_event(job.id, kind, data, owner=self.worker_id):
                heartbeat.lost.set()
                raise Cancelled()
            self.store.update(job.id, owner=self.worker_id, phase=kind)
            log.info("job %s", kind, extra=extra)

        def cancelled() -> bool:
            if heartbeat.lost.is_set():
                return True
            current = self.store.get(job.id)
            return current is not None and current.cancel_requested

        def still_ours() -> bool:  # checked right before a version goes live
            return not heartbeat.lost.is_set() and self.store.holds_lease(job.id, self.worker_id)

        def finish(state: str, message: str, result: dict | None = None) -> None:
            if not self.store.finish(job.id, state, message, self.worker_id, result):
                log.warning("lost the job's lease; not ending it (%s)", message, extra=extra)

        try:
            result = run_update(self.runtime, request_from_job(job), emit, cancelled, still_ours)
            finish(LIVE, f"version {result['version']} {result['reason']}", result)
        except Cancelled:  # by a user, or because the lease ran out (then finish says so)
            finish(CANCELLED, "cancelled while running")
        except EXPECTED_FAILURES as err:
            finish(FAILED, str(err))
            log.warning("job failed: %s", err, extra=extra)
        except DATABASE_ERRORS:
            raise  # the run loop waits and retries; the lease runs out and the job is retried
            # (by this worker or another)
        except Exception as err:  # a bug: the job must still end in a definite state
            log.exception("job crashed", extra=extra)
            finish(FAILED, f"internal error: {type(err).__name__}: {err}")
        finally:
            heartbeat.stop()


def run_worker_process(config) -> None:
    """`memupdate worker`: a training worker of its own, for a shared Postgres job store. It
    loads the base model once, takes jobs until SIGTERM or SIGINT, then finishes the job in
    hand (a job it cannot finish is retried elsewhere once its lease runs out)."""
    import signal

    from prometheus_client import start_http_server

    from memupdate.database import redact
    from memupdate.service.runtime import (
        in_passing_thread,
        load_runtime,
        open_job_store,
        open_registry,
    )
    from memupdate.serving.backends import ExternalBackend
    from memupdate.serving.vllm_client import ask_base_locality

    if not config.database_url:
        raise ValueError(
            "a worker process needs the shared job store: set MEMUPDATE_DATABASE_URL (or "
            "--database-url) to the Postgres URL the server uses"
        )
    if not config.registry_dir:
        raise ValueError(
            "a worker process publishes to the registry every host shares: give its folder "
            "with --registry-dir (or MEMUPDATE_REGISTRY_DIR), as to the server"
        )
    if not config.vllm_urls:
        raise ValueError(
            "a worker process makes versions live on the vLLM replicas itself: give them with "
            "--vllm-url (or MEMUPDATE_VLLM_URLS), as to the server"
        )
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store, registry = open_job_store(config), open_registry(config)
    backend = ExternalBackend(config.vllm_urls, config.max_lora_rank)

    def load_and_prepare():
        runtime = load_runtime(config, registry, backend)
        runtime.prepare()
        ask_base_locality(backend.replicas(), runtime.model, runtime.tokenizer)
        return runtime

    # Not in this thread, which lives on: the trainings would run 1.35x slower.
    runtime = in_passing_thread(load_and_prepare)
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.grpc_host)
    worker = Worker(store, runtime, lease_s=config.lease_s)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    worker.start()
    print(f"worker {worker.worker_id} taking jobs from {redact(config.database_url)}", flush=True)
    print(f"registry in {registry.root}; replicas {', '.join(config.vllm_urls)}", flush=True)
    if config.metrics_port:
        print(f"metrics on http://{config.grpc_host}:{config.metrics_port}/metrics", flush=True)
    done.wait()
    print("stopping after the job in hand", flush=True)
    worker.stop()
    worker.join()
