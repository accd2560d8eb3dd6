"""The job queue on both stores, SQLite and a real Postgres: leases, heartbeats, fenced ends and
writes, claims that never hand one job to two workers, and a registry index shared by many
writers."""

import threading
import time

import pytest

from memupdate.service.jobs import FAILED, LIVE, MAX_ATTEMPTS, QUEUED, RUNNING, JobStore
from memupdate.serving.registry import Registry
from memupdate.serving.vllm_plugin import find_version


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return JobStore(tmp_path / "jobs.db")
    return JobStore(request.getfixturevalue("postgres_url"))


def submit(store: JobStore, kb="kb"):
    job, created = store.create(kb, {"facts": []}, None, max_queued=10_000)
    assert created
    return job


def test_a_claimed_job_is_ended_only_by_the_worker_holding_its_lease(store):
    job = submit(store)
    claimed = store.claim_next("worker-a", lease_s=30)
    assert claimed.id == job.id and claimed.state == RUNNING and claimed.lease_owner == "worker-a"
    assert store.claim_next("worker-b", lease_s=30) is None  # nothing else to take
    assert store.renew_lease(job.id, "worker-a", 30)
    assert not store.renew_lease(job.id, "worker-b", 30)
    assert not store.finish(job.id, LIVE, "not mine", owner="worker-b")
    assert store.get(job.id).state == RUNNING
    assert store.finish(job.id, LIVE, "done", owner="worker-a")
    assert store.get(job.id).state == LIVE
    assert [e.kind for e in store.events(job.id)] == ["queued", "live"]


def test_a_job_whose_lease_ran_out_goes_to_another_worker_and_the_first_cannot_end_it(store):
    job = submit(store)
    store.claim_next("dead-worker", lease_s=1)
    time.sleep(1.3)  # the dead worker renews nothing
    taken = store.claim_next("live-worker", lease_s=30)
    assert taken.id == job.id and taken.attempts == 2 and taken.lease_owner == "live-worker"
    retried = store.events(job.id)[-1]
    assert retried.kind == "retried" and "dead-worker" in retried.data["message"]
    assert not store.renew_lease(job.id, "dead-worker", 30)  # it learns it lost the job
    assert not store.finish(job.id, LIVE, "late", owner="dead-worker")
    assert store.finish(job.id, LIVE, "done", owner="live-worker")


def test_a_job_that_kills_its_workers_fails_after_max_attempts(store):
    job = submit(store)
    for attempt in range(MAX_ATTEMPTS):
        assert store.claim_next(f"worker-{attempt}", lease_s=0.3).attempts == attempt + 1
        time.sleep(0.5)
    assert store.claim_next("worker-last", lease_s=30) is None
    ended = store.get(job.id)
    assert ended.state == FAILED and f"died {MAX_ATTEMPTS} times" in ended.message


def test_a_heartbeat_keeps_a_long_job_and_a_worker_that_lost_its_lease_writes_nothing(store):
    from memupdate.service.worker import Heartbeat

    job = submit(store)
    store.claim_next("slow-worker", lease_s=0.9)
    heartbeat = Heartbeat(store, job.id, "slow-worker", lease_s=0.9)
    heartbeat.start()
    time.sleep(2.0)  # more than two leases: only the renewals keep the job
    assert store.claim_next("other", lease_s=30) is None and not heartbeat.lost.is_set()
    heartbeat.stop()  # the worker stalls: nothing renews
    time.sleep(1.2)
    assert store.claim_next("other", lease_s=30).id == job.id
    stalled = Heartbeat(store, job.id, "slow-worker", lease_s=0.9)
    stalled.start()  # it wakes up: its first renewal finds the lease gone
    assert stalled.lost.wait(2.0)
    stalled.stop()
    assert not store.add_event(job.id, "training", {}, owner="slow-worker")
    assert not store.update(job.id, owner="slow-worker", phase="training")
    assert store.add_event(job.id, "training", {}, owner="other")
    assert store.get(job.id).lease_owner == "other"
    assert [e.kind for e in store.events(job.id)] == ["queued", "retried", "training"]


def test_a_lease_that_ran_out_is_gone_even_before_another_worker_claims_the_job(store):
    job = submit(store)
    store.claim_next("paused-worker", lease_s=0.3)
    time.sleep(0.5)
    assert not store.renew_lease(job.id, "paused-worker", 30)
    assert not store.holds_lease(job.id, "paused-worker")
    assert not store.finish(job.id, LIVE, "late", owner="paused-worker")
    assert store.claim_next("other", lease_s=30).id == job.id


def test_cancelling_a_running_job_takes_its_lease_away(store):
    job = submit(store)
    store.claim_next("worker-a", lease_s=30)
    store.finish(job.id, "CANCELLED", "cancelled by an operator")  # no owner: the server
    assert not store.renew_lease(job.id, "worker-a", 30)
    assert not store.finish(job.id, LIVE, "too late", owner="worker-a")


