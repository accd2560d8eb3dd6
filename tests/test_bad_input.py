"""Bad input gets a clear error and changes nothing: the README's bad-input table, row by row
(the request-field rows live in tests/test_service.py), plus property-based tests that feed
random fact files and random request messages to the real server."""

import json
import re
import subprocess
import sys
import time

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from service_process import ServiceProcess, free_port

from memupdate.memory.adapter import AdapterMismatch, check_adapter_for_model, default_family
from memupdate.memory.facts import CONTROL_CHARACTERS, FactError, load_facts
from memupdate.v1 import memupdate_pb2 as pb

NOWHERE = f"http://127.0.0.1:{free_port()}"
MAX_FACTS = 50
MAX_MESSAGE_BYTES = 256 * 1024
LIMITS = {
    "MEMUPDATE_MAX_FACTS_PER_UPDATE": str(MAX_FACTS),
    "MEMUPDATE_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
    "MEMUPDATE_MAX_QUEUED_JOBS": "10000",
    "MEMUPDATE_DEFAULT_MAX_STEPS": "2",  # accepted random jobs train briefly, then fail
    "MEMUPDATE_SERVING_WAIT_S": "0",  # at the serving check: no vLLM there
}


@pytest.fixture(scope="module")
def service(tiny_dir, tmp_path_factory):
    proc = ServiceProcess(
        tmp_path_factory.mktemp("bad") / "data", tiny_dir, "--vllm-url", NOWHERE, env=LIMITS
    )
    proc.start()
    yield proc
    proc.stop()


def rpc_code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details() or ""


def job_count(client) -> int:
    return len(list(client.jobs()))


# --- messages ------------------------------------------------------------------------------
def test_malformed_message_is_refused_and_server_lives(service):
    with service.client() as client:
        before = job_count(client)
        raw = client.channel.unary_unary(
            "/memupdate.v1.KnowledgeUpdate/SubmitUpdate",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        code, details = rpc_code(lambda: raw(b"\x0a\xff\xff\xff\xff\x0f", timeout=10))
        assert code == grpc.StatusCode.INTERNAL and "deserializ" in details.lower()
        assert client.health() == "SERVING" and job_count(client) == before


def test_oversized_message_is_resource_exhausted(service):
    big = [pb.Fact(prompt=f"p{i}", target="x" * 1000) for i in range(300)]  # ~300 KB
    with service.client() as client:
        before = job_count(client)
        code, details = rpc_code(
            lambda: client.stub.SubmitUpdate(
                pb.SubmitUpdateRequest(knowledge_base="kb", facts=big, target_fact_recall=1.0),
                timeout=30,
            )
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details
        assert client.health() == "SERVING" and job_count(client) == before


def test_too_many_facts_and_text_with_prompt_are_invalid(service):
    many = [pb.Fact(prompt=f"Person {i} is", target=f" {i}") for i in range(MAX_FACTS + 1)]
    both = [pb.Fact(prompt="A is", target=" 1", text="A is 1")]
    with service.client() as client:
        for facts, expected in ((many, "exceed the limit of 50"), (both, "either `text`")):
            code, details = rpc_code(
                lambda f=facts: client.stub.SubmitUpdate(
                    pb.SubmitUpdateRequest(knowledge_base="kb", facts=f, target_fact_recall=1.0),
                    timeout=30,
                )
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in details


# --- adapters and models (the `memupdate` command) -----------------------------------------
def memupdate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "memupdate.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny_adapter(tiny_dir, tmp_path_factory):
    """A real (untrained) LoRA adapter of the default family for the tiny model."""
    from peft import get_peft_model

    from memupdate.memory.base_model import load_model

    model, _ = load_model(tiny_dir)
    out = tmp_path_factory.mktemp("adapter") / "tiny-r4"
    family = default_family(model.config.num_hidden_layers)
    get_peft_model(model, family.lora_config(4)).save_pretrained(out)
    return out


def test_adapter_check_accepts_a_real_adapter(tiny_adapter, tiny_dir):
    assert check_adapter_for_model(tiny_adapter, tiny_dir) == 4


def test_adapter_for_another_model_is_refused(tiny_adapter, default_dir):
    with pytest.raises(AdapterMismatch, match="made for another model"):
        check_adapter_for_model(tiny_adapter, default_dir)


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no-config", "no adapter_config.json"),
        ("no-weights", "no adapter_model.safetensors"),
        ("garbage-config", "not a peft adapter config"),
        ("not-lora", "expected a LoRA adapter"),
        ("garbage-weights", "cannot read"),
    ],
)
def test_broken_adapter_folders_are_refused(tiny_adapter, tiny_dir, tmp_path, breakage, message):
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, folder)
    config = folder / "adapter_config.json"
    if breakage == "no-config":
        config.unlink()
    elif breakage == "no-weights":
        (folder / "adapter_model.safetensors").unlink()
    elif breakage == "garbage-config":
        config.write_text("{not json")
    elif breakage == "not-lora":
        config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "IA3"}))
    else:
        (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterMismatch, match=re.escape(message)):
        check_adapter_for_model(folder, tiny_dir)


