"""The KnowledgeUpdate servicer: requests in, jobs and answers out. Training never runs here;
the worker thread does it, so status calls, watches and health stay fast."""

import logging
import threading
import time

import grpc

from memupdate.memory.facts import FactError
from memupdate.memory.law import LawError
from memupdate.memory.routing import encode_by_owner
from memupdate.service import jobs as J
from memupdate.service.metrics import forget_knowledge_base
from memupdate.service.monitor import RecallMonitor
from memupdate.service.runtime import in_passing_thread
from memupdate.service.update import Runtime, UpdateRequest, plan, prepare
from memupdate.serving.backends import rollback, served_forms, verify_and_go_live
from memupdate.serving.probes import worst_fact_recall, worst_locality
from memupdate.serving.registry import RegistryError
from memupdate.serving.vllm_client import ServingError, serving_recall, worst_replica
from memupdate.v1 import memupdate_pb2 as pb
from memupdate.v1 import memupdate_pb2_grpc as pb_grpc
from server.validation import (
    InvalidRequest,
    PlanRequest,
    SubmitUpdate,
    facts_from_proto,
    validated,
)

log = logging.getLogger("memupdate.server")
STATES = {
    J.QUEUED: pb.QUEUED,
    J.RUNNING: pb.RUNNING,
    J.LIVE: pb.LIVE,
    J.FAILED: pb.FAILED,
    J.CANCELLED: pb.CANCELLED,
}
STATE_NAMES = {v: k for k, v in STATES.items()}


def recall_pb(data: dict | None) -> pb.RecallReport | None:
    if not data:
        return None
    rec = data.get("recall", data)
    return pb.RecallReport(
        facts=rec["facts"],
        target_tokens=rec["target_tokens"],
        token_recall=rec["token_recall"],
        fact_recall=rec["fact_recall"],
        min_probability=rec["min_prob"],
        min_probability_fact=rec["min_prob_fact"],
        greedy_checked=data.get("greedy_checked", 0),
        greedy_exact=data.get("greedy_exact", 0),
        forms=[
            pb.FormRecall(form=form, facts=v["facts"], fact_recall=v["fact_recall"])
            for form, v in rec.get("forms", {}).items()
        ],
    )


def plan_pb(data: dict | None, replaced: int = 0, estimate_s: float = 0.0) -> pb.Plan | None:
    if not data:
        return None
    predicted = data.get("predicted_fact_recall")
    return pb.Plan(
        sequence_length_tokens=data["sequence_length"],
        facts=data["facts"],
        rank=data["rank"],
        adapter_parameters=data["adapter_params"],
        predicted_fact_recall=-1.0 if predicted is None else predicted,
        loss_before_nats_per_token=data["loss_before_nats"],
        law=data["law"],
        replaced_facts=replaced,
        estimated_train_seconds=estimate_s,
        training_steps=data.get("training_steps", 0),
    )


def job_pb(job: J.JobRecord) -> pb.Job:
    result = job.result or {}
    return pb.Job(
        job_id=job.id,
        knowledge_base=job.kb,
        state=STATES[job.state],
        phase=job.phase,
        message=job.message,
        plan=plan_pb(result.get("plan"), result.get("replaced", 0)),
        version=result.get("version", 0),
        training_recall=recall_pb(result.get("training_recall")),
        serving_recall=recall_pb(result.get("serving_recall")),
        created_unix_seconds=job.created_at,
        updated_unix_seconds=job.updated_at,
        attempts=job.attempts,
    )


def locality_pb(data: dict | None) -> pb.Locality | None:
    return pb.Locality(**data) if data else None


def probe_pb(at: float, data: dict) -> pb.RecallProbe:
    ok = "recall" in data
    return pb.RecallProbe(
        version=data["version"],
        unix_seconds=at,
        reached_serving=ok,
        recall=recall_pb(data) if ok else None,
        regressed=data.get("regressed", False),
        reason=data.get("reason") or data.get("error", ""),
        flipped=[pb.FlippedFact(**f) for f in data.get("flipped", [])],
        source=data.get("source", ""),
        locality=locality_pb(data.get("locality")),
    )


def event_pb(event: J.Event) -> pb.JobEvent:
    d = event.data
    progress = d.get("progress")
    return pb.JobEvent(
        job_id=event.job_id,
        sequence=event.seq,
        kind=event.kind,
        unix_seconds=event.at,
        message=d.get("message", ""),
        plan=plan_pb(d.get("plan"), d.get("replaced", 0)),
        progress=pb.TrainingProgress(
            step=progress["step"],
            max_steps=progress["max_steps"],
            loss_nats_per_token=progress["loss"],
            token_recall=progress["token_recall"],
            fact_recall=progress["fact_recall"],
            tokens_processed=progress["tokens_processed"],
            elapsed_seconds=progress["seconds"],
            epoch=progress.get("epoch", 0),
            active_facts=progress.get("active_facts", 0),
            eta_seconds=-1.0 if progress.get("eta_seconds") is None else progress["eta_seconds"],
        )
        if progress
        else None,
        recall=recall_pb(d.get("recall")),
        version=d.get("version", 0),
    )


