"""Acceptance on the real default model (SmolLM2-135M-Instruct from the bundled GGUF)."""

import pytest

from memupdate.memory.adapter import default_family
from memupdate.memory.base_model import IDENTITY_FILE, load_model, model_identity
from memupdate.memory.encoding import encode_facts, model_context_length
from memupdate.memory.fact_sets import phonebook_facts
from memupdate.memory.facts import Fact
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
    # Each fact is trained as its prompt and as a chat question (the prompt as the user turn).
    assert {k: v["facts"] for k, v in result.recall.forms.items()} == {"prompt": 12, "chat": 12}
    # All target tokens past 0.5 => greedy decoding reproduces every target, in both forms (a
    # chat answer up to and including its end-of-turn token).
    greedy = greedy_check(peft_model, facts, tok.pad_token_id)
    assert greedy.exact == greedy.checked == 24, greedy.mismatches


def test_a_question_is_encoded_as_vllm_renders_a_chat_request(default):
    model, tok = default
    fact = Fact(prompt="The capital of Velmora is", target=" Port Castrel", questions=("Q?",))
    forms = encode_facts([fact], tok, model_context_length(model))
    assert [f.form for f in forms] == ["prompt", "chat"]
    chat = forms[1]
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Q?"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.prompt_ids == tuple(tok(rendered, add_special_tokens=False)["input_ids"])
    # The answer without its leading space, then <|im_end|>, which ends the turn and stops vLLM.
    assert tok.decode(list(chat.target_ids)) == "Port Castrel<|im_end|>"
    assert chat.target_ids[-1] == tok.eos_token_id
    # Without questions the prompt is the chat question; chat=False leaves chat forms out.
    plain = Fact(prompt="The capital of Velmora is", target=" Port Castrel")
    default_chat = encode_facts([plain], tok, 2048)[1]
    assert default_chat.form == "chat" and default_chat.asked == plain.prompt
    assert [f.form for f in encode_facts([plain], tok, 2048, chat=False)] == ["prompt"]