def test_publish_refuses_a_bad_adapter_before_starting_anything(tiny_dir, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "A is", "target": " 1"}\n')
    (tmp_path / "notadapter").mkdir()
    started = time.monotonic()
    out = memupdate(
        "publish",
        "kb",
        str(tmp_path / "notadapter"),
        str(facts),
        "--model",
        str(tiny_dir),
        "--registry",
        str(tmp_path / "registry"),
    )
    assert out.returncode == 2 and "not a peft adapter folder" in out.stderr
    assert time.monotonic() - started < 60  # no vLLM was started for it
    assert not (tmp_path / "registry" / "kb").exists()


def test_unknown_base_model_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    for args in (
        ["plan", str(tmp_path / "f.jsonl"), "--target-recall", "1", "--model", str(missing)],
        ["serve", "--model", str(missing), "--data-dir", str(tmp_path / "d")],
    ):
        (tmp_path / "f.jsonl").write_text('{"prompt": "A is", "target": " 1"}\n')
        out = memupdate(*args)
        assert out.returncode != 0
        assert str(missing) in out.stderr and "Traceback" not in out.stderr, out.stderr


# --- property-based ------------------------------------------------------------------------
# Strings a protobuf message can carry (valid UTF-8: no lone surrogates).
any_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=24)
clean_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=24
)
names = st.one_of(
    st.sampled_from(["kb", "phones", "a-b_c", "../etc", "/abs", "a\x00b", "UPPER", "x" * 64, ""]),
    any_text,
)
facts_pb = st.lists(
    st.one_of(
        st.builds(pb.Fact, prompt=clean_text, target=clean_text),
        st.builds(pb.Fact, prompt=any_text, target=any_text, text=any_text),
    ),
    max_size=4,
)
recalls = st.one_of(st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True))


def has_control(s: str) -> bool:
    return bool(CONTROL_CHARACTERS.intersection(s))


def fact_ok(f: pb.Fact) -> bool:
    if f.text:
        return not f.prompt and not f.target and bool(f.text.strip()) and not has_control(f.text)
    return all(v.strip() and not has_control(v) for v in (f.prompt, f.target))


def spec_valid(r: pb.SubmitUpdateRequest, max_rank: int = 8) -> bool:
    """The contract, written independently of the server's validation code."""
    targets: dict[str, str] = {}
    for f in r.facts:
        if f.prompt and targets.setdefault(f.prompt, f.target) != f.target:
            return False  # contradiction within the update
    return (
        re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", r.knowledge_base) is not None
        and 1 <= len(r.facts) <= MAX_FACTS
        and all(fact_ok(f) for f in r.facts)
        and 0 < r.target_fact_recall <= 1
        and r.rank_override <= min(512, max_rank)
        and 0 <= r.margin < 0.5
        and r.max_steps <= 1_000_000
        and r.max_seconds >= 0
        and len(r.idempotency_key) <= 128
    )


valid_requests = st.builds(
    pb.SubmitUpdateRequest,
    knowledge_base=st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True),
    facts=st.lists(
        st.builds(pb.Fact, prompt=clean_text, target=clean_text),
        min_size=1,
        max_size=4,
        unique_by=lambda f: f.prompt,
    ),
    target_fact_recall=st.floats(0.01, 1),
    rank_override=st.integers(0, 8),
    margin=st.floats(0, 0.49),
    max_steps=st.integers(0, 3),
)
random_requests = st.builds(
    pb.SubmitUpdateRequest,
    knowledge_base=names,
    facts=facts_pb,
    target_fact_recall=recalls,
    rank_override=st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)),
    margin=st.one_of(st.floats(0, 0.49), st.floats(allow_nan=True)),
    max_steps=st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)),
    max_seconds=st.one_of(st.just(0.0), st.floats(allow_nan=True)),
    idempotency_key=st.one_of(st.just(""), any_text, st.text("k", min_size=129, max_size=140)),
)
requests = st.one_of(valid_requests, random_requests)  # both sides of the contract, often
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,  # rank above the serving limit
}


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=requests)
def test_random_requests_never_crash_and_invalid_ones_never_succeed(service, request):
    with service.client(retries=0) as client:
        try:
            job = client.stub.SubmitUpdate(request, timeout=30)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.ALREADY_EXISTS:
                return  # an idempotency key hypothesis reused for another request
            assert err.code() in REFUSALS, (err.code(), err.details(), request)
            assert err.details(), "a refusal must say why"
            assert not spec_valid(request), f"refused a valid update: {err.details()}"
            event(f"refused: {err.code().name}")
            return
        assert spec_valid(request), f"accepted an invalid update: {request}"
        assert job.job_id
        event("accepted")


def test_server_survived_the_random_requests(service):
    with service.client() as client:
        assert client.health() == "SERVING"
        # The random requests reached both sides of the contract: many were valid (accepted).
        assert len(list(client.jobs(page_size=500))) >= 20
    assert service.process.poll() is None


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(
        st.one_of(
            st.text(max_size=40),
            st.dictionaries(
                st.sampled_from(["prompt", "target", "text", "other"]),
                st.one_of(st.text(max_size=12), st.integers(), st.none(), st.lists(st.integers())),
                max_size=3,
            ).map(json.dumps),
            st.lists(st.integers(), max_size=2).map(json.dumps),
        ),
        max_size=6,
    )
)
def test_random_fact_files_load_or_fail_clearly(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    try:
        facts = load_facts(path)
    except FactError as err:
        assert "facts.jsonl:" in str(err) or "no facts" in str(err) or str(path) in str(err)
        return
    for fact in facts:
        values = [v for v in (fact.prompt, fact.target, fact.text) if v is not None]
        assert values and all(v.strip() and not has_control(v) for v in values)
