"""Turn facts into token ids with a target mask, and measure ℓ.

Boundary rule: at serving time a client sends the prompt alone and the model continues greedily.
So the prompt is tokenized alone, exactly as the server will tokenize it (special tokens
included), and the target is tokenized on its own and appended. A target whose tokens do not
decode back to the same text is rejected: it could never be reproduced verbatim.

ℓ (the law's sequence length) follows the paper's reference code (zjunlp/ParametricMemoryLaw,
PhoneBook "answer-only token length"): the total number of target tokens over all facts of the
knowledge base. Prompt tokens do not count.
"""

from dataclasses import dataclass

from memupdate.memory.facts import Fact, FactError, raise_collected


@dataclass(frozen=True)
class EncodedFact:
    index: int
    source: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    @property
    def input_ids(self) -> list[int]:
        return [*self.prompt_ids, *self.target_ids]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def _encode_one(fact: Fact, tokenizer) -> tuple[list[int], list[int]]:
    if fact.text is not None:
        ids = tokenizer(fact.text)["input_ids"]
        special = set(tokenizer.all_special_ids)
        lead = 0
        while lead < len(ids) and ids[lead] in special:
            lead += 1
        return ids[: lead + 1], ids[lead + 1 :]
    prompt_ids = tokenizer(fact.prompt)["input_ids"]
    target_ids = tokenizer(fact.target, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(target_ids) != fact.target:
        raise FactError(
            f"{fact.where}: target does not survive tokenization "
            f"(decodes as {tokenizer.decode(target_ids)!r}); it could not be recalled verbatim"
        )
    return prompt_ids, target_ids


def encode_facts(facts: list[Fact], tokenizer, max_length: int) -> list[EncodedFact]:
    """Encode and validate: context length, empty targets, contradictions (same prompt,
    different target). Exact duplicates are kept once."""
    encoded: list[EncodedFact] = []
    by_prompt: dict[tuple[int, ...], EncodedFact] = {}
    errors: list[str] = []
    for fact in facts:
        try:
            prompt_ids, target_ids = _encode_one(fact, tokenizer)
        except FactError as err:
            errors.append(str(err))
            continue
        item = EncodedFact(len(encoded), fact.where, tuple(prompt_ids), tuple(target_ids))
        if not target_ids:
            errors.append(
                f"{fact.where}: no target tokens (a `text` fact needs two tokens or more)"
            )
        elif item.length > max_length:
            errors.append(
                f"{fact.where}: {item.length} tokens, longer than the model's context of "
                f"{max_length}"
            )
        elif (seen := by_prompt.get(item.prompt_ids)) is not None:
            if seen.target_ids != item.target_ids:
                errors.append(
                    f"{fact.where}: contradicts {seen.source}: same prompt, different target"
                )
        else:
            by_prompt[item.prompt_ids] = item
            encoded.append(item)
    raise_collected(errors)
    return encoded


def sequence_length(encoded: list[EncodedFact]) -> int:
    """ℓ: total target tokens to be held (the law's sequence length)."""
    return sum(len(e.target_ids) for e in encoded)


def model_context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))
