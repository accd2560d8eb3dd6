"""Scale-out on one machine: jobs per hour with one and with two `memupdate worker` processes on
one Postgres queue, and queue-claim latency under 50 concurrent submitters.

    cd bench && ../.venv/bin/python scale_out.py [--jobs 6] [--model FOLDER] [--submitters 50]

Throughput: for 1 and then 2 workers, a fresh Postgres database, shared registry folder, vLLM
replica and `memupdate serve --workers 0`; `--jobs` updates (three phonebook facts each, one
knowledge base each, so they may run side by side) are submitted at once and timed from the
first submit to the last job live. Both runs get the same core budget: each worker's torch uses
cores / workers threads. On this 2-core machine the two workers share the cores the single one
had (and the replica's serving checks), so the ratio says how much one job's waiting (loading,
serving checks, database) overlaps another's training, not what a second host would add.

Claim latency: two claimers take jobs from the queue (claim, then end it; no training) while
`--submitters` threads submit updates through the gRPC server as fast as it answers; the
baseline is the same claimers on a queue filled beforehand, with no submitters, in the same run.
"""

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postgres_server import PostgresServer  # noqa: E402
from service_process import ServiceProcess, WorkerProcess, free_port  # noqa: E402

from memupdate.memory.base_model import prepare_default_model  # noqa: E402
from memupdate.memory.fact_sets import phonebook_facts  # noqa: E402
from memupdate.service.jobs import LIVE, JobStore  # noqa: E402
from memupdate.serving.vllm_server import ManagedVLLM, ServerConfig  # noqa: E402
from memupdate.v1 import memupdate_pb2 as pb  # noqa: E402


