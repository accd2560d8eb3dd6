"""Locality with and without the training's locality term, on the same facts, rank and seed.

For each kind of fact and each locality weight it trains a fresh adapter to full fact recall
and measures (memory/locality.py): per-token argmax agreement with the base model on the shipped
measurement text, the mean KL(base || adapted) per token there, and the share of 48 general
prompts whose 16-token greedy continuation is unchanged; then the training time as a ratio to
the run without the term (weight 0) of the same kind. Runs alternate their order per kind.

    .venv/bin/python bench/locality.py --kinds all [--facts 40] [--rank 8] [--weights 0,1]
"""

from dataclasses import replace

from common import fact_set, kinds, parser, setup, train_and_measure

from memupdate.memory.adapter import default_family


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--weights", default="0,1", help="locality weights to compare (0: no term)")
    args = p.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    _, load = setup(args)
    model, _ = load()
    family = default_family(model.config.num_hidden_layers)
    for k, kind in enumerate(kinds(args)):
        facts = fact_set(load, kind, args.facts, args.seed)
        ell = sum(len(f.target_ids) for f in facts)
        print(f"\n{kind}: {len(facts)} facts, ℓ={ell}, rank {args.rank}, seed {args.seed}")
        results = {}
        for w in weights if k % 2 == 0 else weights[::-1]:
            res, loc, _ = train_and_measure(
                load,
                facts,
                args.rank,
                args.seed,
                args.max_steps,
                family=replace(family, locality_weight=w),
            )
            results[w] = (res, loc)
            print(
                f"  weight {w:5.2f}: fact recall {res.recall.fact_recall:.3f} "
                f"({'success' if res.success else res.stop_reason}), {res.seconds:6.1f} s, "
                f"{res.epochs} epochs; {loc.line()}",
                flush=True,
            )
        if 0.0 in results:
            base_s = results[0.0][0].seconds
            for w, (res, loc) in sorted(results.items()):
                print(
                    f"  weight {w:5.2f} / no term: time {res.seconds / base_s:.2f}; agreement "
                    f"{loc.token_agreement:.3f}, prompts unchanged {loc.prompts_unchanged:.2f}"
                )


if __name__ == "__main__":
    main()
