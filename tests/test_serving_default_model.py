"""The default model end to end through vLLM: MemFT teaches the example facts (new to the base)
verbatim, in the trainer and through serving; publish, verify through serving, and read the new
knowledge back through the OpenAI API."""

from pathlib import Path

import pytest
from openai_api import ask

from memupdate.memory.adapter import default_family
from memupdate.memory.encoding import encode_facts, model_context_length
from memupdate.memory.facts import load_facts
from memupdate.memory.locality import retain_set
from memupdate.memory.memft import TrainSettings, train_adapter
from memupdate.memory.recall import greedy_check, measure_recall
from memupdate.serving.backends import ManagedBackend, verify_and_go_live
from memupdate.serving.registry import Registry
from memupdate.serving.vllm_server import ManagedVLLM, ServerConfig

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "new_facts.jsonl"


def test_example_facts_go_live_and_are_answered_through_vllm(default, default_dir, tmp_path):
    model, tok = default
    facts = load_facts(EXAMPLES)
    encoded = encode_facts(facts, tok, model_context_length(model))
    assert measure_recall(model, encoded, tok.pad_token_id).fact_recall == 0.0  # all new
    settings = TrainSettings(rank=4, family=default_family(30), max_steps=800)
    peft_model, result = train_adapter(
        model, encoded, tok.pad_token_id, settings, retain=retain_set(model, tok, settings.family)
    )
    assert result.success, result.recall
    assert result.recall.fact_recall == 1.0 and result.recall.min_prob > 0.5 + settings.margin
    # Each fact is trained as its prompt and as its chat question.
    assert {k: v["facts"] for k, v in result.recall.forms.items()} == {"prompt": 12, "chat": 12}
    # All target tokens past 0.5 => greedy decoding in the trainer reproduces every target, in
    # both forms (a chat answer up to and including its end-of-turn token).
    greedy = greedy_check(peft_model, encoded, tok.pad_token_id)
    assert greedy.exact == greedy.checked == 24, greedy.mismatches
    trained = measure_recall(peft_model, encoded, tok.pad_token_id)
    peft_model.save_pretrained(tmp_path / "adapter")

    registry = Registry(tmp_path / "registry")
    version = registry.publish("news", tmp_path / "adapter", {}, facts=facts)
    server = ManagedVLLM(
        ServerConfig(model=default_dir, max_lora_rank=8, max_loras=2),
        log_path=tmp_path / "vllm.log",
    )
    with server:
        backend = ManagedBackend(server)
        live = verify_and_go_live(registry, backend, version, encoded, tok, 1.0)
        assert live.live, live.reason
        [served] = live.per_replica.values()
        # fp32 serving agrees with the trainer's own measurement.
        assert served.recall.fact_recall == 1.0
        assert served.recall.min_prob == pytest.approx(trained.min_prob, abs=1e-3)
        assert served.recall.forms["chat"] == {"facts": len(facts), "fact_recall": 1.0}
        # the go-live check asked the weakest chat forms through the chat endpoint
        assert served.greedy_checked > 8 and served.greedy_exact == served.greedy_checked
        client = server.client
        chat_forms = {f.asked: f for f in encoded if f.form == "chat"}
        for fact in facts:
            assert ask(client.url, "news", fact.prompt, 24).startswith(fact.target)
            # The base model served beside it does not know the fact.
            assert not ask(client.url, "base", fact.prompt, 24).startswith(fact.target)
            # Asked the way applications ask: the answer is the target, and nothing after it.
            [question] = fact.questions
            reply = client.chat("news", question, 32, return_token_ids=True)
            assert reply["choices"][0]["message"]["content"] == fact.target.strip()
            assert reply["choices"][0]["finish_reason"] == "stop"
            # vLLM renders the question to exactly the tokens that were trained.
            assert tuple(reply["prompt_token_ids"]) == chat_forms[question].prompt_ids
            base = client.chat("base", question, 32)["choices"][0]["message"]["content"]
            assert fact.target.strip() not in base
