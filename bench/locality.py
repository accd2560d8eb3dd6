"""Locality with and without the training's locality terms, on the same facts, rank and seed.

For each kind of fact and each pair of term weights (KL term : update norm, memory/locality.py)
it trains a fresh adapter to full fact recall and measures: per-token argmax agreement with the
base model on the shipped measurement text, the mean KL(base || adapted) per token there, and the
share of 48 general prompts whose 16-token greedy continuation is unchanged; then the training
time as a ratio to the run without either term (0:0) of the same kind. Runs alternate their order
per kind.

    .venv/bin/python bench/locality.py --kinds all [--facts 40] [--rank 8] [--terms 0:0,4:0,0:1000]
        [--layers 25]
"""

from dataclasses import replace

from common import fact_set, kinds, parse_layers, parser, setup, train_and_measure

from memupdate.memory.adapter import default_family


def main() -> None:
    p = parser(__doc__)
    p.add_argument(
        "--terms",
        default="0:0,4:0,0:1000",
        help="comma list of KL-weight:norm-weight pairs to compare (0:0: no term)",
    )
    p.add_argument("--layers", help="adapt these layers instead of the family's (25, or 8+20)")
    args = p.parse_args()
    terms = [tuple(float(w) for w in t.split(":")) for t in args.terms.split(",")]
    _, load = setup(args)
    model, _ = load()
    family = default_family(model.config.num_hidden_layers)
    if args.layers:
        family = replace(family, layers=parse_layers(args.layers))
    for k, kind in enumerate(kinds(args)):
        facts = fact_set(load, kind, args.facts, args.seed)
        ell = sum(len(f.target_ids) for f in facts)
        print(f"\n{kind}: {len(facts)} sequences, ℓ={ell}, rank {args.rank}, seed {args.seed}")
        results = {}
        for kl, norm in terms if k % 2 == 0 else terms[::-1]:
            res, loc, _ = train_and_measure(
                load,
                facts,
                args.rank,
                args.seed,
                args.max_steps,
                family=replace(family, locality_weight=kl, norm_weight=norm),
            )
            results[kl, norm] = (res, loc)
            print(
                f"  KL {kl:g}, norm {norm:g}: fact recall {res.recall.fact_recall:.3f} "
                f"({'success' if res.success else res.stop_reason}), {res.seconds:6.1f} s, "
                f"{res.steps} steps, {res.epochs} epochs; {loc.line()}",
                flush=True,
            )
        if (0.0, 0.0) in results:
            base_s = results[0.0, 0.0][0].seconds
            for (kl, norm), (res, loc) in results.items():
                print(
                    f"  KL {kl:g}, norm {norm:g} / no term: time {res.seconds / base_s:.2f}; "
                    f"agreement {loc.token_agreement:.3f}, KL {loc.kl_nats:.4f}, prompts "
                    f"unchanged {loc.prompts_unchanged:.2f}"
                )


if __name__ == "__main__":
    main()
