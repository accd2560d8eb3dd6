"""A typed Python client for the memupdate gRPC service.

    client = MemupdateClient("127.0.0.1:50051")
    job = client.submit("news", [{"prompt": "Velmora's capital is", "target": " Port Castrel"}])
    for event in client.watch(job.job_id):
        print(event.kind)

Every call has a deadline. Idempotent calls are retried with backoff on UNAVAILABLE; `submit`
always carries an idempotency key (one is made up if you give none), so it is retried safely too.
"""

import time
import uuid
from collections.abc import Iterable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memupdate.v1 import memupdate_pb2 as pb
from memupdate.v1 import memupdate_pb2_grpc as pb_grpc

ENDED = (pb.LIVE, pb.FAILED, pb.CANCELLED)
FactLike = dict | tuple | pb.Fact


def to_fact(fact: FactLike) -> pb.Fact:
    if isinstance(fact, pb.Fact):
        return fact
    if isinstance(fact, tuple):
        return pb.Fact(prompt=fact[0], target=fact[1])
    if hasattr(fact, "to_json"):  # memupdate.memory.facts.Fact
        fact = fact.to_json()
    return pb.Fact(**fact)


class MemupdateClient:
    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout_s: float = 30.0,
        retries: int = 4,
    ):
        options = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates)
            self.channel = grpc.secure_channel(target, creds, options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.stub = pb_grpc.KnowledgeUpdateStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout_s = timeout_s
        self.retries = retries

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "MemupdateClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, retry: bool = True):
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                return method(request, timeout=self.timeout_s, metadata=self.metadata)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                    raise
                time.sleep(min(0.25 * 2**attempt, 4.0))

    # --- updates ------------------------------------------------------------------------
    def submit(
        self,
        knowledge_base: str,
        facts: Iterable[FactLike],
        target_fact_recall: float = 1.0,
        rank: int = 0,
        margin: float = 0.0,
        max_steps: int = 0,
        max_seconds: float = 0.0,
        idempotency_key: str | None = None,
    ) -> pb.Job:
        request = pb.SubmitUpdateRequest(
            knowledge_base=knowledge_base,
            facts=[to_fact(f) for f in facts],
            target_fact_recall=target_fact_recall,
            rank_override=rank,
            margin=margin,
            max_steps=max_steps,
            max_seconds=max_seconds,
            idempotency_key=idempotency_key or uuid.uuid4().hex,
        )
        return self._call(self.stub.SubmitUpdate, request)

    def plan(
        self, knowledge_base: str, facts: Iterable[FactLike], target_fact_recall: float = 1.0
    ) -> pb.Plan:
        return self._call(
            self.stub.PlanUpdate,
            pb.PlanUpdateRequest(
                knowledge_base=knowledge_base,
                facts=[to_fact(f) for f in facts],
                target_fact_recall=target_fact_recall,
            ),
        )

    # --- jobs ---------------------------------------------------------------------------
    def job(self, job_id: str) -> pb.Job:
        return self._call(self.stub.GetJob, pb.GetJobRequest(job_id=job_id))

    def jobs(
        self, knowledge_base: str = "", state: int = 0, page_size: int = 50
    ) -> Iterator[pb.Job]:
        token = ""
        while True:
            page = self._call(
                self.stub.ListJobs,
                pb.ListJobsRequest(
                    knowledge_base=knowledge_base,
                    state=state,
                    page_size=page_size,
                    page_token=token,
                ),
            )
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def cancel(self, job_id: str) -> pb.Job:
        return self._call(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id))

    def watch(self, job_id: str) -> Iterator[pb.JobEvent]:
        """Every event of the job, then new ones, until it ends. Reconnects on UNAVAILABLE
        and resumes after the last event seen."""
        seen = 0
        for attempt in range(self.retries + 1):
            try:
                for event in self.stub.WatchJob(
                    pb.WatchJobRequest(job_id=job_id), metadata=self.metadata
                ):
                    if event.sequence > seen:
                        seen = event.sequence
                        yield event
                return
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise
                time.sleep(min(0.25 * 2**attempt, 4.0))

    def wait(self, job_id: str, timeout_s: float = 3600.0) -> pb.Job:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.state in ENDED:
                return job
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not end within {timeout_s:.0f} s")

    # --- knowledge bases ----------------------------------------------------------------
    def knowledge_bases(self) -> list[pb.KnowledgeBase]:
        return list(
            self._call(self.stub.ListKnowledgeBases, pb.ListKnowledgeBasesRequest()).knowledge_bases
        )

    def describe(self, knowledge_base: str) -> pb.KnowledgeBase:
        return self._call(
            self.stub.DescribeKnowledgeBase,
            pb.DescribeKnowledgeBaseRequest(knowledge_base=knowledge_base),
        )

    def evaluate(self, knowledge_base: str, facts: Iterable[FactLike] = ()) -> pb.RecallReport:
        return self._call(
            self.stub.EvaluateRecall,
            pb.EvaluateRecallRequest(
                knowledge_base=knowledge_base, facts=[to_fact(f) for f in facts]
            ),
        )

    def rollback(self, knowledge_base: str) -> pb.KnowledgeBase:
        return self._call(
            self.stub.Rollback, pb.RollbackRequest(knowledge_base=knowledge_base), retry=False
        )

    def probe(self, knowledge_base: str) -> pb.RecallProbe:
        """Measure the live version's recall through vLLM now."""
        return self._call(
            self.stub.ProbeRecall, pb.ProbeRecallRequest(knowledge_base=knowledge_base)
        )

    def republish(self, knowledge_base: str) -> pb.KnowledgeBase:
        """Load the live version on every replica again, after checking its recall there."""
        return self._call(
            self.stub.Republish, pb.RepublishRequest(knowledge_base=knowledge_base), retry=False
        )

    def delete(self, knowledge_base: str) -> None:
        self._call(
            self.stub.DeleteKnowledgeBase,
            pb.DeleteKnowledgeBaseRequest(knowledge_base=knowledge_base),
            retry=False,
        )

    def health(self) -> str:
        response = self._call(self.health_stub.Check, health_pb2.HealthCheckRequest())
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
