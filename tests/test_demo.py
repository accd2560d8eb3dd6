"""`make demo`'s script on the default model: the service end to end, once, through gRPC and
vLLM (the other service tests use the tiny model). While the service is still up, the test also
checks what users rely on: the chat answer is exactly the target and vLLM renders the question to
the tokens that were trained; the published adapter, loaded back into the trainer's model,
reproduces every fact greedily and agrees with the probabilities vLLM served."""

import re
import sys
from pathlib import Path

import pytest
from peft import PeftModel

from memupdate.memory.encoding import encode_facts, model_context_length
from memupdate.memory.facts import load_facts
from memupdate.memory.recall import greedy_check, measure_recall
from memupdate.serving.registry import Registry
from memupdate.serving.vllm_client import VLLMClient

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import demo  # noqa: E402  (examples/ is not a package)


def test_demo_takes_the_example_facts_live_on_the_default_model(default, capsys):
    model, tok = default
    facts = load_facts(demo.FACTS)
    encoded = encode_facts(facts, tok, model_context_length(model))
    checked = []

    def while_live(vllm_url: str, data_dir: Path, job, answers: dict) -> None:
        chat_forms = {f.asked: f for f in encoded if f.form == "chat"}
        client = VLLMClient(vllm_url)
        for fact in facts:
            base, updated = answers[fact.prompt]
            assert updated.startswith(fact.target)
            # The base model served beside the adapter does not know the fact.
            assert not base.startswith(fact.target)
            [question] = fact.questions
            base, updated = answers[question]
            # Asked the way applications ask: the target and nothing after it. The demo allows
            # 16 tokens and every chat target is shorter, so the model ended its turn there.
            assert updated == fact.target.strip()
            assert len(chat_forms[question].target_ids) < 16
            assert fact.target.strip() not in base
            # vLLM renders the question to exactly the tokens that were trained.
            reply = client.chat("demo-news", question, 1, return_token_ids=True)
            assert tuple(reply["prompt_token_ids"]) == chat_forms[question].prompt_ids
        # The gate gives general prompts the base model's answers, word for word.
        for prompt in demo.locality_prompts()[: demo.GENERAL_PROMPTS]:
            base, updated = answers[prompt]
            assert updated == base
        # The go-live check decoded the weakest facts through both endpoints.
        assert job.serving_recall.greedy_checked > 8
        assert job.serving_recall.greedy_exact == job.serving_recall.greedy_checked

        live = Registry(data_dir / "registry").live("demo-news")
        assert measure_recall(model, encoded, tok.pad_token_id).fact_recall == 0.0  # all new
        adapted = PeftModel.from_pretrained(model, live.path)
        # Every target token past 0.5 => greedy decoding in the trainer reproduces every
        # target, in both forms (a chat answer up to and including its end-of-turn token).
        greedy = greedy_check(adapted, encoded, tok.pad_token_id)
        assert greedy.exact == greedy.checked == 2 * len(facts), greedy.mismatches
        # fp32 serving agrees with the trainer's own measurement of the published adapter.
        trained = measure_recall(adapted, encoded, tok.pad_token_id)
        assert trained.fact_recall == 1.0
        assert job.serving_recall.min_probability == pytest.approx(trained.min_prob, abs=1e-3)
        checked.append(live.version)

    assert demo.main(after_live=while_live) == 0
    out = capsys.readouterr().out
    assert checked == [1]
    for kind in ("planned", "trained", "published", "serving_verified", "live"):
        assert f"] {kind}:" in out
    assert "greedy exact 12/12 prompts, 12/12 chat questions" in out
    assert "fact recall 1.000 (prompt 1.000, chat 1.000)" in out
    assert "general prompts through the gate: 6/6 answered exactly as the base model" in out
    assert re.search(r"the adapter alone \(no gate\): [01]\.\d{3} of next-token answers on 48", out)
    assert "stopped the service and its vLLM" in out
