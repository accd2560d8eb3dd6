"""Faults, each produced for real and survived with nothing lost: SQLite locked or damaged at
start, the registry's disk full or read-only during a publish, vLLM unreachable during probes and
during the serving check, and SIGKILL of the server during training, publish and the serving
check."""

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from openai_api import ask
from service_process import ServiceProcess, free_port
from tools import tool_missing, wait_for

from memupdate.memory.fact_sets import phonebook_facts
from memupdate.v1 import memupdate_pb2 as pb

NOWHERE = f"http://127.0.0.1:{free_port()}"
FIRST = [(f.prompt, f.target) for f in phonebook_facts(4, seed=51)]
SECOND = [(f.prompt, f.target) for f in phonebook_facts(3, seed=52)]


def serve_once(data: Path, model: Path, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """`memupdate serve` expected to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "memupdate.cli", "serve", "--data-dir", str(data)]
        + ["--model", str(model), "--vllm-url", NOWHERE, "--grpc-port", str(free_port())]
        + ["--metrics-port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


# --- SQLite at start ------------------------------------------------------------------------
@pytest.mark.parametrize("database", ["jobs.db", "registry/registry.db"])
def test_damaged_database_stops_start_up_and_is_left_alone(tiny_dir, tmp_path, database):
    path = tmp_path / "data" / database
    path.parent.mkdir(parents=True)
    damaged = b"SQLite format 3\x00" + os.urandom(8192)
    path.write_bytes(damaged)
    out = serve_once(tmp_path / "data", tiny_dir)
    assert out.returncode == 2, out.stderr
    assert "is damaged" in out.stderr and "move it aside" in out.stderr
    assert "Traceback" not in out.stderr
    assert path.read_bytes() == damaged  # nothing was changed


def test_worker_survives_a_job_database_error_and_takes_the_job_after_it(tmp_path, caplog):
    """The job database breaks under a running worker (its file overwritten, as a damaged disk
    would): the worker logs, waits and retries instead of dying, and takes the queued job once
    the file is whole again."""
    from memupdate.service.jobs import LIVE, JobStore
    from memupdate.service.worker import Worker

    store = JobStore(tmp_path / "jobs.sqlite")
    with sqlite3.connect(store.db.where) as db:  # fold the WAL in, so the main file holds it all
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    whole = store.db.where.read_bytes()
    store.db.where.write_bytes(b"this is not a database" * 200)

    class RecordingWorker(Worker):  # training is not what this test is about
        def run_job(self, job):
            self.store.finish(job.id, LIVE, "taken after the database came back")

    worker = RecordingWorker(store, runtime=None, retry_s=0.2)
    worker.start()
    try:
        wait_for(lambda: "job database error" in caplog.text, 10, "the worker to log the error")
        assert worker.is_alive()
        store.db.where.write_bytes(whole)
        job, _ = store.create("kb", {"facts": []}, None, max_queued=10)
        wait_for(lambda: store.get(job.id).state == LIVE, 10, "the worker to take the job")
        assert worker.is_alive()
    finally:
        worker.stop()
        worker.join(timeout=10)
    assert not worker.is_alive()


def test_locked_database_stops_start_up_naming_the_cause(tiny_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    holder = sqlite3.connect(data / "jobs.db", isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("CREATE TABLE keep (x)")
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    holder.execute("INSERT INTO keep VALUES (1)")
    try:
        out = serve_once(data, tiny_dir)
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert out.returncode == 2 and "locked by another process" in out.stderr, out.stderr
    with sqlite3.connect(data / "jobs.db") as db:  # the other writer's data is intact
        assert db.execute("SELECT x FROM keep").fetchall() == [(1,)]


# --- the registry's filesystem full or read-only --------------------------------------------
def mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        tool_missing(f"cannot mount a tmpfs here (needs root): {out.stderr.strip()}")


def fill(folder: Path, leave_bytes: int) -> Path:
    """Fill the filesystem holding `folder` until about `leave_bytes` remain."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))
    return filler


def integrity(db_path: Path) -> str:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


@pytest.fixture()
def small_registry(tiny_dir, tmp_path):
    """A service whose registry lives on its own 3 MB filesystem (jobs.db stays writable)."""
    data = tmp_path / "data"
    mount_tmpfs(data / "registry", "3m")
    proc = ServiceProcess(
        data,
        tiny_dir,
        "--vllm-url",
        NOWHERE,
        "--max-lora-rank",
        "64",
        env={"MEMUPDATE_SERVING_WAIT_S": "0", "MEMUPDATE_PROBE_INTERVAL_S": "0"},
    )
    try:
        proc.start()
        yield proc, data / "registry"
    finally:
        proc.stop()
        subprocess.run(["umount", "-l", str(data / "registry")], check=False)


def test_disk_full_or_read_only_during_publish_fails_cleanly(small_registry):
    proc, registry = small_registry
    # A rank-64 adapter of the tiny model is ~560 KB; leave room for SQLite, not for it.
    filler = fill(registry, leave_bytes=300_000)
    with proc.client() as client:
        job = client.wait(client.submit("full", FIRST, rank=64, max_steps=1500).job_id, 600)
        assert job.state == pb.FAILED
        assert "No space left on device" in job.message and "nothing was published" in job.message
        with pytest.raises(grpc.RpcError) as err:
            client.describe("full")  # no version was listed
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert not list((registry / "full").glob(".incoming-*"))
        assert integrity(registry / "registry.db") == "ok"

        # Space back: the same update publishes (then fails at the serving check: no vLLM).
        filler.unlink()
        job = client.wait(client.submit("full", FIRST, rank=64, max_steps=1500).job_id, 600)
        assert job.state == pb.FAILED and "vLLM not reachable" in job.message
        assert [v.version for v in client.describe("full").versions] == [1]

        # Read-only: the knowledge base's folder becomes a read-only bind mount of itself (a
        # busy filesystem cannot be remounted read-only as a whole). Refused with the reason;
        # version 1 stays listed and readable.
        kb_dir = str(registry / "full")
        subprocess.run(["mount", "--bind", kb_dir, kb_dir], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", kb_dir], check=True)
            job = client.wait(client.submit("full", SECOND, rank=8, max_steps=1500).job_id, 600)
            assert job.state == pb.FAILED and "Read-only file system" in job.message
            assert [v.version for v in client.describe("full").versions] == [1]
            assert client.health() == "SERVING"
        finally:
            subprocess.run(["umount", kb_dir], check=False)
    assert integrity(registry / "registry.db") == "ok"


# --- vLLM unreachable during probes ---------------------------------------------------------
def test_probe_without_vllm_is_a_failure_and_replica_down_not_a_recall_drop(tiny_dir, tmp_path):
    from peft import get_peft_model
    from prometheus_client import CollectorRegistry, generate_latest

    from memupdate.memory.adapter import default_family
    from memupdate.memory.base_model import load_model
    from memupdate.memory.encoding import encode_facts
    from memupdate.memory.facts import Fact
    from memupdate.service.metrics import PROBE_FAILURES, REPLICA_UP, KnowledgeBaseCollector
    from memupdate.service.monitor import MonitorSettings, RecallMonitor
    from memupdate.serving.backends import ExternalBackend
    from memupdate.serving.registry import Registry

    model, tok = load_model(tiny_dir)
    family = default_family(model.config.num_hidden_layers)
    get_peft_model(model, family.lora_config(4)).save_pretrained(tmp_path / "adapter")
    registry = Registry(tmp_path / "registry")
    facts = [Fact(prompt=p, target=t) for p, t in FIRST]
    version = registry.publish("kb", tmp_path / "adapter", {"target_fact_recall": 1.0}, facts)
    registry.set_live("kb", version.version)
    measured = {"fact_recall": 1.0, "token_recall": 1.0, "min_prob": 0.9}
    registry.record_probe("kb", True, {"version": 1, "recall": measured, "regressed": False})

    backend = ExternalBackend([NOWHERE], max_lora_rank=8)
    monitor = RecallMonitor(
        registry, backend, lambda f: encode_facts(f, tok, 256), tok, MonitorSettings()
    )
    failures_before = PROBE_FAILURES.labels("kb")._value.get()
    assert monitor.check_replicas() is False
    assert REPLICA_UP.labels(NOWHERE)._value.get() == 0.0
    result = monitor.probe("kb")
    assert "cannot reach" in result["error"]
    assert PROBE_FAILURES.labels("kb")._value.get() == failures_before + 1
    at, last = registry.last_probe("kb")
    assert "error" in last  # recorded as a failed probe ...
    assert registry.last_probe("kb", only_ok=True)[1]["recall"] == measured  # ... not a recall
    scrape = CollectorRegistry()
    scrape.register(KnowledgeBaseCollector(registry))
    text = generate_latest(scrape).decode()
    assert 'memupdate_kb_fact_recall{knowledge_base="kb"} 1.0' in text
    assert 'memupdate_kb_regressed{knowledge_base="kb"} 0.0' in text


# --- vLLM gone during the serving check, then back -------------------------------------------
@pytest.mark.vllm
def test_job_waits_for_vllm_and_goes_live_when_it_returns(tiny_dir, tmp_path):
    from memupdate.serving.vllm_server import ManagedVLLM, ServerConfig

    port = free_port()
    proc = ServiceProcess(
        tmp_path / "data",
        tiny_dir,
        "--vllm-url",
        f"http://127.0.0.1:{port}",
        env={"MEMUPDATE_SERVING_WAIT_S": "600", "MEMUPDATE_PROBE_INTERVAL_S": "0"},
    )
    proc.start()
    vllm = ManagedVLLM(ServerConfig(model=tiny_dir, port=port, max_lora_rank=8))
    try:
        with proc.client() as client:
            job = client.submit("later", FIRST, rank=8, max_steps=1500)
            wait_for(
                lambda: client.job(job.job_id).phase == "waiting_for_serving",
                300,
                "the job to wait for vLLM",
                interval_s=0.5,
            )
            vllm.start()  # the replica comes (back)
            final = client.wait(job.job_id, 600)
            assert final.state == pb.LIVE, final.message
            kinds = [e.kind for e in client.watch(job.job_id)]
            assert kinds.count("waiting_for_serving") >= 1
        for prompt, target in FIRST:
            assert ask(vllm.client.url, "later", prompt).startswith(target)
    finally:
        proc.stop()
        vllm.stop()


# --- SIGKILL during training, publish and the serving check ----------------------------------
def phase_reached(client, job_id: str, phase: str, attempt: int):
    job = client.job(job_id)
    return job.phase == phase and job.attempts == attempt


def still_serving_first_version(proc) -> None:
    with proc.client() as client:
        kb = client.describe("crash")
        assert kb.live_version == 1
        assert all(v.verified == (v.version == 1) for v in kb.versions)
    for prompt, target in FIRST:
        assert ask(proc.vllm_url, "crash", prompt).startswith(target)


@pytest.mark.vllm
def test_sigkill_in_training_publish_and_serving_check_loses_nothing(tiny_dir, tmp_path):
    data = tmp_path / "data"
    registry = data / "registry" / "crash"
    quiet = {"MEMUPDATE_PROBE_INTERVAL_S": "0"}

    def start(**env) -> ServiceProcess:
        return ServiceProcess(data, tiny_dir, env={**quiet, **env}).start()

    proc = start()
    try:
        with proc.client() as client:
            first = client.wait(client.submit("crash", FIRST, rank=8, max_steps=1500).job_id)
            assert first.state == pb.LIVE, first.message
            job_id = client.submit("crash", SECOND, rank=8, max_steps=1500).job_id
            wait_for(lambda: phase_reached(client, job_id, "training", 1), 300, "training")
        proc.kill()  # 1: during training

        proc = start(MEMUPDATE_FAULT_PAUSE="publish:300")
        still_serving_first_version(proc)
        with proc.client() as client:
            assert client.job(first.job_id).state == pb.LIVE
            wait_for(lambda: list(registry.glob(".incoming-*")), 300, "publish to begin")
        proc.kill()  # 2: during publish (files staged, not yet listed)

        # Paused at publish again (30 s), so the retried job cannot list version 2 before the
        # check below: what is checked is the state the crash left.
        # The serving check of version 2 is then held (staged adapter loaded, not yet checked)
        # for the third kill to land inside it.
        proc = start(MEMUPDATE_FAULT_PAUSE="publish:30,serving_check:300")
        assert not list(registry.glob(".incoming-*"))  # swept at start
        still_serving_first_version(proc)
        with proc.client() as client:
            assert [v.version for v in client.describe("crash").versions] == [1]
            wait_for(lambda: phase_reached(client, job_id, "published", 3), 300, "publish")
        proc.kill()  # 3: during the serving check of version 2

        # As above, and the resumed check is held (10 s), so that it cannot make v2 live before
        # this check.
        proc = start(MEMUPDATE_FAULT_PAUSE="publish:30,serving_check:10")
        still_serving_first_version(proc)  # v2 is listed, never verified, never live
        with proc.client() as client:
            assert [v.version for v in client.describe("crash").versions] == [1, 2]
            # The fourth attempt finds the v2 its third one published, and checks that instead
            # of training again: one job, one version.
            final = client.wait(job_id, 600)
            assert final.state == pb.LIVE and final.attempts == 4, final.message
            assert "resumed" in [e.kind for e in client.watch(job_id)]
            kb = client.describe("crash")
            assert kb.live_version == 2 and [v.version for v in kb.versions] == [1, 2]
            assert {j.state for j in client.jobs(knowledge_base="crash")} == {pb.LIVE}
        for prompt, target in [*FIRST, *SECOND]:
            assert ask(proc.vllm_url, "crash", prompt).startswith(target)
    finally:
        proc.stop()
    shutil.rmtree(data, ignore_errors=True)
