"""Acceptance on the real default model (SmolLM2-135M-Instruct from the bundled GGUF)."""

import pytest

from memupdate.memory.adapter import default_family
from memupdate.memory.base_model import IDENTITY_FILE, load_model, model_identity
from memupdate.memory.encoding import encode_facts, model_context_length
from memupdate.memory.fact_sets import phonebook_facts
from memupdate.memory.locality import retain_set
from memupdate.memory.memft import TrainSettings, train_adapter
from memupdate.memory.recall import greedy_check, measure_recall

pytestmark = pytest.mark.slow


def test_prepared_model_is_complete_and_identified(default_dir):
    assert (default_dir / IDENTITY_FILE).is_file()
    assert (default_dir / "model.safetensors").is_file()
    assert not default_dir.with_name(default_dir.name + ".tmp").exists()
    identity = model_identity(default_dir)
    assert identity.name == "SmolLM2-135M-Instruct" and len(identity.digest) == 16
    model, tok = load_model(default_dir)
    assert model.config.num_hidden_layers == 30 and tok.pad_token_id is not None


def test_memft_teaches_new_facts_verbatim(default):
    model, tok = default
    facts = encode_facts(phonebook_facts(12, seed=3), tok, model_context_length(model))
    before = measure_recall(model, facts, tok.pad_token_id)
    assert before.fact_recall == 0.0  # random phone numbers: the base model knows none
    settings = TrainSettings(rank=4, family=default_family(30), max_steps=600)
    peft_model, result = train_adapter(
        model, facts, tok.pad_token_id, settings, retain=retain_set(model, tok, settings.family)
    )
    assert result.success, result.recall
    assert result.recall.fact_recall == 1.0 and result.recall.min_prob > 0.5 + settings.margin
    # All target tokens past 0.5 => greedy decoding from the prompt reproduces every target.
    greedy = greedy_check(peft_model, facts, tok.pad_token_id)
    assert greedy.exact == greedy.checked == 12, greedy.mismatches
