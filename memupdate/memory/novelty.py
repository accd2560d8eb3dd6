"""How much of a knowledge base an adapter must store: the share of its target tokens that the
base model cannot predict even after seeing other facts of the same base.

ℓ counts every target token, but facts that share a template ("born in 1957 in Lyon, works as a
baker") repeat most of their tokens: the adapter learns the template once and stores only what
differs from fact to fact. Shown EXAMPLES other sequences of the same form before each one, the
base model predicts the template in context and not the facts' own content, so the tokens it
still gets wrong (p ≤ 0.5, the line a trained token must pass) are the ones to store. Measured on
seeded sets (docs/benchmarks.md, "Novel tokens"): phone numbers 0.91-0.92 of ℓ, counterfactual
updates 0.75-0.84, biographies 0.38-0.43, where the base model alone gets 0.98, 0.91 and 0.78
wrong. A law fitted on ℓ alone expected biographies to need twice the rank they did at ℓ 5,000.
"""

import random
from collections import defaultdict
from dataclasses import replace

import torch

from memupdate.memory.encoding import EncodedFact, model_context_length
from memupdate.memory.recall import PASS_PROBABILITY, token_probabilities

EXAMPLES = 4  # other sequences shown before each measured one
# A share over a few hundred target tokens is close enough for a law whose own held-out error is
# far larger; the in-context pass costs about EXAMPLES + 1 times a plain one.
SAMPLE_SEQUENCES = 64


def in_context(
    facts: list[EncodedFact], max_length: int, examples: int = EXAMPLES, seed: int = 0
) -> list[EncodedFact]:
    """A seeded sample of `facts`, each preceded by up to `examples` other sequences of its form
    (never one with the same target: that would show the answer), fewer where `max_length`
    tokens would not hold them."""
    rng = random.Random(seed)
    sample = facts if len(facts) <= SAMPLE_SEQUENCES else rng.sample(facts, SAMPLE_SEQUENCES)
    by_form = defaultdict(list)
    for fact in facts:
        by_form[fact.form].append(fact)
    shown = []
    for fact in sample:
        others = [o for o in by_form[fact.form] if o.target_ids != fact.target_ids]
        shown_before = rng.sample(others, min(examples, len(others)))
        while sum(o.length for o in shown_before) + fact.length > max_length:
            shown_before.pop()
        context = tuple(t for o in shown_before for t in o.input_ids)
        shown.append(replace(fact, prompt_ids=context + fact.prompt_ids))
    return shown


def novel_share(model, facts: list[EncodedFact], pad_id: int) -> float:
    """The share of target tokens the base model gets wrong in context (see the module doc)."""
    shown = in_context(facts, model_context_length(model))
    probs = torch.cat(token_probabilities(model, shown, pad_id, batch_size=16))
    return float((probs <= PASS_PROBABILITY).float().mean())
