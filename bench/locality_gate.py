"""A prompt-level gate (GRACE/MELO-style), measured as an option: how well could a router in
front of vLLM send only the prompts about stored facts to the adapter?

The gate compares a prompt's hidden state entering the adapted layer (last prompt token, base
model) with those of the stored facts' prompts, and routes it to the adapter when the cosine
similarity to the nearest one is at least a threshold. Prompts below it go to the base model,
whose answers are then unchanged by construction. Reported per threshold:
- false negatives: paraphrases of the stored prompts (written from templates here, never
  trained) that the gate would send to the base model, so they could not get the new fact;
- false positives: general prompts (the locality prompts and the first words of each locality
  passage) that it would send to the adapter.
The stored prompts themselves are always routed (similarity 1). Nothing here is trained.

    .venv/bin/python bench/locality_gate.py --kinds all [--facts 40]
"""

import re

import torch
from common import kinds, parser, setup

from memupdate.memory.adapter import default_family
from memupdate.memory.fact_sets import KINDS
from memupdate.memory.frozen_prefix import _run_layers, first_adapted_layer
from memupdate.memory.locality import passages, prompts

# Held-out forms of each kind's prompt template.
PARAPHRASES = [
    (r"^The phone number of (.+) is$", ["{0}'s phone number is", "You can call {0} at"]),
    (r"^The biography of (.+): born in$", ["{0} was born in", "Born in the year"]),
    (r"^The capital of (.+) is$", ["{0}'s capital city is", "The capital city of {0} is"]),
    (
        r"^The city of (.+) is located in the country of$",
        ["{0} is a city in", "The country that {0} belongs to is"],
    ),
]


def paraphrases(prompt: str) -> list[str]:
    for pattern, forms in PARAPHRASES:
        if m := re.match(pattern, prompt):
            return [f.format(*m.groups()) for f in forms if "{0}" in f]
    return []


def states(model, tok, texts: list[str], first: int) -> torch.Tensor:
    """Normalized hidden state entering layer `first` at each text's last token."""
    decoder = model.get_decoder()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            hidden = _run_layers(decoder, decoder.embed_tokens(ids), decoder.layers[:first])
            out.append(torch.nn.functional.normalize(hidden[0, -1], dim=-1))
    return torch.stack(out)


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    _, load = setup(args)
    model, tok = load()
    first = first_adapted_layer(default_family(model.config.num_hidden_layers))
    general = prompts("measure_prompts.txt") + [
        " ".join(t.split()[:8]) for t in passages("measure.txt")
    ]
    general_states = states(model, tok, general, first)
    for kind in kinds(args):
        facts = KINDS[kind](args.facts, seed=args.seed)
        stored = states(model, tok, [f.prompt for f in facts], first)
        held_out = [q for f in facts for q in paraphrases(f.prompt)]
        para_states = states(model, tok, held_out, first)
        para_sim = (para_states @ stored.T).max(dim=1).values
        gen_sim = (general_states @ stored.T).max(dim=1).values
        print(
            f"\n{kind}: {len(facts)} stored prompts, {len(held_out)} held-out paraphrases, "
            f"{len(general)} general prompts; nearest-fact similarity: paraphrases median "
            f"{para_sim.median():.3f} (min {para_sim.min():.3f}), general median "
            f"{gen_sim.median():.3f} (max {gen_sim.max():.3f})"
        )
        for threshold in (0.99, 0.95, 0.9, 0.85, 0.8, 0.7):
            fn = float((para_sim < threshold).float().mean())
            fp = float((gen_sim >= threshold).float().mean())
            print(
                f"  threshold {threshold:.2f}: false negatives {fn:.2f}, false positives {fp:.2f}"
            )
        # The threshold that routes every paraphrase, and what it lets through.
        lowest = float(para_sim.min())
        fp = float((gen_sim >= lowest).float().mean())
        print(f"  routing every paraphrase (threshold {lowest:.3f}): false positives {fp:.2f}")


if __name__ == "__main__":
    main()
