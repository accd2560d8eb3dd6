"""The prompt gate (memory/gate.py) on the tiny model: what it stores, how it decides, and that
it survives being saved with an adapter. Through vLLM: tests/test_serving.py."""

import torch

from memupdate.memory.encoding import encode_facts
from memupdate.memory.fact_sets import phonebook_facts
from memupdate.memory.facts import Fact
from memupdate.memory.gate import Gate, retain_texts, stored_texts, text_states
from memupdate.memory.routing import WordRouter

FACTS = [
    Fact(
        prompt="The phone number of Ada Abbott is",
        target=" 4155550199",
        paraphrases=("To call Ada Abbott, dial",),
    ),
    *phonebook_facts(3, seed=5),
]


def test_the_gate_stores_every_form_once_and_routes_each_of_them(tiny, tmp_path):
    model, tok = tiny
    encoded = encode_facts(FACTS + FACTS[:1], tok, 256)  # a repeated fact adds no key
    texts = stored_texts(encoded)
    assert texts == [FACTS[0].prompt, FACTS[0].paraphrases[0], *(f.prompt for f in FACTS[1:])]
    gate = Gate.build(model, tok, encoded, layer=2)
    assert gate.keys.shape[0] == len(texts)
    assert torch.allclose(gate.keys.norm(dim=1), torch.ones(len(texts)))
    for text in texts:
        assert gate.similarity(model, tok, text) > 1 - 1e-5 and gate.routes(model, tok, text)
    # The threshold is the closest any retain text comes to a stored form: none of them routes.
    general = text_states(model, tok, retain_texts(), 2)
    assert gate.threshold == float((general @ gate.keys.T).max())
    strict = Gate(gate.keys, 2, 1 - 1e-4)
    assert not any(strict.routes(model, tok, t) for t in retain_texts()[:8])

    gate.save(tmp_path)
    loaded = Gate.load(tmp_path)
    assert torch.equal(loaded.keys, gate.keys)
    assert (loaded.layer, loaded.threshold) == (gate.layer, gate.threshold)
    assert Gate.load(tmp_path / "elsewhere") is None  # an adapter published without a gate


def test_states_computed_in_batches_equal_those_of_each_text_alone(tiny):
    model, tok = tiny
    texts = retain_texts()[:12] + [f.prompt for f in FACTS]  # of several lengths
    alone = torch.cat([text_states(model, tok, [t], 2) for t in texts])
    batched = text_states(model, tok, texts, 2, batch=5)
    assert torch.allclose(batched, alone, atol=1e-5)


def test_with_one_adapter_per_update_the_gate_routes_a_wording_to_its_facts_version(tiny, tmp_path):
    model, tok = tiny
    first, second = phonebook_facts(3, seed=6), phonebook_facts(2, seed=7)
    encoded = encode_facts(first, tok, 256)
    v1 = Gate.build(model, tok, encoded, 2, versions=[0] * len(encoded))
    # Version 2 keeps the first facts with v1's adapter and trains the second set itself (0).
    encoded += encode_facts(second, tok, 256)
    held_by = [1] * len(first) + [0] * len(second)
    v2 = Gate.build(model, tok, encoded, 2, held_by, previous=v1)
    assert torch.equal(v2.keys[: len(first)], v1.keys)  # reused, not recomputed
    fresh = Gate.build(model, tok, encoded, 2, held_by)
    assert torch.allclose(v2.keys, fresh.keys, atol=1e-6) and v2.threshold == fresh.threshold

    def name(fact):
        return fact.prompt.removeprefix("The phone number of ").removesuffix(" is")

    for fact, version in [*((f, 1) for f in first), *((f, 0) for f in second)]:
        assert v2.version_for(fact.prompt) == version
        assert v2.version_for(f"How do I call {name(fact)}?") == version  # never stored
    v2.save(tmp_path)
    loaded = Gate.load(tmp_path)
    assert (loaded.texts, loaded.versions) == (v2.texts, v2.versions)
    assert loaded.version_for(f"Can you tell me {name(first[2])}'s number?") == 1
    # A gate of one adapter routes nowhere else.
    assert Gate.build(model, tok, encoded, 2).version_for(first[0].prompt) is None


def test_the_word_router_prefers_rare_words_a_verbatim_text_and_the_newest_on_a_tie():
    texts = ["The capital of India is", "The capital of Peru is", "The capital of India is"]
    router = WordRouter(texts, [1, 2, 3])
    assert router.route("The capital of India is") == 3  # stored twice: the newer holds it
    assert router.route("What is the capital city of peru?") == 2  # the rare word decides
    assert router.route("capital") == 3  # a tie: the newest
    assert router.route("nothing shared here") is None
