"""Would the law choose better if it were refitted on the held-out cases' trainings? Leave one
case out: for each case of `rank_choice.py`'s points file (kind, ℓ, seed), fit the law on the
calibration points plus every other case's trainings, let it choose for the held-out case as the
planner would (the smallest rank predicted to reach the target, else its best effort), and read
what that rank achieves from the case's own trainings. Nothing is trained: a rank the case did
not train counts as meeting the target when a smaller trained rank met it, and as missing it
when a larger trained rank missed it (the oracle walk's assumption); otherwise it is unknown.
The baseline law's choice (default: the folder's law.json, the one shipped) is printed beside
it.

    cd bench && ../.venv/bin/python law_refit.py \
        --calibration ../docs/calibration/SmolLM2-135M-Instruct-L25 --targets phonebook:5005:0.9,...

Targets are each case's requested fact recall (rank_choice's `--cases` give them), by kind and
the case's ℓ; a case without one is skipped.
"""

import argparse
from functools import partial
from pathlib import Path

from memupdate.memory.adapter import RANK_LADDER
from memupdate.memory.calibration import (
    fact_set_source,
    fill_novel_shares,
    fit_with_holdout,
    load_points,
    run_case,
)
from memupdate.memory.law import ParametricMemoryLaw


def achieved(trained: dict[int, float], rank: int, target: float) -> bool | None:
    """Whether `rank` meets `target`, from the case's trainings (monotone in rank)."""
    if rank in trained:
        return trained[rank] >= target
    if any(r < rank and recall >= target for r, recall in trained.items()):
        return True
    if any(r > rank and recall < target for r, recall in trained.items()):
        return False
    return None


def fill_shares(paths: list[Path]) -> None:
    """Measure the novel share of every point in these files that lacks one (the base model's
    pass over each point's rebuilt facts; rewrites the files)."""
    from common import parser, setup

    from memupdate.memory.encoding import encode_facts, model_context_length

    _, load = setup(parser(__doc__).parse_args([]))
    model, tok = load()

    def source(kind, seed, ell):
        encode = partial(encode_facts, tokenizer=tok, max_length=model_context_length(model))
        return fact_set_source(encode, kind, seed, ell)

    for path in paths:
        filled = fill_novel_shares(path, model, tok.pad_token_id, source)
        print(f"{path}: measured the novel share of {filled} point(s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--calibration", type=Path, required=True, help="folder: law.json, points")
    p.add_argument("--baseline", type=Path, help="the law to compare with (default: law.json)")
    p.add_argument(
        "--held-out", type=Path, nargs="+", help="points files (default: held-out-points.jsonl)"
    )
    p.add_argument("--targets", required=True, help="kind:ℓ:target, comma-separated")
    p.add_argument("--max-rank", type=int, default=64)
    p.add_argument("--response", help="the refit's response (default: the baseline's)")
    p.add_argument("--length", help="the refit's ℓ: tokens or novel (default: the baseline's)")
    p.add_argument("--ship-to", type=Path, help="write the law refitted on every point here")
    args = p.parse_args()
    baseline = ParametricMemoryLaw.load(args.baseline or args.calibration / "law.json")
    files = args.held_out or [args.calibration / "held-out-points.jsonl"]
    if (args.length or baseline.length) == "novel":  # points from before the share: measure it
        fill_shares([args.calibration / "points.jsonl", *files])
    held = [point for path in files for point in load_points(path).values()]
    # points.jsonl may hold the held-out points too (once a law was refitted on them): not here.
    held_sources = {p.source for p in held}
    calibration = [
        p
        for p in load_points(args.calibration / "points.jsonl").values()
        if p.source not in held_sources
    ]
    targets = {}
    for text in args.targets.split(","):
        kind, ell, target = text.split(":")
        targets[(kind, int(ell))] = float(target)
    cases: dict[tuple, list] = {}
    for point in held:
        cases.setdefault(run_case(point.source), []).append(point)
    ladder = [r for r in RANK_LADDER if r <= args.max_rank]
    response = args.response or baseline.response
    length = args.length or baseline.length
    meta = {k: getattr(baseline, k) for k in ("base_model", "family", "training")}

    columns = ["kind", "ℓ", "target", "oracle", "baseline: rank (predicted, met)", "refit: same"]
    print("| " + " | ".join(columns) + " |")
    print("| --- | --- | --- | --- | --- | --- |")
    totals = {"baseline": [], "refit": []}
    for (kind, ell, seed), points in sorted(cases.items(), key=lambda c: (c[0][1], c[0][0])):
        target = targets.get((kind, ell))
        if target is None:
            continue
        trained = {p.rank: p.fact_recall for p in points}
        oracle = next((r for r in ladder if achieved(trained, r, target)), None)
        others = [p for c, ps in cases.items() if c != (kind, ell, seed) for p in ps]
        refit = ParametricMemoryLaw.fit_points([*calibration, *others], response, length)
        loss_before = points[0].loss_before_nats
        row = [kind, str(ell), str(target), str(oracle)]
        for name, law in (("baseline", baseline), ("refit", refit)):
            size = law.point_size(points[0])  # ℓ as this law counts it
            plan, _ = law.plan(size, target, loss_before, max_rank=args.max_rank)  # as jobs do
            rank, predicted = plan.rank, plan.predicted_fact_recall
            met = achieved(trained, rank, target)
            actual = trained.get(rank)
            steps = ladder.index(rank) - ladder.index(oracle) if oracle else None
            totals[name].append((met, steps, None if actual is None else abs(predicted - actual)))
            said = "?" if met is None else "yes" if met else "no"
            row.append(f"{rank} ({predicted:.3f}, {said})")
        print("| " + " | ".join(row) + " |")
    for name, rows in totals.items():
        met = sum(1 for m, _, _ in rows if m)
        near = sum(1 for _, s, _ in rows if s is not None and 0 <= s <= 1)
        errors = [e for _, _, e in rows if e is not None]
        print(
            f"{name}: {len(rows)} cases; target met {met}; oracle or one step above {near}; "
            f"mean |predicted − achieved| {sum(errors) / max(len(errors), 1):.3f} over the "
            f"{len(errors)} cases that trained the chosen rank"
        )
    if args.ship_to:
        law = fit_with_holdout([*calibration, *held], response, length, **meta)
        law.save(args.ship_to)
        fit = law.fit
        print(
            f"refitted on {len(calibration) + len(held)} points: C={law.C:.3g} "
            f"alpha={law.alpha:.3f} beta={law.beta:.3f} b={law.b:.3f} L50={law.L50:.3f} "
            f"k={law.k:.1f}; leave-one-out |Δ fact recall| "
            f"{fit['holdout_mean_abs_fact_recall']:.3f}, "
            f"|Δ log| {fit['holdout_mean_abs_log_dl']:.3f}; kinds left out {fit['holdout_kinds']}"
        )


if __name__ == "__main__":
    main()
