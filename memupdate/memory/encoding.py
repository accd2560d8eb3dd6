"""Turn facts into token ids with a target mask, and measure ℓ.

Boundary rule: at serving time a client sends the prompt alone and the model continues greedily.
So the prompt is tokenized alone, exactly as the server will tokenize it (special tokens
included), and the target is tokenized on its own and appended. A target whose tokens do not
decode back to the same text is rejected: it could never be reproduced verbatim.

Forms: a fact is remembered in every form it is asked in, and each form is a sequence of its own
(trained, checked and counted in ℓ like a fact):
- `prompt`: the prompt, continued with the target (a `text` fact has only this form);
- `paraphrase`: each paraphrase, continued with the same target;
- `chat`: each question as the user turn of the model's chat template, answered with the target
  (leading and trailing spaces dropped) and the template's end-of-turn token, so that
  /v1/chat/completions answers exactly the target and stops. vLLM renders a chat request the same
  way (template with the generation prompt, then tokenized without adding special tokens). A
  fact without questions is asked in chat form with its prompt as the user turn: what an
  application that forwards the prompt to the chat endpoint sends.

ℓ (the law's sequence length) follows the paper's reference code (zjunlp/ParametricMemoryLaw,
PhoneBook "answer-only token length"): the total number of target tokens over all sequences of
the knowledge base. Prompt tokens do not count.
"""

from dataclasses import dataclass, replace
from functools import lru_cache

from memupdate.memory.facts import Fact, FactError, raise_collected


@dataclass(frozen=True)
class EncodedFact:
    index: int
    source: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    form: str = "prompt"  # "prompt", "paraphrase" or "chat"
    asked: str = ""  # the prompt, paraphrase or question as written (a chat form's user turn)

    @property
    def input_ids(self) -> list[int]:
        return [*self.prompt_ids, *self.target_ids]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def _target_ids(tokenizer, target: str, where: str) -> list[int]:
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids) != target:
        raise FactError(
            f"{where}: target does not survive tokenization "
            f"(decodes as {tokenizer.decode(ids)!r}); it could not be recalled verbatim"
        )
    return ids


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, question: str) -> str:
    """The text vLLM's chat endpoint builds from one user message."""
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@lru_cache(maxsize=8)
def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    """What the chat template writes after an assistant answer, up to and including its first
    special token (SmolLM2: <|im_end|>, which is also the end of sequence that stops vLLM)."""
    answer = "ANSWER"
    user = [{"role": "user", "content": "question"}]
    prefix = chat_prompt(tokenizer, "question")
    full = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": answer}], tokenize=False
    )
    if not full.startswith(prefix + answer):
        return ()
    tail = tokenizer(full[len(prefix + answer) :], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    ends = [i for i, token in enumerate(tail) if token in special]
    return tuple(tail[: ends[0] + 1]) if ends else ()


def _forms(fact: Fact, tokenizer, chat: bool) -> list[EncodedFact]:
    """Every form of one fact, unnumbered (index -1)."""
    where = fact.where
    if fact.text is not None:
        ids = tokenizer(fact.text)["input_ids"]
        special = set(tokenizer.all_special_ids)
        lead = 0
        while lead < len(ids) and ids[lead] in special:
            lead += 1
        prompt, target = tuple(ids[: lead + 1]), tuple(ids[lead + 1 :])
        return [EncodedFact(-1, where, prompt, target, "prompt", fact.text)]
    target = tuple(_target_ids(tokenizer, fact.target, where))
    out = [
        EncodedFact(
            -1, where, tuple(tokenizer(fact.prompt)["input_ids"]), target, "prompt", fact.prompt
        )
    ]
    for k, text in enumerate(fact.paraphrases, start=1):
        prompt = tuple(tokenizer(text)["input_ids"])
        out.append(EncodedFact(-1, f"{where} paraphrase {k}", prompt, target, "paraphrase", text))
    if fact.questions and not has_chat_template(tokenizer):
        raise FactError(f"{where}: `questions` given, but the base model has no chat template")
    if chat and has_chat_template(tokenizer):
        answer = fact.target.strip()  # never empty: a blank target is refused with the fact
        reply = (*_target_ids(tokenizer, answer, where), *end_of_turn_ids(tokenizer))
        for k, question in enumerate(fact.questions or (fact.prompt,), start=1):
            text = chat_prompt(tokenizer, question)
            prompt = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            out.append(EncodedFact(-1, f"{where} chat {k}", prompt, reply, "chat", question))
    return out


def encode_facts(
    facts: list[Fact], tokenizer, max_length: int, chat: bool = True
) -> list[EncodedFact]:
    """Encode every form of every fact (chat forms only with `chat` and a model that has a
    chat template) and validate: context length, empty targets, contradictions (one prompt,
    two targets). Exact duplicates are kept once."""
    encoded: list[EncodedFact] = []
    by_prompt: dict[tuple[int, ...], EncodedFact] = {}
    errors: list[str] = []
    for fact in facts:
        try:
            forms = _forms(fact, tokenizer, chat)
        except FactError as err:
            errors.append(str(err))
            continue
        for form in forms:
            item = replace(form, index=len(encoded))
            if not item.target_ids:
                errors.append(
                    f"{item.source}: no target tokens (a `text` fact needs two tokens or more)"
                )
            elif item.length > max_length:
                errors.append(
                    f"{item.source}: {item.length} tokens, longer than the model's context of "
                    f"{max_length}"
                )
            elif (seen := by_prompt.get(item.prompt_ids)) is not None:
                if seen.target_ids != item.target_ids:
                    errors.append(
                        f"{item.source}: contradicts {seen.source}: same prompt, different target"
                    )
            else:
                by_prompt[item.prompt_ids] = item
                encoded.append(item)
    raise_collected(errors)
    return encoded


def sequence_length(encoded: list[EncodedFact]) -> int:
    """ℓ: total target tokens to be held (the law's sequence length)."""
    return sum(len(e.target_ids) for e in encoded)


def fact_count(encoded: list[EncodedFact]) -> int:
    """Facts as posted: every fact has exactly one `prompt` form, whatever else it is asked as."""
    return sum(1 for e in encoded if e.form == "prompt")


def model_context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))
