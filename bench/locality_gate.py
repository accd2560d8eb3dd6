"""A prompt-level gate (GRACE/MELO-style), measured as an option: how well could a router in
front of vLLM send only the prompts about stored facts to the adapter?

The gate compares a prompt's hidden state entering the adapted layer (base model, last token of
the prompt's text; for a chat request, of the user's message, not of the chat template, whose
last tokens are the same for every question) with those of the stored facts' forms, and routes it
to the adapter when the cosine similarity to the nearest one is at least a threshold. Prompts
below it go to the base model, whose answers are then unchanged by construction.

The threshold is set from the retain side only (what a service could do at publish time,
without the measurement text): the highest similarity any retain prompt, or the first 8 or 16
words of any retain passage, has to the stored forms. Reported per kind and knowledge-base size:
- keys: the stored forms (every trained form: prompt, paraphrases, questions; or the prompt
  alone, a fact posted without forms);
- false negatives: held-out paraphrases and questions (fact_sets.FORMS, never stored) that the
  gate would send to the base model, so they could not get the new fact;
- false positives: the measurement side's general prompts (the 48 locality prompts) and the
  first 8 and 16 words of each measurement passage that it would send to the adapter;
- neighbours routed: prompts of the same template about 40 subjects the knowledge base does not
  hold (other people, other countries): the gate recognises a fact's wording as much as its
  subject, so these reach the adapter, whose answers to them training does not hold;
- served prompts unchanged, at least: 1 − the false-positive share of the 48 locality prompts
  (those the gate sends to the base model keep their answer; the rest are counted as changed);
- held-out nearest same fact / same update: the share of held-out paraphrases and questions whose
  most similar stored form belongs to their own fact, or to a fact of the same update of 10 (facts
  0-9, 10-19, ...). What a gate that routed among several adapters, one per update, would need:
  a held-out form sent to another update's adapter cannot get its fact.
The stored forms themselves are always routed (similarity 1). Nothing here is trained.

    cd bench && ../.venv/bin/python locality_gate.py --kinds all --sizes 12,40,300
"""

import torch
from common import kinds, parser, setup

from memupdate.memory.adapter import default_family
from memupdate.memory.fact_sets import KINDS
from memupdate.memory.frozen_prefix import first_adapted_layer
from memupdate.memory.gate import Gate, passage_starts, text_states
from memupdate.memory.locality import locality_prompts


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="40", help="knowledge-base sizes (facts), comma-separated")
    args = p.parse_args()
    _, load = setup(args)
    model, tok = load()
    first = first_adapted_layer(default_family(model.config.num_hidden_layers))
    general = (locality_prompts(), passage_starts("measure.txt"))  # the measurement side
    measured = [text_states(model, tok, texts, first) for texts in general]
    header = (
        "| kind | facts | keys | threshold | held-out paraphrases: min similarity, FN | held-out "
        "questions: min, FN | general prompts FP | passage starts FP | neighbours routed | served "
        "prompts unchanged | held-out nearest same fact | same update of 10 |"
    )
    rows = []
    for size in map(int, args.sizes.split(",")):
        for kind in kinds(args):
            trained = KINDS[kind](size, seed=args.seed, forms="trained")
            held = KINDS[kind](size, seed=args.seed, forms="held_out")
            others = KINDS[kind](size + 40, seed=args.seed)[size:]
            neighbours = text_states(model, tok, [f.prompt for f in others], first)
            paraphrases = text_states(model, tok, [t for f in held for t in f.paraphrases], first)
            questions = text_states(model, tok, [t for f in held for t in f.questions], first)
            held_owner = torch.tensor(
                [i for i, f in enumerate(held) for _ in f.paraphrases]
                + [i for i, f in enumerate(held) for _ in f.questions]
            )
            key_sets = {
                "every form": [
                    (i, t)
                    for i, f in enumerate(trained)
                    for t in (f.prompt, *f.paraphrases, *f.questions)
                ],
                "prompts": [(i, f.prompt) for i, f in enumerate(trained)],
            }
            for name, keys in key_sets.items():
                gate = Gate.from_texts(model, tok, [t for _, t in keys], first)
                owner = torch.tensor([i for i, _ in keys])
                nearest = owner[(torch.cat([paraphrases, questions]) @ gate.keys.T).argmax(1)]
                same_fact = (nearest == held_owner).float().mean()
                same_update = (nearest // 10 == held_owner // 10).float().mean()
                threshold = gate.threshold
                para, quest = gate.nearest(paraphrases), gate.nearest(questions)
                fp_prompts, fp_starts = (gate.routed_share(m) for m in measured)
                routed = gate.routed_share(neighbours)
                rows.append(
                    f"| {kind} | {size} | {name} | {threshold:.3f} | {para.min():.3f}, "
                    f"{(para < threshold).float().mean():.2f} | {quest.min():.3f}, "
                    f"{(quest < threshold).float().mean():.2f} | {fp_prompts:.2f} | "
                    f"{fp_starts:.2f} | {routed:.2f} | ≥ {1 - fp_prompts:.2f} | {same_fact:.2f} | "
                    f"{same_update:.2f} |"
                )
                print(rows[-1], flush=True)
    print(f"\nlayer {first} (the default family's adapted layer), seed {args.seed}\n")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
