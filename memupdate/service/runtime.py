"""What a server or a worker process opens at start-up from its settings: the job store, the
adapter registry, and runtimes (a copy of the base model with the adapter family, the registry
and the serving backend every job needs)."""

import logging
import threading
from collections.abc import Callable

from memupdate.memory.adapter import choose_family
from memupdate.memory.base_model import load_model, model_identity, resolve_model_dir
from memupdate.service.config import ServiceConfig
from memupdate.service.jobs import JobStore
from memupdate.service.update import Runtime
from memupdate.serving.backends import ServingBackend
from memupdate.serving.registry import Registry

log = logging.getLogger("memupdate.service")
# A folder in the shared registry that no row lists may be a publish in progress on another
# host for this long (copying and fsyncing an adapter); only older ones are swept.
SHARED_SWEEP_AGE_S = 3600.0


def open_job_store(config: ServiceConfig) -> JobStore:
    """The shared Postgres store, or the data directory's SQLite file. With SQLite this process
    runs every job, so jobs it left RUNNING when it died go back to the queue now."""
    if config.database_url:
        return JobStore(config.database_url)
    store = JobStore(config.data_dir / "jobs.db")
    retried = store.recover_interrupted()
    if retried:
        log.warning(
            "requeued %d job(s) interrupted by the last shutdown: %s",
            len(retried),
            ", ".join(retried),
        )
    return store


def open_registry(config: ServiceConfig) -> Registry:
    """The registry, its index in Postgres when the job store is there; half-published
    versions from a crash are never listed, and are removed here."""
    registry = Registry(config.registry_dir or config.data_dir / "registry", config.database_url)
    registry.sweep(min_age_s=SHARED_SWEEP_AGE_S if config.database_url else 0.0)
    return registry


def load_runtime(config: ServiceConfig, registry: Registry, backend: ServingBackend) -> Runtime:
    """A runtime with its own copy of the base model (trainings and plans never share one)."""
    folder = resolve_model_dir(config.model)
    model, tokenizer = load_model(folder)
    return Runtime(
        folder,
        model_identity(folder),
        model,
        tokenizer,
        choose_family(
            model.config.num_hidden_layers,
            tuple(config.adapter_modules) or None,
            tuple(config.adapter_layers) or "default",
            learning_rate=config.adapter_learning_rate,
            locality_weight=config.adapter_locality_weight,
            norm_weight=config.adapter_norm_weight,
            train_until=config.adapter_train_until,
            gated=config.gate,
        ),
        registry,
        backend,
        default_max_steps=config.default_max_steps,
        warm_start=config.warm_start,
        gate=config.gate,
        adapter_per_update=config.adapter_per_update,
        held_facts_checked=config.held_facts_checked,
        max_facts=config.max_facts_per_update,
        serving_wait_s=config.serving_wait_s,
    )


def in_passing_thread(fn: Callable, *args):
    """`fn(*args)` run in a thread that ends with it: its result, or its exception raised here.

    Torch work outside the threads that train goes through here. torch's CPU kernels run on
    OpenMP (libgomp), which keeps a pool of helper threads for each thread that has run parallel
    work, for as long as that thread lives; once the process holds more of them than it has
    cores, the helpers sleep at once between parallel regions instead of spinning, and each of a
    training step's thousands of small regions waits for a wake-up. A thread that ends takes its
    pool with it. Measured on 2 cores (bench/training_threads.py): a training in a worker thread
    took 1.35x as long after the main thread had computed the locality references."""
    out: list = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except BaseException as e:  # handed to the caller
            error.append(e)

    thread = threading.Thread(target=run, name=f"torch-{getattr(fn, '__name__', 'work')}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return out[0]
