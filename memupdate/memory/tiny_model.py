"""A tiny random-init Llama with a byte-level BPE tokenizer, both built in code.

For fast unit tests and quick calibration smoke runs only; it knows nothing, so every fact is
new to it. Never the only model an acceptance test uses.
"""

from pathlib import Path

from memupdate.memory.base_model import prepare_model_folder
from memupdate.memory.fact_sets import phonebook_facts

TINY_MODEL_NAME = "tiny-llama"
# General text beside the facts, so the tokenizer knows ordinary words too.
GENERAL_TEXT = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "def add(a, b):\n    return",
    "Photosynthesis is the process by which",
    "The first president of the United States was",
    "A triangle has three",
    "To make a cup of tea, first",
    "The chemical symbol for gold is",
    "Once upon a time, there was a",
    "The speed of light is about",
    "In machine learning, overfitting means",
    "The Great Wall of China was built to",
    "Shakespeare wrote the play",
    "The square root of 81 is",
    "Monday comes after",
)


def _corpus() -> list[str]:
    facts = phonebook_facts(400, seed=12345)
    return [f"{f.prompt}{f.target}" for f in facts] + list(GENERAL_TEXT) * 4


def _build(out: Path, seed: int = 0) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,  # head_dim 64: a size every vLLM attention backend supports
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        # Logits are (tied) embeddings times a normalized hidden state: with the usual 0.02
        # init they can never separate one token from 511 others (p stays under 3%).
        initializer_range=0.1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def prepare_tiny_model() -> Path:
    return prepare_model_folder(TINY_MODEL_NAME, _build)
