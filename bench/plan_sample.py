"""The planner's base loss on a sample of a large base, against the full pass it replaced.

The law needs the base model's mean loss L0 on the targets. Above LOSS_SAMPLE_SEQUENCES
sequences the planner measures it on a seeded sample (memory/planning.py). For each kind this
measures L0 on every sequence and on the planner's sample, timing both, and prints the sample's
error, the worst error over `--draws` other seeded samples of the same size, and the rank the
shipped law chooses from each L0.

    cd bench && ../.venv/bin/python plan_sample.py --kinds all --facts 300 [--draws 20]
"""

import random
import time

import torch
from common import fact_set, kinds, parser, setup

from memupdate.memory.adapter import default_family
from memupdate.memory.base_model import model_identity
from memupdate.memory.encoding import sequence_length
from memupdate.memory.law import ParametricMemoryLaw
from memupdate.memory.planning import LOSS_SAMPLE_SEQUENCES, base_loss_sample, shipped_law_path
from memupdate.memory.recall import token_probabilities


def mean_loss(per_fact: list[torch.Tensor]) -> float:
    return float(-torch.cat(per_fact).clamp_min(1e-30).log().mean())


def chosen_rank(law, ell, target, loss_before, max_rank) -> int:
    return law.plan(ell, target, loss_before, max_rank=max_rank)[0].rank  # as the planner does


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--draws", type=int, default=20, help="other seeded samples for the spread")
    p.add_argument("--target-recall", type=float, default=1.0)
    p.add_argument("--max-rank", type=int, default=64)
    args = p.parse_args()
    folder, load = setup(args)
    model, tok = load()
    family = default_family(model.config.num_hidden_layers)
    law = ParametricMemoryLaw.load(shipped_law_path(model_identity(folder), family))
    for kind in kinds(args):
        facts = fact_set(load, kind, args.facts, args.seed)
        ell = sequence_length(facts)
        start = time.monotonic()
        probs = token_probabilities(model, facts, tok.pad_token_id)
        full_s = time.monotonic() - start
        sample = base_loss_sample(facts)
        start = time.monotonic()
        token_probabilities(model, sample, tok.pad_token_id)
        sample_s = time.monotonic() - start
        index = {id(f): i for i, f in enumerate(facts)}
        full = mean_loss(probs)
        planned = mean_loss([probs[index[id(f)]] for f in sample])
        errors = [
            abs(mean_loss(random.Random(seed).sample(probs, len(sample))) / full - 1)
            for seed in range(1, args.draws + 1)
        ]
        ranks = [
            chosen_rank(law, ell, args.target_recall, x, args.max_rank) for x in (full, planned)
        ]
        print(
            f"{kind}: {len(facts)} sequences, ℓ={ell}; L0 on all {full:.3f} nats ({full_s:.1f} s), "
            f"on the planner's {len(sample)} {planned:.3f} ({sample_s:.1f} s, "
            f"time ratio {sample_s / full_s:.2f}); error {abs(planned / full - 1):.1%}, "
            f"worst of {args.draws} other samples {max(errors):.1%}; rank chosen from all "
            f"{ranks[0]}, from the sample {ranks[1]}",
            flush=True,
        )
    print(f"(sample size LOSS_SAMPLE_SEQUENCES = {LOSS_SAMPLE_SEQUENCES})")


if __name__ == "__main__":
    main()
