"""Time to full recall against LoRA rank, in one run: the same facts trained with MemFT to 100%
fact recall at each rank. It prices the planner's best-effort choice: where the law is flat in
rank, the planner takes a small rank (fewer parameters) rather than the largest (the old
fallback); this shows what that costs or saves in training time.

    cd bench && ../.venv/bin/python rank_speed.py [--ranks 1,4,16] [--facts-file FILE]

Prints steps, wall time and final lowest target-token probability per rank, and each rank's
ratios against the largest rank (the old fallback) measured in the same run.
"""

from common import parser, setup, train

from memupdate.memory.encoding import encode_facts, model_context_length
from memupdate.memory.facts import load_facts


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--ranks", default="1,4,16")
    p.add_argument("--facts-file", default="../examples/new_facts.jsonl")
    args = p.parse_args()
    _, load = setup(args)
    model, tok = load()
    facts = encode_facts(load_facts(args.facts_file), tok, model_context_length(model))
    ranks = [int(r) for r in args.ranks.split(",")]
    results = {}
    for rank in ranks:
        res = train(load, facts, rank, args.seed, args.max_steps)
        results[rank] = res
        print(
            f"rank {rank:3d}: success={res.success} steps={res.steps} seconds={res.seconds:.1f} "
            f"fact_recall={res.recall.fact_recall:.3f} min_p={res.recall.min_prob:.3f}",
            flush=True,
        )
    top = results[max(ranks)]
    print(f"{len(facts)} facts, ℓ={top.sequence_length}; ratios against rank {max(ranks)}:")
    for rank, res in results.items():
        if res.success and top.success:
            print(
                f"  rank {rank:3d}: steps {res.steps / top.steps:.2f}, "
                f"wall time {res.seconds / top.seconds:.2f}"
            )
        else:
            print(f"  rank {rank:3d}: not comparable (a run did not reach full recall)")


if __name__ == "__main__":
    main()
