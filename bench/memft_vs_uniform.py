"""MemFT against uniform cross-entropy (and MemFT variants), on the same facts, rank and seed,
in one run, for each kind of fact.

Both modes pay for the same checks (every visit of a fact refreshes what is known about it; a
check of every fact confirms the end), counted in tokens and time. Runs alternate their order
from one kind to the next, so neither always runs first. For each kind it prints, per variant:
wall time, steps and tokens to 100% fact recall, and token recall after a fixed budget of epochs;
then ratios to uniform.

    .venv/bin/python bench/memft_vs_uniform.py --kinds all [--facts 40] [--rank 8]
        [--variants uniform,memft,memft-all,memft-soft,memft-band,uniform-lr5e-3]
        [--budget-epochs 8]
"""

import math

import torch
from common import fact_set, kinds, parser, setup, train


def soft_weights(logp: torch.Tensor, threshold: float) -> torch.Tensor:
    """The paper's soft variant: sigmoid(10 (loss - loss at the threshold))."""
    return torch.sigmoid(10 * (-logp.detach() + math.log(threshold)))


def band_weights(logp: torch.Tensor, threshold: float) -> torch.Tensor:
    """Threshold weights, plus a small weight for passed tokens still under p 0.9."""
    p = logp.detach().exp()
    return torch.where(p <= threshold, 1.0, torch.where(p < 0.9, 0.1, 0.0))


# The paper's line: weight 0 as soon as a token passes the stopping threshold (0.5 + margin 0.1).
PAPER_LINE = 0.6
# name: (mode, extra TrainSettings / train_adapter arguments)
VARIANTS = {
    "uniform": ("uniform", {}),
    # the trainer's default: train tokens until p > 0.9, loss divided by all tokens, revisit
    # solid facts at 1x the others
    "memft": ("memft", {}),
    # the paper's code: weight 0 above the stopping threshold, mean over the weighted tokens
    "memft-paper": ("memft", {"train_until": PAPER_LINE, "replay": None, "mean_over_all": False}),
    "memft-until0.9-meanweighted-all": ("memft", {"replay": None, "mean_over_all": False}),
    "memft-r0.25": ("memft", {"replay": 0.25}),
    "memft-until0.8": ("memft", {"train_until": 0.8}),
    "memft-meanweighted": ("memft", {"mean_over_all": False}),
    "memft-all": ("memft", {"replay": None}),
    "memft-paper-meanall": ("memft", {"train_until": PAPER_LINE, "replay": None}),
    "memft-until0.95": ("memft", {"train_until": 0.95}),
    "memft-until0.99": ("memft", {"train_until": 0.99}),
    "memft-soft": (
        "memft",
        {
            "train_until": PAPER_LINE,
            "replay": None,
            "mean_over_all": False,
            "token_weights": soft_weights,
        },
    ),
    "memft-band": (
        "memft",
        {
            "train_until": PAPER_LINE,
            "replay": None,
            "mean_over_all": False,
            "token_weights": band_weights,
        },
    ),
    "memft-fp32": ("memft", {"bf16": False}),
    "memft-eager": ("memft", {"compile": False}),
    "memft-compiled": ("memft", {"compile": True}),
    "uniform-fp32": ("uniform", {"bf16": False}),
}


def variant(name: str):
    """(mode, extra settings) of a named variant, or of NAME-lrRATE (e.g. uniform-lr5e-3,
    memft-all-lr5e-3): that variant with the default family at another learning rate; None for
    an unknown name."""
    if name in VARIANTS:
        return VARIANTS[name]
    base, _, rate = name.rpartition("-lr")
    if base not in VARIANTS:
        return None
    try:
        lr = float(rate)
    except ValueError:
        return None
    mode, extra = VARIANTS[base]
    return mode, {**extra, "lr": lr}


def run(load, facts, args, name, max_steps):
    mode, extra = variant(name)
    return train(load, facts, args.rank, args.seed, max_steps, mode, **extra)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--variants", default="uniform,memft")
    p.add_argument("--budget-epochs", type=int, default=8, help="fixed budget for token recall")
    args = p.parse_args()
    names = args.variants.split(",")
    if unknown := [n for n in names if variant(n) is None]:
        choices = f"{list(VARIANTS)}, each also as NAME-lrRATE"
        raise SystemExit(f"unknown variants {unknown}; choose from {choices}")
    _, load = setup(args)
    for k, kind in enumerate(kinds(args)):
        facts = fact_set(load, kind, args.facts, args.seed)
        ell = sum(len(f.target_ids) for f in facts)
        budget = args.budget_epochs * math.ceil(len(facts) / 16)
        print(f"\n{kind}: {len(facts)} facts, ℓ={ell}, rank {args.rank}, seed {args.seed}")
        order = names if k % 2 == 0 else names[::-1]
        full, fixed = {}, {}
        for name in order:
            full[name] = res = run(load, facts, args, name, args.max_steps)
            fixed[name] = short = run(load, facts, args, name, budget)
            print(
                f"  {name:18s} to full recall: success={res.success} {res.seconds:6.1f} s "
                f"steps={res.steps} optimizer_steps={res.optimizer_steps} epochs={res.epochs} "
                f"tokens={res.tokens_processed} min_p={res.recall.min_prob:.3f} | after "
                f"{args.budget_epochs} epochs: token recall {short.recall.token_recall:.3f}, "
                f"fact recall {short.recall.fact_recall:.3f}",
                flush=True,
            )
        if "uniform" not in full or not full["uniform"].success:
            print("  ratios not comparable: uniform did not reach 100% fact recall")
            continue
        u, u_fixed = full["uniform"], fixed["uniform"].recall.token_recall
        for name in names:
            r = full[name]
            verdict = "" if r.success else " (did not reach full recall: ratios are lower bounds)"
            print(
                f"  {name:18s} / uniform: wall time {r.seconds / u.seconds:.2f}, steps "
                f"{r.steps / u.steps:.2f}, tokens {r.tokens_processed / u.tokens_processed:.2f}; "
                f"token recall at {args.budget_epochs} epochs "
                f"{fixed[name].recall.token_recall:.3f} vs {u_fixed:.3f}"
                f"{verdict}"
            )


if __name__ == "__main__":
    main()
