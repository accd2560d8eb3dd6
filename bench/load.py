"""Bounded load on loopback: many clients submit, watch and query at once while a job trains.

    cd bench && ../.venv/bin/python load.py [--clients 64] [--seconds 60]

Starts a real `memupdate serve` (tiny model; the vLLM URL points nowhere, so jobs stop at the
serving check) with a small queue and watch limit, starts one long training job, then runs
`--clients` threads, each with its own channel, doing a mix of GetJob (70%), ListJobs (10%),
SubmitUpdate (10%) and WatchJob (10%) with a 5 s deadline per call. It checks the promises
(every call answered in time or refused with RESOURCE_EXHAUSTED, no job lost or run twice,
health SERVING throughout, server memory bounded) and prints requests per second and GetJob
latency percentiles, against a baseline measured in the same run: GetJob from one client while
nothing trains. tests/test_load.py runs it small and asserts the promises.
"""

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from service_process import ServiceProcess, free_port  # noqa: E402

from memupdate.memory.fact_sets import phonebook_facts  # noqa: E402
from memupdate.v1 import memupdate_pb2 as pb  # noqa: E402

DEADLINE_S = 5.0
ALLOWED = {"OK", "RESOURCE_EXHAUSTED"}


@dataclass
class LoadResult:
    seconds: float
    codes: Counter = field(default_factory=Counter)  # (operation, status code name) -> calls
    status_latencies: list[float] = field(default_factory=list)
    submitted: set[str] = field(default_factory=set)
    health: Counter = field(default_factory=Counter)
    rss_mb: list[float] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.codes.values())

    def unexpected(self) -> dict:
        return {k: v for k, v in self.codes.items() if k[1] not in ALLOWED}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def start_service(folder: Path, tiny_dir: Path) -> ServiceProcess:
    nowhere = f"http://127.0.0.1:{free_port()}"
    env = {
        "MEMUPDATE_SERVING_WAIT_S": "0",
        "MEMUPDATE_MAX_QUEUED_JOBS": "20",
        "MEMUPDATE_MAX_WATCH_STREAMS": "16",
        "MEMUPDATE_PROBE_INTERVAL_S": "0",
    }
    return ServiceProcess(folder / "data", tiny_dir, "--vllm-url", nowhere, env=env).start()


def start_training(proc: ServiceProcess) -> str:
    """A job that trains for longer than the load lasts."""
    facts = [(f.prompt, f.target) for f in phonebook_facts(80, seed=7)]
    with proc.client() as client:
        job = client.submit("trains", facts, rank=8, max_steps=1_000_000, max_seconds=3600)
        deadline = time.monotonic() + 120
        while client.job(job.job_id).phase != "training" and time.monotonic() < deadline:
            time.sleep(0.2)
    return job.job_id


def status_baseline(proc: ServiceProcess, job_id: str, calls: int = 200) -> list[float]:
    with proc.client() as client:
        latencies = []
        for _ in range(calls):
            t0 = time.perf_counter()
            client.stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=DEADLINE_S)
            latencies.append(time.perf_counter() - t0)
    return latencies


def one_client(proc, job_ids: list[str], stop: threading.Event, result: LoadResult, lock, seed):
    rng = random.Random(seed)
    with proc.client(retries=0) as client:
        stub = client.stub
        while not stop.is_set():
            op = rng.choices(["status", "list", "submit", "watch"], [70, 10, 10, 10])[0]
            code, events = "OK", 0
            t0 = time.perf_counter()
            try:
                if op == "status":
                    stub.GetJob(pb.GetJobRequest(job_id=rng.choice(job_ids)), timeout=DEADLINE_S)
                elif op == "list":
                    stub.ListJobs(pb.ListJobsRequest(page_size=20), timeout=DEADLINE_S)
                elif op == "submit":
                    fact = pb.Fact(prompt=f"Load fact {seed}-{rng.random()} is", target=" 42")
                    job = stub.SubmitUpdate(
                        pb.SubmitUpdateRequest(
                            knowledge_base=f"load-{seed % 8}",
                            facts=[fact],
                            target_fact_recall=1.0,
                            max_steps=2,
                        ),
                        timeout=DEADLINE_S,
                    )
                    with lock:
                        result.submitted.add(job.job_id)
                        job_ids.append(job.job_id)
                else:  # a few events of a job (all of a finished one), then hang up
                    stream = stub.WatchJob(
                        pb.WatchJobRequest(job_id=rng.choice(job_ids)), timeout=DEADLINE_S
                    )
                    for events, _ in enumerate(stream, start=1):
                        if events >= 4:
                            stream.cancel()
                            break
            except grpc.RpcError as err:
                code = err.code().name
                # A watch is answered once its first event arrives; ending it later, by
                # hanging up or by its deadline on a job that is still queued, is ours.
                if op == "watch" and code in ("CANCELLED", "DEADLINE_EXCEEDED") and events:
                    code = "OK"
            elapsed = time.perf_counter() - t0
            with lock:
                result.codes[(op, code)] += 1
                if op == "status" and code == "OK":
                    result.status_latencies.append(elapsed)


