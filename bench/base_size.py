"""How a knowledge base's size changes when its training starts to learn: token recall per epoch.

Trains facts of each kind asked for (`--kinds`, phone numbers by default; each fact with its
default chat form) with the gated family from a fresh adapter, with the learning rate held (a
20,000-step schedule, as a service job's) and a time budget, and prints token recall, loss and
fact recall at each epoch's start. A phone number's digits start at chance (about 1 token of 11
per form passes: the end of the answer), so the epoch at which token recall first reaches 0.15
is where the facts' own tokens started to be learned.
The table at the end gives each variant's time against the first variant's on the same facts,
and its token and fact recall in the final full-model check.

    cd bench && BENCH_THREADS=1 ../.venv/bin/python base_size.py --facts 300 --rank 16 \
        [--alpha 128] [--lr 5e-3] [--seconds 700] [--variants family,grad_clip=2]

`--alpha` sets LoRA's alpha (the update is scaled by alpha / rank; the family's is 32).
`--variants` trains once per variant, one after another in this run. A variant is `family` (the
gated family as it is) or family settings joined by `+`, e.g. `grad_clip=2+learning_rate=2.5e-3`
(any number-valued field of memory/adapter.py's AdapterFamily: b_lr_ratio, grad_clip, ...).
"""

from dataclasses import replace

from common import fact_set, kinds, parser, setup, train

from memupdate.memory.adapter import gated_family

ONSET = 0.15  # token recall at which the digits have started to be learned


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--lr", type=float, default=5e-3, help="learning rate (the gated family's)")
    p.add_argument("--alpha", type=float, default=0, help="LoRA alpha (0: the family's)")
    p.add_argument("--seconds", type=float, default=700, help="time budget of each training")
    p.add_argument("--variants", default="family", help="comma list of variants")
    args = p.parse_args()
    _, load = setup(args)
    model, _ = load()
    family = replace(gated_family(model.config.num_hidden_layers), learning_rate=args.lr)
    if args.alpha:
        family = replace(family, alpha=args.alpha)
    rows = []
    for kind in kinds(args):
        facts = fact_set(load, kind, args.facts, seed=7000 + args.facts)
        first = None
        for variant in args.variants.split(","):
            changes = dict(item.split("=") for item in variant.split("+") if item != "family")
            chosen = replace(family, **{k: float(v) for k, v in changes.items()})
            print(f"\n{kind}, variant {variant}: {chosen}", flush=True)
            result, onset = run(load, facts, args, chosen)
            first = first or result
            rows.append(
                f"| {kind} | {variant} | {onset or 'never'} | {result.epochs} | {result.steps} | "
                f"{result.seconds:.0f} | {result.seconds / first.seconds:.2f} | "
                f"{result.recall.token_recall:.3f} | {result.recall.fact_recall:.3f} | "
                f"{result.stop_reason} |"
            )
    print(
        "\n| kind | variant | start of learning (epoch) | epochs | steps | seconds | time ratio | "
        "token recall | fact recall | stop |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


def run(load, facts, args, family):
    """One training from a fresh adapter; (TrainResult, first epoch at ONSET or None)."""
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
        max_seconds=args.seconds,
        on_progress=on_progress,
    )
    scale, lr = family.alpha / args.rank, family.learning_rate
    print(
        f"{args.facts} facts ({len(facts)} sequences), rank {args.rank}, alpha {family.alpha:g} "
        f"(scale {scale:g}), lr {lr:g}: {result.epochs} epochs, {result.steps} steps in "
        f"{result.seconds:.0f} s ({result.stop_reason}); token recall first at {ONSET} in epoch "
        f"{seen['onset'] or 'never'}; final fact recall {result.recall.fact_recall:.3f}"
    )
    return result, seen["onset"]


if __name__ == "__main__":
    main()
