"""How a knowledge base's size changes when its training starts to learn: token recall per epoch.

Trains phone numbers (each with its default chat form) with the gated family from a fresh
adapter, with the learning rate held (a 20,000-step schedule, as a service job's) and a time
budget, and prints token recall, loss and fact recall at each epoch's start. A phone number's
digits start at chance (about 1 token of 11 per form passes: the end of the answer), so the epoch
at which token recall first reaches 0.15 is where the facts' own tokens started to be learned.

    cd bench && BENCH_THREADS=1 ../.venv/bin/python base_size.py --facts 300 --rank 16 \
        [--alpha 128] [--lr 5e-3] [--seconds 700]

`--alpha` sets LoRA's alpha (the update is scaled by alpha / rank; the family's is 32).
"""

from dataclasses import replace

from common import fact_set, parser, setup, train

from memupdate.memory.adapter import gated_family

ONSET = 0.15  # token recall at which the digits have started to be learned


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--lr", type=float, default=5e-3, help="learning rate (the gated family's)")
    p.add_argument("--alpha", type=float, default=0, help="LoRA alpha (0: the family's)")
    p.add_argument("--seconds", type=float, default=700, help="time budget of the training")
    args = p.parse_args()
    _, load = setup(args)
    facts = fact_set(load, "phonebook", args.facts, seed=7000 + args.facts)
    model, _ = load()
    family = gated_family(model.config.num_hidden_layers)
    if args.alpha:
        family = replace(family, alpha=args.alpha)
    seen = {"epoch": 0, "onset": None}

    def on_progress(p) -> None:
        if p.epoch == seen["epoch"]:
            return
        seen["epoch"] = p.epoch
        if seen["onset"] is None and p.token_recall >= ONSET:
            seen["onset"] = p.epoch
        print(
            f"epoch {p.epoch:3d}  step {p.step:5d}  {p.seconds:6.0f} s  loss {p.loss:.3f}  "
            f"token recall {p.token_recall:.4f}  fact recall {p.fact_recall:.3f}",
            flush=True,
        )

    result = train(
        load,
        facts,
        args.rank,
        args.seed,
        max_steps=20000,
        family=family,
        lr=args.lr,
        max_seconds=args.seconds,
        on_progress=on_progress,
    )
    scale = family.alpha / args.rank
    print(
        f"\n{args.facts} facts ({len(facts)} sequences), rank {args.rank}, alpha {family.alpha:g} "
        f"(scale {scale:g}), lr {args.lr:g}: {result.epochs} epochs, {result.steps} steps in "
        f"{result.seconds:.0f} s ({result.stop_reason}); token recall first at {ONSET} in epoch "
        f"{seen['onset'] or 'never'}; final fact recall {result.recall.fact_recall:.3f}"
    )


if __name__ == "__main__":
    main()