def run_load(proc: ServiceProcess, job_id: str, clients: int, seconds: float) -> LoadResult:
    import psutil

    server = psutil.Process(proc.process.pid)
    result = LoadResult(seconds)
    result.rss_mb.append(server.memory_info().rss / 2**20)
    stop, lock = threading.Event(), threading.Lock()
    job_ids = [job_id]

    def watch_health():
        with proc.client(retries=0) as client:
            while not stop.wait(0.5):
                try:
                    result.health[client.health()] += 1
                except grpc.RpcError as err:
                    result.health[err.code().name] += 1
                result.rss_mb.append(server.memory_info().rss / 2**20)

    threads = [
        threading.Thread(target=one_client, args=(proc, job_ids, stop, result, lock, i))
        for i in range(clients)
    ] + [threading.Thread(target=watch_health)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return result


def check_jobs(proc: ServiceProcess, result: LoadResult, job_id: str) -> list[str]:
    """Promises about jobs: none lost, none run twice; the training job trained throughout."""
    problems = []
    with proc.client() as client:
        jobs = {j.job_id: j for j in client.jobs(page_size=500)}
        lost = result.submitted - set(jobs)
        if lost:
            problems.append(f"{len(lost)} accepted job(s) missing")
        twice = [j.job_id for j in jobs.values() if j.attempts > 1]
        if twice:
            problems.append(f"job(s) started more than once: {twice}")
        if jobs[job_id].state != pb.RUNNING or jobs[job_id].phase != "training":
            problems.append("the training job was not training throughout")
    return problems


def report(result: LoadResult, baseline: list[float] | None, clients: int) -> None:
    lat = result.status_latencies
    print(f"{clients} clients for {result.seconds:.0f} s while a job trains:")
    print(f"  requests: {result.requests} ({result.requests / result.seconds:.0f}/s)")
    for (op, code), n in sorted(result.codes.items()):
        print(f"    {op:7s} {code:20s} {n}")
    print(
        f"  GetJob latency: p50 {1000 * percentile(lat, 0.5):.1f} ms, "
        f"p95 {1000 * percentile(lat, 0.95):.1f} ms, p99 {1000 * percentile(lat, 0.99):.1f} ms"
    )
    if baseline:
        base_p50 = statistics.median(baseline)
        print(
            f"  baseline (1 client, nothing training): p50 {1000 * base_p50:.1f} ms; "
            f"loaded/baseline p50 = {percentile(lat, 0.5) / base_p50:.1f}, "
            f"p99 = {percentile(lat, 0.99) / percentile(baseline, 0.99):.1f}"
        )
    print(f"  health answers: {dict(result.health)}")
    print(
        f"  server RSS: {result.rss_mb[0]:.0f} MB before, max {max(result.rss_mb):.0f} MB "
        f"during (+{max(result.rss_mb) - result.rss_mb[0]:.0f} MB)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    from memupdate.memory.tiny_model import prepare_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        proc = start_service(Path(tmp), prepare_tiny_model())
        try:
            with proc.client() as client:  # the baseline: no training, one client
                idle = client.submit("idle", [("Idle fact is", " 1")], max_steps=2).job_id
                client.wait(idle, 120)
            baseline = status_baseline(proc, idle)
            job_id = start_training(proc)
            result = run_load(proc, job_id, args.clients, args.seconds)
            problems = check_jobs(proc, result, job_id)
            report(result, baseline, args.clients)
            if result.unexpected():
                problems.append(f"unexpected answers: {result.unexpected()}")
            if set(result.health) != {"SERVING"}:
                problems.append(f"health not always SERVING: {dict(result.health)}")
            print("promises kept" if not problems else f"PROBLEMS: {problems}")
            return 1 if problems else 0
        finally:
            proc.stop()


if __name__ == "__main__":
    sys.exit(main())
