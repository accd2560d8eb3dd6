"""The prompt gate (memory/gate.py) on the tiny model: what it stores, how it decides, and that
it survives being saved with an adapter. Through vLLM: tests/test_serving.py."""

import torch

from memupdate.memory.encoding import encode_facts
from memupdate.memory.fact_sets import phonebook_facts
from memupdate.memory.facts import Fact
from memupdate.memory.gate import Gate, retain_texts, stored_texts, text_states

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
