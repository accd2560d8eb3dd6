"""Which form of the law predicts best, and does rank carry information? Fits a points.jsonl
in four forms, with the law's censored errors (a run that recalled every fact counts only if
under-predicted), and prints R² (log reduction), the leave-one-out mean |Δ log reduction|, and,
when the points span several kinds of facts, the mean |predicted − achieved fact recall| on each
kind from a fit to the other kinds only (the law meeting a kind of fact it has never seen):

    cd bench && ../.venv/bin/python law_forms.py [POINTS ...] [--measure tokens|hard|novel|bits]
    (default: the default family's calibration points)

`--measure` says what ℓ counts: target tokens (the law's, default); `hard`, the target tokens the
base model gets wrong (p ≤ 0.5, what MemFT works on; observable when a job is planned); `novel`,
those it still gets wrong with other facts of the set in context (memory/novelty.py, what a law
with length "novel" counts; taken from the points when they carry it); `bits`,
facts × the information their generator chose (fact_sets.fact_bits; known only for the seeded
kinds, so an analysis, not something a planner could use). Both rebuild each point's facts from
its source (kind, ℓ, seed), so they need the base model.

absolute:           ΔL = C·r^α·ℓ^−β + b         (the paper's form)
relative:           ΔL / L0 = C·r^α·ℓ^−β + b    (the share of the base loss removed)
residual:           L / L0 = C·r^α·ℓ^−β + b     (the share of the base loss left)
... rank-free:      the same with α fixed at 0
If dropping r costs nothing, the law's rank choice carries no information at that budget.
"""

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from memupdate.memory.calibration import load_points
from memupdate.memory.law import ParametricMemoryLaw, fit_link, log_errors

FORMS = {  # name -> (response, with rank)
    "absolute": ("absolute", True),
    "absolute rank-free": ("absolute", False),
    "relative": ("relative", True),
    "relative rank-free": ("relative", False),
    "residual": ("residual", True),
    "residual rank-free": ("residual", False),
}


def fit(points, response, with_rank) -> ParametricMemoryLaw:
    """Least squares on censored log errors from a few starting points; the best of them, with
    the law's recall link fitted to the same points."""
    r, ell = arrays(points)
    y = np.array([p.reduction(response) for p in points])

    def residuals(x):
        return log_errors(curve(x, r, ell, with_rank), points, response)

    best = None
    for offset in (-100, -10, -1, 0, 0.3 * y.min()):
        for beta in (0.01, 0.3, 1.0):
            start = [np.log(max(y.mean() - offset, 1e-3)) + beta * np.log(ell.mean()), 0.05]
            result = least_squares(residuals, [*start, beta, offset])
            if best is None or result.cost < best.cost:
                best = result
    log_c, alpha, beta, b = best.x
    return ParametricMemoryLaw(
        C=float(np.exp(log_c)),
        alpha=float(alpha if with_rank else 0.0),
        beta=float(beta),
        b=float(b),
        response=response,
        **fit_link(points),
    )


def curve(x, r, ell, with_rank):
    log_c, alpha, beta, offset = x
    return np.exp(log_c) * r ** (alpha if with_rank else 0) * ell**-beta + offset


def arrays(points):
    r = np.array([p.rank for p in points], float)
    return r, np.array([p.sequence_length for p in points], float)


def remeasured(points, measure: str):
    """The points with ℓ counted as `measure` (see the module doc)."""
    import torch
    from common import parser, setup

    from memupdate.memory.calibration import fact_set_source, run_case
    from memupdate.memory.encoding import encode_facts, fact_count, model_context_length
    from memupdate.memory.fact_sets import fact_bits
    from memupdate.memory.novelty import novel_share
    from memupdate.memory.recall import PASS_PROBABILITY, token_probabilities

    _, load = setup(parser(__doc__).parse_args([]))
    model, tok = load()
    context = model_context_length(model)
    sizes: dict[tuple, int] = {}  # the ranks trained on one fact set share its size
    out = []
    for point in points:
        case = run_case(point.source)
        if case not in sizes:
            kind, ell, seed = case
            facts = fact_set_source(lambda f: encode_facts(f, tok, context), kind, seed, ell)
            if measure == "bits":
                sizes[case] = round(fact_count(facts) * fact_bits(kind))
            elif measure == "novel":
                share = point.novel_share or novel_share(model, facts, tok.pad_token_id)
                sizes[case] = round(point.sequence_length * share)
            else:
                probs = torch.cat(token_probabilities(model, facts, tok.pad_token_id))
                sizes[case] = int((probs <= PASS_PROBABILITY).sum())
        size = sizes[case]
        print(f"  {point.source}: ℓ {point.sequence_length} tokens, {size} {measure}")
        out.append(dataclasses.replace(point, sequence_length=size))
    return out


def main() -> None:
    default = Path(__file__).parents[1] / "docs/calibration/SmolLM2-135M-Instruct/points.jsonl"
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("points", nargs="*", type=Path, default=[default])
    p.add_argument("--measure", choices=("tokens", "hard", "novel", "bits"), default="tokens")
    args = p.parse_args()
    points = [point for path in args.points for point in load_points(path).values()]
    if args.measure != "tokens":
        points = remeasured(points, args.measure)
    kinds = sorted({p.kind for p in points})
    print(f"{len(points)} points from {', '.join(map(str, args.points))}; ℓ as {args.measure}")
    print(f"kinds {kinds}")
    header = "form                R² log  LOO |Δlog|  fact recall |Δ|"
    print(header + "".join(f"  {k or '-'} unseen" for k in kinds if len(kinds) > 1))
    for name, (response, with_rank) in FORMS.items():
        law = fit(points, response, with_rank)
        y = np.log([p.reduction(response) for p in points])
        predicted = np.array([law.reduction(p.rank, p.sequence_length) for p in points])
        errors = log_errors(predicted, points, response)
        r2 = 1 - (errors**2).sum() / ((y - y.mean()) ** 2).sum()
        loo = []
        for i, held in enumerate(points):
            partial = fit(points[:i] + points[i + 1 :], response, with_rank)
            guess = np.array([partial.reduction(held.rank, held.sequence_length)])
            loo.append(abs(log_errors(guess, [held], response)[0]))
        row = f"{name:18s}  {r2:6.3f}  {np.mean(loo):10.3f}  {law.recall_error(points):15.3f}"
        for kind in kinds if len(kinds) > 1 else []:
            others = fit([p for p in points if p.kind != kind], response, with_rank)
            error = others.recall_error([p for p in points if p.kind == kind])
            row += f"  {error:>{len(kind) + 7}.3f}"
        print(row + f"   α={law.alpha:.4f} β={law.beta:.4f}", flush=True)


if __name__ == "__main__":
    main()
