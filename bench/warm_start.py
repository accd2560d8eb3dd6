"""Warm starts against a fresh training: adding 10 facts to a trained base, at the trainer.

Trains a base of `--base` facts to full recall from a fresh adapter and saves it, then, per
variant, trains the base plus 10 new facts starting from that adapter (what an incremental update
does), and once more from a fresh adapter (the baseline, in the same run). Prints wall time,
steps, and the lowest fact recall seen while training (how far the old facts were knocked back).

    .venv/bin/python bench/warm_start.py --kinds all [--base 40] [--rank 16]
        [--variants fresh,warm,warm-lr0.2] [--gate]

`--gate` trains the gated family (what `memupdate serve --gate` jobs train); `warm-lrX` is a warm
start at X times the family's learning rate; `warm-replayX` one that revisits solid facts at X
times the facts still training per epoch (the trainer's default is 1), `warm-replay-all` every
fact every epoch.
"""

import tempfile
from dataclasses import replace
from pathlib import Path

from common import fact_set, kinds, parser, setup

from memupdate.memory.adapter import default_family, gated_family
from memupdate.memory.locality import retain_set
from memupdate.memory.memft import TrainSettings, train_adapter

# Variants measured on 2026-11-30 and dropped (docs/benchmarks.md, "Warm starts"): a 10-step
# learning-rate warm-up, and weight 1 on the tokens of replayed solid facts, both settings of
# TrainSettings in commit 7f0a72a (`warmup_steps`, `anchor_solid`); stacked updates (the saved
# adapter frozen, a block of rank 1 or 4 trained on top), commit 16ed814 (`freeze_start`).
REPLAY = 1.0  # TrainSettings' default
VARIANTS = {"fresh": (False, 1.0, REPLAY), "warm": (True, 1.0, REPLAY)}


def variant(name: str) -> tuple[bool, float, float | None]:
    """(warm start?, learning-rate scale, replay share of solid facts) of a variant name."""
    if name.startswith("warm-lr"):
        return True, float(name.removeprefix("warm-lr")), REPLAY
    if name.startswith("warm-replay"):
        share = name.removeprefix("warm-replay")
        return True, 1.0, None if share == "-all" else float(share)
    if name not in VARIANTS:
        raise SystemExit(
            f"unknown variant {name!r}: fresh, warm, warm-lrSCALE, warm-replaySHARE or "
            "warm-replay-all"
        )
    return VARIANTS[name]


def run(load, facts, args, start_from=None, save_to=None, lr_scale=1.0, replay=REPLAY):
    model, tok = load()
    family = (gated_family if args.gate else default_family)(model.config.num_hidden_layers)
    family = replace(family, learning_rate=family.learning_rate * lr_scale)
    settings = TrainSettings(
        rank=args.rank, family=family, seed=args.seed, max_steps=args.max_steps, replay=replay
    )
    lowest = [1.0]

    def watch(p):
        if p.step > 1:
            lowest[0] = min(lowest[0], p.fact_recall)

    peft_model, result = train_adapter(
        model,
        facts,
        tok.pad_token_id,
        settings,
        watch,
        start_from,
        retain=retain_set(model, tok, family, seed=args.seed),
    )
    if save_to is not None:
        peft_model.save_pretrained(save_to)
    return result, lowest[0]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--base", type=int, default=40)
    p.add_argument("--variants", default="fresh,warm")
    p.add_argument("--gate", action="store_true", help="the gated family (serve --gate)")
    p.set_defaults(rank=16)
    args = p.parse_args()
    _, load = setup(args)
    names = args.variants.split(",")
    for name in names:
        variant(name)  # an unknown name stops the run before any training
    for k, kind in enumerate(kinds(args)):
        facts = fact_set(load, kind, args.base + 10, args.seed)
        base = fact_set(load, kind, args.base + 10, args.seed, first=args.base)
        with tempfile.TemporaryDirectory() as tmp:
            saved = Path(tmp) / "base"
            built, _ = run(load, base, args, save_to=saved)
            print(f"\n{kind}: base of {args.base} built in {built.seconds:.0f} s; +10 facts:")
            times = {}
            for name in names if k % 2 == 0 else names[::-1]:
                warm, lr_scale, replay = variant(name)
                start = saved if warm else None
                res, lowest = run(load, facts, args, start, lr_scale=lr_scale, replay=replay)
                times[name] = res.seconds
                print(
                    f"  {name:20s} {res.seconds:6.1f} s, {res.steps:4d} steps, success "
                    f"{res.success}, lowest fact recall while training {lowest:.2f}",
                    flush=True,
                )
            if "fresh" in times:
                print("  " + ", ".join(f"{n} {t / times['fresh']:.2f}" for n, t in times.items()))


if __name__ == "__main__":
    main()
