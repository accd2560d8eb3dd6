"""Acceptance on the real default model (SmolLM2-135M-Instruct from the bundled GGUF). MemFT
teaching new facts verbatim on it is in test_demo.py, which trains once through the service and
checks the guarantee both in the trainer and through vLLM."""

import pytest

from memupdate.memory.base_model import IDENTITY_FILE, load_model, model_identity
from memupdate.memory.encoding import encode_facts, model_context_length
from memupdate.memory.facts import Fact

pytestmark = pytest.mark.slow


def test_prepared_model_is_complete_and_identified(default_dir):
    assert (default_dir / IDENTITY_FILE).is_file()
    assert (default_dir / "model.safetensors").is_file()
    assert not default_dir.with_name(default_dir.name + ".tmp").exists()
    identity = model_identity(default_dir)
    assert identity.name == "SmolLM2-135M-Instruct" and len(identity.digest) == 16
    model, tok = load_model(default_dir)
    assert model.config.num_hidden_layers == 30 and tok.pad_token_id is not None


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