class Servicer(pb_grpc.KnowledgeUpdateServicer):
    def __init__(
        self,
        store: J.JobStore,
        runtime: Runtime,
        plan_runtime: Runtime,
        monitor: RecallMonitor,
        config,
    ):
        self.store = store
        self.rt = runtime
        self.plan_rt = plan_runtime  # its own model copy: planning never waits for training
        self.monitor = monitor
        self.config = config
        self.watch_slots = threading.BoundedSemaphore(config.max_watch_streams)

    # --- helpers ------------------------------------------------------------------------
    def _abort_for(self, context, err: Exception):
        if isinstance(err, InvalidRequest | FactError | LawError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if isinstance(err, RegistryError):
            code = (
                grpc.StatusCode.NOT_FOUND
                if "unknown" in str(err) or "has no" in str(err)
                else grpc.StatusCode.INVALID_ARGUMENT
            )
            context.abort(code, str(err))
        if isinstance(err, ServingError):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"vLLM: {err}")
        if isinstance(err, ValueError):  # e.g. a rank above the serving limit
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        raise err

    def _job_or_404(self, job_id: str, context) -> J.JobRecord:
        job = self.store.get(job_id)
        if job is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id!r}")
        return job

    def _kb_or_404(self, name: str, context):
        try:
            if not self.rt.registry.versions(name):
                context.abort(grpc.StatusCode.NOT_FOUND, f"unknown knowledge base {name!r}")
        except RegistryError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"knowledge_base: {err}")

    def _live_or_412(self, name: str, context):
        live = self.rt.registry.live(name)
        if live is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"knowledge base {name!r} has no live version"
            )
        return live

    def _kb_pb(self, name: str) -> pb.KnowledgeBase:
        live = self.rt.registry.live(name)
        versions = self.rt.registry.versions(name)
        last = self.rt.registry.last_probe(name) if live else None
        return pb.KnowledgeBase(
            name=name,
            live_version=live.version if live else 0,
            facts=len(live.facts()) if live else 0,
            target_fact_recall=live.target_fact_recall if live else 0.0,
            verified_fact_recall=worst_fact_recall(live.serving) if live and live.serving else 0.0,
            last_probe=probe_pb(*last) if last else None,
            verified_locality=locality_pb(worst_locality(live.serving) if live else None),
            versions=[
                pb.Version(
                    version=v.version,
                    rank=v.rank,
                    sha256=v.sha256,
                    verified=bool(v.serving),
                    created_unix_seconds=v.created_at,
                )
                for v in versions
            ],
        )

    # --- RPCs ---------------------------------------------------------------------------
    def SubmitUpdate(self, request, context):
        try:
            facts = facts_from_proto(request.facts, self.config.max_facts_per_update)
            req = validated(
                SubmitUpdate,
                knowledge_base=request.knowledge_base,
                facts=facts,
                target_fact_recall=request.target_fact_recall,
                rank_override=request.rank_override,
                margin=request.margin,
                max_steps=request.max_steps,
                max_seconds=request.max_seconds,
                idempotency_key=request.idempotency_key,
            )
            if req.rank_override:
                self.rt.backend.check_rank(req.rank_override)
            # Contradictions, facts longer than the context, too many facts in the merged
            # base: refused now, not discovered by the worker later.
            prepare(self.plan_rt, UpdateRequest(req.knowledge_base, facts, 1.0))
        except (InvalidRequest, FactError, ValueError) as err:
            self._abort_for(context, err)
        payload = {
            "kb": req.knowledge_base,
            "facts": [f.to_json() for f in facts],
            "target_fact_recall": req.target_fact_recall,
            "rank_override": req.rank_override,
            "margin": req.margin,
            "max_steps": req.max_steps,
            "max_seconds": req.max_seconds,
        }
        try:
            job, created = self.store.create(
                req.knowledge_base,
                payload,
                req.idempotency_key or None,
                self.config.max_queued_jobs,
            )
        except OverflowError as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{err}; retry later")
        if not created and job.request != payload:
            context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"idempotency key {req.idempotency_key!r} was used for another request "
                f"(job {job.id})",
            )
        return job_pb(job)

    def PlanUpdate(self, request, context):
        try:
            facts = facts_from_proto(request.facts, self.config.max_facts_per_update)
            req = validated(
                PlanRequest,
                knowledge_base=request.knowledge_base,
                facts=facts,
                target_fact_recall=request.target_fact_recall,
            )
            # Torch work in a gRPC thread, which lives on, would slow the trainings.
            report, replaced = in_passing_thread(
                plan,
                self.plan_rt,
                UpdateRequest(req.knowledge_base, facts, req.target_fact_recall),
            )
        except (InvalidRequest, FactError, LawError, RegistryError, ValueError) as err:
            self._abort_for(context, err)
        estimate = self.rt.seconds_per_target_token * report.sequence_length
        return plan_pb(report.to_dict(), replaced, estimate)

    def GetJob(self, request, context):
        return job_pb(self._job_or_404(request.job_id, context))

    def ListJobs(self, request, context):
        size = request.page_size or 50
        if size > 500:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size: at most 500")
        after = None
        if request.page_token:
            try:
                at, job_id = request.page_token.split(":", 1)
                after = (float(at), job_id)
            except ValueError:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_token: not one we issued")
        state = STATE_NAMES.get(request.state, "") if request.state else ""
        page = self.store.list_jobs(request.knowledge_base, state, size + 1, after)
        more = len(page) > size
        page = page[:size]
        token = f"{page[-1].created_at!r}:{page[-1].id}" if more else ""
        return pb.ListJobsResponse(jobs=[job_pb(j) for j in page], next_page_token=token)

    def CancelJob(self, request, context):
        self._job_or_404(request.job_id, context)
        return job_pb(self.store.request_cancel(request.job_id))

    def WatchJob(self, request, context):
        self._job_or_404(request.job_id, context)
        if not self.watch_slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.config.max_watch_streams} watch streams are open; poll GetJob or retry "
                "later",
            )
        try:
            seq = 0
            while context.is_active():
                for event in self.store.events(request.job_id, seq):
                    seq = event.seq
                    yield event_pb(event)
                job = self.store.get(request.job_id)
                if job.state in J.ENDED and not self.store.events(request.job_id, seq):
                    return
                self.store.wait_for_change(1.0)
        finally:
            self.watch_slots.release()

    def ListKnowledgeBases(self, request, context):
        return pb.ListKnowledgeBasesResponse(
            knowledge_bases=[self._kb_pb(n) for n in self.rt.registry.knowledge_bases()]
        )

    def DescribeKnowledgeBase(self, request, context):
        self._kb_or_404(request.knowledge_base, context)
        return self._kb_pb(request.knowledge_base)

    def EvaluateRecall(self, request, context):
        self._kb_or_404(request.knowledge_base, context)
        live = self._live_or_412(request.knowledge_base, context)
        try:
            facts = (
                facts_from_proto(request.facts, self.config.max_facts_per_update)
                if request.facts
                else live.facts()
            )
            tok = self.plan_rt.tokenizer
            encoded, names = served_forms(live, facts, self.plan_rt.encode)
            results = [
                serving_recall(c, request.knowledge_base, encoded, tok, names=names)
                for c in self.rt.backend.replicas()
            ]
        except (InvalidRequest, FactError, ServingError) as err:
            self._abort_for(context, err)
        worst = worst_replica(results)
        return recall_pb(worst.to_dict())

    def Rollback(self, request, context):
        self._kb_or_404(request.knowledge_base, context)
        try:
            rollback(self.rt.registry, self.rt.backend, request.knowledge_base)
        except (RegistryError, ServingError) as err:
            if isinstance(err, RegistryError):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
            self._abort_for(context, err)
        self.monitor.probe(request.knowledge_base, "rollback")  # the metrics follow at once
        return self._kb_pb(request.knowledge_base)

    def ProbeRecall(self, request, context):
        self._kb_or_404(request.knowledge_base, context)
        self._live_or_412(request.knowledge_base, context)
        self.monitor.probe(request.knowledge_base, "on-demand")
        return probe_pb(*self.rt.registry.last_probe(request.knowledge_base))

    def Republish(self, request, context):
        self._kb_or_404(request.knowledge_base, context)
        live = self._live_or_412(request.knowledge_base, context)
        try:
            encoded, held_by = encode_by_owner(self.plan_rt.encode, *live.held_facts())
            result = verify_and_go_live(
                self.rt.registry,
                self.rt.backend,
                live,
                encoded,
                self.plan_rt.tokenizer,
                live.target_fact_recall,
                held_by=held_by,
            )
        except ServingError as err:
            self._abort_for(context, err)
        if not result.live:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, result.reason)
        log.info("republished %s v%d: %s", live.kb, live.version, result.reason)
        return self._kb_pb(request.knowledge_base)

    def DeleteKnowledgeBase(self, request, context):
        self._kb_or_404(request.knowledge_base, context)
        kb = request.knowledge_base
        for client in self.rt.backend.replicas():
            try:  # its name and any version name (`kb@vN`) a replica resolved or staged
                for name in client.served_adapters():
                    if name == kb or name.startswith(f"{kb}@v"):
                        client.unload_adapter(name)
            except ServingError:
                pass  # down: once back, its resolver finds no such base any more
        self.rt.registry.delete(request.knowledge_base)
        forget_knowledge_base(request.knowledge_base)
        log.info("deleted knowledge base %s at %s", request.knowledge_base, time.time())
        return pb.DeleteKnowledgeBaseResponse()
