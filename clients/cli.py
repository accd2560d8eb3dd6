"""`memupdate-client`: post knowledge updates and follow them to live.

    memupdate-client submit KB facts.jsonl --target-recall 0.99 --watch
    memupdate-client status JOB_ID | KB
    memupdate-client jobs [--kb KB] [--state live]
    memupdate-client kbs | plan KB facts.jsonl | eval KB [facts.jsonl] | rollback KB | cancel JOB
    memupdate-client probe KB | republish KB
Server address: --server or MEMUPDATE_SERVER (default 127.0.0.1:50051); token: --token or
MEMUPDATE_TOKEN; TLS: --ca-cert FILE.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import grpc

from clients.client import MemupdateClient
from memupdate.memory.facts import FactError, load_facts
from memupdate.v1 import memupdate_pb2 as pb


def _facts(path: str) -> list[dict]:
    return [f.to_json() for f in load_facts(path)]


def _recall(r: pb.RecallReport) -> str:
    greedy = f"; greedy exact {r.greedy_exact}/{r.greedy_checked}" if r.greedy_checked else ""
    forms = ", ".join(f"{f.form} {f.fact_recall:.3f} of {f.facts}" for f in r.forms)
    return (
        f"fact recall {r.fact_recall:.3f}, token recall {r.token_recall:.3f}, lowest p "
        f"{r.min_probability:.3f} ({r.min_probability_fact}){greedy}"
        + (f"\n    by form: {forms}" if forms else "")
    )


def _print_job(job: pb.Job) -> None:
    print(
        f"job {job.job_id}  {job.knowledge_base}  {pb.JobState.Name(job.state)}"
        f"{'  ' + job.phase if job.phase else ''}  attempts {job.attempts}"
    )
    if job.message:
        print(f"  {job.message}")
    if job.HasField("plan"):
        p = job.plan
        print(
            f"  plan: ℓ={p.sequence_length_tokens} tokens, {p.facts} facts, rank {p.rank} "
            f"({p.adapter_parameters:,} parameters)"
        )
    if job.HasField("serving_recall"):
        print(f"  serving: {_recall(job.serving_recall)}")


def _locality(loc: pb.Locality) -> str:
    return (
        f"token agreement with the base {loc.token_agreement:.3f}, "
        f"{loc.prompts_unchanged:.2f} of {loc.prompts} general prompts answered unchanged"
    )


def _print_probe(probe: pb.RecallProbe) -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(probe.unix_seconds))
    head = f"  last probe ({probe.source}, v{probe.version}, {when}):"
    if not probe.reached_serving:
        print(f"{head} FAILED, vLLM not measured: {probe.reason}")
        return
    print(f"{head} {_recall(probe.recall)}")
    if probe.HasField("locality"):
        print(f"  locality: {_locality(probe.locality)}")
    if probe.regressed:
        print(f"  REGRESSION: {probe.reason}")
        for f in probe.flipped:
            print(f"    {f.fact}: lowest p {f.min_probability:.3f}  {f.prompt!r}")


def _print_kb(kb: pb.KnowledgeBase) -> None:
    print(f"{kb.name}: live version {kb.live_version or '-'}, {kb.facts} facts")
    if kb.live_version:
        print(
            f"  target fact recall {kb.target_fact_recall:.3f}, "
            f"verified at go-live {kb.verified_fact_recall:.3f}"
        )
    if kb.HasField("verified_locality"):
        print(f"  locality at go-live: {_locality(kb.verified_locality)}")
    if kb.HasField("last_probe"):
        _print_probe(kb.last_probe)
    for v in kb.versions:
        print(f"  v{v.version} rank {v.rank} {'verified' if v.verified else ''}")


def _watch(client: MemupdateClient, job_id: str) -> pb.Job:
    from tqdm import tqdm

    bar = None
    for event in client.watch(job_id):
        if event.kind == "training":
            p = event.progress
            if bar is None:
                bar = tqdm(total=p.max_steps, unit="step", desc="training")
            bar.update(p.step - bar.n)
            bar.set_postfix(
                epoch=p.epoch,
                active=p.active_facts,
                fact_recall=f"{p.fact_recall:.3f}",
                left="?" if p.eta_seconds < 0 else f"~{p.eta_seconds:.0f}s",
            )
            continue
        if bar is not None:
            bar.close()
            bar = None
        line = f"[{event.kind}]"
        if event.kind == "planned":
            pl = event.plan
            predicted = (
                "no law"
                if pl.predicted_fact_recall < 0
                else f"predicted fact recall {pl.predicted_fact_recall:.3f}"
            )
            line += (
                f" ℓ={pl.sequence_length_tokens} tokens, rank {pl.rank} "
                f"({pl.adapter_parameters:,} parameters), {predicted}, "
                f"at most {pl.training_steps} steps"
            )
        if event.HasField("recall"):
            line += f" {_recall(event.recall)}"
        if event.version:
            line += f" version {event.version}"
        if event.message:
            line += f" {event.message}"
        print(line, flush=True)
    return client.job(job_id)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memupdate-client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--server", default=os.environ.get("MEMUPDATE_SERVER", "127.0.0.1:50051"))
    parser.add_argument("--token", default=os.environ.get("MEMUPDATE_TOKEN"))
    parser.add_argument("--ca-cert", help="PEM file to trust for TLS")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline per call (s)")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit")
    s.add_argument("kb")
    s.add_argument("facts")
    s.add_argument("--target-recall", type=float, default=1.0)
    s.add_argument("--rank", type=int, default=0)
    s.add_argument("--max-steps", type=int, default=0)
    s.add_argument("--idempotency-key")
    s.add_argument("--watch", action="store_true")
    p = sub.add_parser("plan")
    p.add_argument("kb")
    p.add_argument("facts")
    p.add_argument("--target-recall", type=float, default=1.0)
    st = sub.add_parser("status")
    st.add_argument("what", help="a job id or a knowledge base name")
    j = sub.add_parser("jobs")
    j.add_argument("--kb", default="")
    j.add_argument("--state", choices=["queued", "running", "live", "failed", "cancelled"])
    sub.add_parser("kbs")
    e = sub.add_parser("eval")
    e.add_argument("kb")
    e.add_argument("facts", nargs="?")
    r = sub.add_parser("rollback")
    r.add_argument("kb")
    for name in ("probe", "republish"):
        sub.add_parser(name).add_argument("kb")
    c = sub.add_parser("cancel")
    c.add_argument("job_id")
    w = sub.add_parser("watch")
    w.add_argument("job_id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    ca = Path(args.ca_cert).read_bytes() if args.ca_cert else None
    client = MemupdateClient(args.server, args.token, ca, timeout_s=args.timeout)
    try:
        return _run(client, args)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 2
    except FactError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        client.close()


def _run(client: MemupdateClient, args) -> int:
    if args.command == "submit":
        job = client.submit(
            args.kb,
            _facts(args.facts),
            args.target_recall,
            rank=args.rank,
            max_steps=args.max_steps,
            idempotency_key=args.idempotency_key,
        )
        print(f"job {job.job_id} queued for {args.kb}", flush=True)
        if args.watch:
            job = _watch(client, job.job_id)
            _print_job(job)
            return 0 if job.state == pb.LIVE else 3
        return 0
    if args.command == "plan":
        pl = client.plan(args.kb, _facts(args.facts), args.target_recall)
        print(
            f"ℓ={pl.sequence_length_tokens} tokens over {pl.facts} facts "
            f"({pl.replaced_facts} replaced); rank {pl.rank} ({pl.adapter_parameters:,} "
            f"parameters); predicted fact recall "
            f"{'n/a' if pl.predicted_fact_recall < 0 else f'{pl.predicted_fact_recall:.3f}'};"
            f" at most {pl.training_steps} training steps, est. "
            f"{pl.estimated_train_seconds:.0f} s; law: {pl.law}"
        )
        return 0
    if args.command == "status":
        try:
            _print_job(client.job(args.what))
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            _print_kb(client.describe(args.what))
        return 0
    if args.command == "probe":
        probe = client.probe(args.kb)
        _print_probe(probe)
        return 3 if probe.regressed or not probe.reached_serving else 0
    if args.command == "republish":
        _print_kb(client.republish(args.kb))
        return 0
    if args.command == "jobs":
        state = getattr(pb, args.state.upper()) if args.state else 0
        for job in client.jobs(args.kb, state):
            print(
                f"{job.job_id}  {job.knowledge_base:20s} {pb.JobState.Name(job.state):9s} "
                f"{job.message}"
            )
        return 0
    if args.command == "kbs":
        for kb in client.knowledge_bases():
            print(
                f"{kb.name}: live v{kb.live_version or '-'}, {kb.facts} facts, "
                f"{len(kb.versions)} version(s)"
            )
        return 0
    if args.command == "eval":
        print(_recall(client.evaluate(args.kb, _facts(args.facts) if args.facts else ())))
        return 0
    if args.command == "rollback":
        kb = client.rollback(args.kb)
        print(f"{kb.name}: version {kb.live_version} is live again")
        return 0
    if args.command == "cancel":
        _print_job(client.cancel(args.job_id))
        return 0
    if args.command == "watch":
        _print_job(_watch(client, args.job_id))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
