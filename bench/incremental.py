"""Incremental updates through the service: what adding 10 facts costs as the base grows.

For each base size it builds a knowledge base of that many facts of one kind (`--kind`),
then submits 10 new facts and times that update from submit to live (training, publish, the
serving check of every fact through vLLM): a warm start from the live adapter (the service's
default). In the same run, the old way for comparison: the base and the 10 new facts trained
from a fresh adapter into a new knowledge base, which is what every update cost before warm
starts. Then `--sequential` updates of 10 facts each into one knowledge base, and a greedy check
through vLLM of every fact at the end. With `--adapter-per-update` (and `--gate`) the service
trains each update's facts into an adapter of their own instead of warm-starting the whole base.

    .venv/bin/python bench/incremental.py [--bases 0,100,300,1000] [--sequential 30] [--rank 0]
        [--kind phonebook|biography|counterfactual] [--gate [--adapter-per-update]]
        [--build-in N]  (build each base in updates of N facts: one adapter each, per update)
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from openai_api import ask  # noqa: E402
from service_process import ServiceProcess  # noqa: E402

from memupdate.memory.base_model import prepare_default_model  # noqa: E402
from memupdate.memory.fact_sets import KINDS  # noqa: E402
from memupdate.v1 import memupdate_pb2 as pb  # noqa: E402


def pairs(facts):
    return [(f.prompt, f.target) for f in facts]


def update(client, kb, facts, rank) -> tuple[float, pb.Job, list]:
    start = time.monotonic()
    job = client.submit(kb, pairs(facts), rank=rank, max_steps=20000)
    events = list(client.watch(job.job_id))
    job = client.job(job.job_id)
    if job.state != pb.LIVE:
        raise SystemExit(
            f"{kb}: job {job.job_id} ended {pb.JobState.Name(job.state)}: {job.message}"
        )
    return time.monotonic() - start, job, events


def start_of(events) -> str:
    """How the job's training started (fresh or warm, and why), from its planned event."""
    return next(e.message for e in events if e.kind == "planned")


def phases(events) -> str:
    first = events[0].unix_seconds
    return ", ".join(
        f"{e.kind} {e.unix_seconds - first:.0f}s" for e in events if e.kind != "training"
    )


def run_bases(service, bases, fresh_bases, rank, kind, build_in=0) -> tuple[dict, dict]:
    """Seconds to add 10 facts to each base: warm (an update of the live base) and fresh (the
    same facts, base and new, trained from a fresh adapter into a new knowledge base: what every
    update cost before warm starts)."""
    warm, fresh = {}, {}
    with service.client(timeout_s=120) as client:
        for size in bases:
            everything = KINDS[kind](size + 10, seed=7000 + size)
            step = build_in or size
            for done in range(0, size, step):  # the base, in updates of `build_in` facts
                chunk = everything[done : min(size, done + step)]
                built, _, events = update(client, f"base-{size}", chunk, rank)
                print(
                    f"  built base-{size} {done + len(chunk)}/{size}: {built:.0f} s "
                    f"({phases(events)})",
                    flush=True,
                )
            warm[size], _, events = update(client, f"base-{size}", everything[size:], rank)
            print(
                f"  warm  +10 to {size:4d}: {warm[size]:6.1f} s ({phases(events)}); "
                f"{start_of(events)}"
            )
            if size in fresh_bases:
                fresh[size], _, events = update(client, f"fresh-{size}", everything, rank)
                print(f"  fresh +10 to {size:4d}: {fresh[size]:6.1f} s ({phases(events)})")
    return warm, fresh


def sequential(model, work: Path, count: int, rank: int, kind: str, flags: list[str]) -> None:
    env = {"MEMUPDATE_PROBE_INTERVAL_S": "0"}
    service = ServiceProcess(work / "sequential", model, "--max-lora-rank", "32", *flags, env=env)
    service.start()
    try:
        facts = KINDS[kind](10 * count, seed=9100)
        with service.client(timeout_s=120) as client:
            total, took_each = time.monotonic(), []
            for i in range(count):
                took, job, events = update(client, "seq", facts[10 * i : 10 * i + 10], rank)
                took_each.append(took)
                print(
                    f"  update {i + 1:2d}/{count}: {took:5.1f} s, version {job.version} "
                    f"({phases(events)}); {start_of(events)}",
                    flush=True,
                )
            total = time.monotonic() - total
        exact = sum(
            ask(service.vllm_url, "seq", f.prompt, len(f.target) + 4).startswith(f.target)
            for f in facts
        )
        print(
            f"{count} sequential updates of 10 facts in {total:.0f} s; the last took "
            f"{took_each[-1] / took_each[0]:.2f}x the first, the slowest "
            f"{max(took_each) / took_each[0]:.2f}x; greedy through vLLM at the end: "
            f"{exact}/{len(facts)} facts reproduced"
        )
    finally:
        service.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bases", default="0,100,300,1000")
    p.add_argument("--fresh-bases", default="0,100,300", help="bases also timed the old way")
    p.add_argument(
        "--build-in", type=int, default=0, help="build each base in updates of N facts (0: one)"
    )
    p.add_argument("--sequential", type=int, default=30)
    p.add_argument("--rank", type=int, default=0, help="0: the law chooses (the default path)")
    p.add_argument("--kind", default="phonebook", choices=sorted(KINDS))
    p.add_argument("--gate", action="store_true", help="run the service with --gate")
    p.add_argument(
        "--adapter-per-update", action="store_true", help="and with --adapter-per-update"
    )
    args = p.parse_args()
    flags = ["--gate"] if args.gate else []
    flags += ["--adapter-per-update"] if args.adapter_per_update else []
    model = prepare_default_model()
    bases = [int(b) for b in args.bases.split(",") if b]
    fresh_bases = {int(b) for b in args.fresh_bases.split(",") if b}
    with tempfile.TemporaryDirectory(prefix="memupdate-incremental-") as tmp:
        work = Path(tmp)
        env = {"MEMUPDATE_PROBE_INTERVAL_S": "0"}
        warm, fresh = {}, {}
        if bases:
            service = ServiceProcess(
                work / "bases", model, "--max-lora-rank", "32", *flags, env=env
            )
            service.start()
            try:
                warm, fresh = run_bases(
                    service, bases, fresh_bases, args.rank, args.kind, args.build_in
                )
            finally:
                service.stop()
            print(f"\nadding 10 facts, seconds from submit to live (rank {args.rank}):")
        for size in bases:
            first = bases[0]
            line = f"  base {size:4d}: warm {warm[size]:6.1f} s ({warm[size] / warm[first]:.2f}x)"
            if size in fresh and first in fresh:
                line += (
                    f"; fresh {fresh[size]:6.1f} s ({fresh[size] / fresh[first]:.2f}x); "
                    f"warm/fresh {warm[size] / fresh[size]:.2f}"
                )
            print(line)
        if args.sequential:
            sequential(model, work, args.sequential, args.rank, args.kind, flags)


if __name__ == "__main__":
    main()