def test_concurrent_workers_never_claim_the_same_job(postgres_url):
    store = JobStore(postgres_url)
    jobs = {submit(store, f"kb{i}").id for i in range(120)}  # bases that may run side by side
    claims: list[tuple[str, str]] = []
    refused: list[str] = []  # (an assert inside a thread would not fail the test)

    def work(name: str):
        own = JobStore(postgres_url)
        while (job := own.claim_next(name, lease_s=60)) is not None:
            claims.append((job.id, name))
            if not own.finish(job.id, LIVE, "done", owner=name):
                refused.append(job.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [job_id for job_id, _ in claims]
    assert sorted(claimed) == sorted(jobs) and not refused  # every job once, none twice
    assert len({name for _, name in claims}) > 1  # the work was shared
    assert store.count_by_state()[LIVE] == 120 and store.count_by_state()[QUEUED] == 0


def adapter_folder(tmp_path, rank=1):
    folder = tmp_path / f"adapter-r{rank}"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(f'{{"r": {rank}}}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def test_registry_on_postgres_numbers_concurrent_publishes_and_never_reuses_a_number(
    postgres_url, tmp_path
):
    shared = tmp_path / "shared"
    hosts = [Registry(shared, postgres_url) for _ in range(4)]  # four hosts, one volume
    adapter = adapter_folder(tmp_path)
    numbers: list[int] = []
    threads = [
        threading.Thread(target=lambda r=r: numbers.append(r.publish("kb", adapter, {}).version))
        for r in hosts
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(numbers) == list(range(1, 13))
    assert not (shared / "registry.db").exists()  # the index is in Postgres
    hosts[0].set_live("kb", 12)
    assert hosts[3].live("kb").path == shared / "kb" / "v12"
    assert find_version(hosts[2], "kb").version == 12
    assert find_version(hosts[2], "kb@v3").path == shared / "kb" / "v3"
    assert find_version(hosts[2], "kb@v99") is None and find_version(hosts[2], "Bad!") is None

    hosts[1].delete("kb")
    assert hosts[2].live("kb") is None and find_version(hosts[0], "kb@v3") is None
    again = hosts[3].publish("kb", adapter, {})
    assert again.version == 13  # vLLM caches adapters by name: kb@v1 never means two things


def test_sweep_on_a_shared_volume_spares_a_publish_in_progress(postgres_url, tmp_path):
    registry = Registry(tmp_path / "shared", postgres_url)
    registry.publish("kb", adapter_folder(tmp_path), {})
    staged = tmp_path / "shared" / "kb" / ".incoming-elsewhere"
    staged.mkdir()
    assert registry.sweep(min_age_s=3600) == []
    assert registry.sweep() == [staged]


def test_a_job_database_from_before_leases_gets_its_columns_and_keeps_its_jobs(tmp_path):
    import sqlite3

    old_schema = (
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, kb TEXT NOT NULL, state TEXT NOT NULL, "
        "phase TEXT NOT NULL DEFAULT '', message TEXT NOT NULL DEFAULT '', request TEXT NOT NULL, "
        "result TEXT NOT NULL DEFAULT '{}', idempotency_key TEXT UNIQUE, "
        "cancel_requested INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, "
        "created_at REAL NOT NULL, updated_at REAL NOT NULL)"
    )
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        db.execute(old_schema)
        db.execute(
            "INSERT INTO jobs (id, kb, state, request, created_at, updated_at) "
            "VALUES ('old', 'kb', 'QUEUED', '{\"facts\": []}', 1, 1)"
        )
    store = JobStore(tmp_path / "jobs.db")
    assert store.claim_next("w", lease_s=30).id == "old"
    assert store.finish("old", LIVE, "done", owner="w")


def test_database_url_must_be_postgres_and_no_workers_needs_it():
    from pydantic import ValidationError

    from memupdate.service.config import ServiceConfig

    with pytest.raises(ValidationError, match="postgresql:// URL, not 'mysql'"):
        ServiceConfig(database_url="mysql://u:secret@h/db")
    with pytest.raises(ValidationError, match="workers=0 leaves the jobs to `memupdate worker`"):
        ServiceConfig(workers=0)
    assert ServiceConfig(workers=0, database_url="postgresql://h/db").workers == 0


def test_one_knowledge_base_is_updated_by_one_worker_at_a_time_in_order(store):
    first, second, other = submit(store, "kb"), submit(store, "kb"), submit(store, "other")
    assert store.claim_next("w1", lease_s=30).id == first.id
    assert store.claim_next("w2", lease_s=30).id == other.id  # not kb's second update
    assert store.claim_next("w3", lease_s=30) is None
    store.finish(first.id, LIVE, "done", owner="w1")
    assert store.claim_next("w3", lease_s=30).id == second.id