def new_database(pg: PostgresServer, name: str) -> str:
    import psycopg

    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg.url.rsplit("/", 1)[0] + f"/{name}"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def jobs_per_hour(pg, model: Path, workers: int, jobs: int, folder: Path) -> tuple[float, list]:
    """(jobs per hour, final jobs) with `workers` worker processes on a fresh queue."""
    url = new_database(pg, f"throughput_{workers}")
    shared = folder / f"registry-{workers}"
    shared.mkdir()
    env = {"MEMUPDATE_REGISTRY": str(shared), "MEMUPDATE_DATABASE_URL": url}
    replica = ManagedVLLM(
        ServerConfig(model=model, max_lora_rank=8, extra_env=env),
        log_path=folder / f"replica-{workers}.log",
    )
    started: list = [replica]
    try:
        replica.start()
        flags = ["--database-url", url, "--registry-dir", str(shared)]
        flags += ["--vllm-url", replica.client.url]
        quiet = {"MEMUPDATE_PROBE_INTERVAL_S": "0"}
        server = ServiceProcess(folder / f"server-{workers}", model, "--workers", "0", *flags)
        server.env.update(quiet)
        started.append(server.start())
        threads = str(max(1, (os.cpu_count() or 2) // workers))
        for i in range(workers):
            env_i = {**quiet, "OMP_NUM_THREADS": threads}
            worker = WorkerProcess(folder / f"worker-{workers}-{i}", model, *flags, env=env_i)
            started.append(worker.start())
        with server.client() as client:
            t0 = time.monotonic()
            ids = []
            for j in range(jobs):
                facts = [(f.prompt, f.target) for f in phonebook_facts(3, seed=900 + j)]
                ids.append(client.submit(f"kb{j}", facts).job_id)
            finals = [client.wait(i, 3600) for i in ids]
            seconds = time.monotonic() - t0
        return jobs / seconds * 3600, finals
    finally:
        for thing in reversed(started):
            thing.stop()


def claim_latency(pg, model: Path, submitters: int, seconds: float, folder: Path) -> dict:
    """Claim-call and queue-wait latencies with and without concurrent submitters."""
    url = new_database(pg, "claims")
    nowhere = f"http://127.0.0.1:{free_port()}"  # no training happens: no replica needed
    server = ServiceProcess(
        folder / "server-claims",
        model,
        "--workers",
        "0",
        "--database-url",
        url,
        "--vllm-url",
        nowhere,
        env={"MEMUPDATE_PROBE_INTERVAL_S": "0", "MEMUPDATE_MAX_QUEUED_JOBS": "1000000"},
    ).start()
    store = JobStore(url)
    facts = [(f.prompt, f.target) for f in phonebook_facts(1, seed=5)]

    def drain(stop: threading.Event, calls: list, waits: list, name: str) -> None:
        while True:
            t0 = time.monotonic()
            job = store.claim_next(name, lease_s=60)
            if job is None:
                if stop.is_set():
                    return
                time.sleep(0.001)
                continue
            calls.append(time.monotonic() - t0)
            waits.append(time.time() - job.created_at)
            store.finish(job.id, LIVE, "claimed by the benchmark", owner=name)

    def measure(with_submitters: bool) -> dict:
        calls, waits, submits = [], [], []
        stop, submitting = threading.Event(), threading.Event()
        if not with_submitters:  # the baseline: the same number of jobs, queued beforehand
            with server.client() as client:
                for i in range(200):
                    client.submit(f"base{i % submitters}", facts)
        claimers = [
            threading.Thread(target=drain, args=(stop, calls, waits, f"claimer-{i}"))
            for i in range(2)
        ]

        def submit(i: int) -> None:
            with server.client() as client:
                while submitting.is_set():
                    t0 = time.monotonic()
                    client.submit(f"load{i}", facts)
                    submits.append(time.monotonic() - t0)

        senders = [threading.Thread(target=submit, args=(i,)) for i in range(submitters)]
        for t in claimers:
            t.start()
        if with_submitters:
            submitting.set()
            for t in senders:
                t.start()
            time.sleep(seconds)
            submitting.clear()
            for t in senders:
                t.join()
        stop.set()
        for t in claimers:
            t.join()
        return {"calls": calls, "waits": waits, "submits": submits}

    try:
        return {"alone": measure(False), "loaded": measure(True)}
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--jobs", type=int, default=6)
    p.add_argument("--submitters", type=int, default=50)
    p.add_argument("--seconds", type=float, default=20.0, help="how long the submitters run")
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args()
    model = Path(args.model) if args.model else prepare_default_model()
    folder = Path(tempfile.mkdtemp(prefix="memupdate-scale-out-"))
    with PostgresServer() as pg:
        if not args.skip_throughput:
            rates = {}
            for workers in (1, 2):
                rate, finals = jobs_per_hour(pg, model, workers, args.jobs, folder)
                failed = [j.message for j in finals if j.state != pb.LIVE]
                print(f"{workers} worker(s): {rate:.0f} jobs/hour ({len(failed)} failed)")
                for message in failed:
                    print(f"  failed: {message}")
                rates[workers] = rate
            print(f"ratio 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")
        result = claim_latency(pg, model, args.submitters, args.seconds, folder)
    for label, r in result.items():
        calls = [x * 1000 for x in r["calls"]]
        waits = [x * 1000 for x in r["waits"]]
        line = (
            f"{label:>6}: {len(calls)} claims, claim call p50 {percentile(calls, 0.5):.1f} ms "
            f"p95 {percentile(calls, 0.95):.1f} ms p99 {percentile(calls, 0.99):.1f} ms"
        )
        if r["submits"]:  # (the baseline's jobs were queued beforehand: no queue wait to tell)
            submits = [x * 1000 for x in r["submits"]]
            line += (
                f"; queue wait p50 {percentile(waits, 0.5):.0f} ms "
                f"p99 {percentile(waits, 0.99):.0f} ms"
                f"; {len(submits)} submits ({len(submits) / args.seconds:.0f}/s), "
                f"submit p50 {statistics.median(submits):.1f} ms "
                f"p99 {percentile(submits, 0.99):.1f} ms"
            )
        print(line)
    ratio = percentile(result["loaded"]["calls"], 0.5) / percentile(result["alone"]["calls"], 0.5)
    print(f"claim call p50 under {args.submitters} submitters / alone: {ratio:.2f}x")


if __name__ == "__main__":
    main()
