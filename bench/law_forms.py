"""Does rank carry information in the calibration points? Fits four forms of the law to a
points.jsonl and prints R² (log ΔL) on all points and leave-one-out mean |Δ log ΔL|, both with
the law's censored errors (a run that recalled every fact counts only if under-predicted):

    cd bench && ../.venv/bin/python law_forms.py [POINTS]   (default: the step-budget law's points)

full:          ΔL = C·r^α·ℓ^−β + b      (the Parametric Memory Law)
rank-free:     ΔL = C·ℓ^−β + b          (α fixed at 0)
power:         ΔL = C·r^α·ℓ^−β          (b fixed at 0)
rank-free pow: ΔL = C·ℓ^−β
If dropping r costs nothing, the law's rank choice carries no information at that budget.
"""

import sys
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from memupdate.memory.calibration import load_points
from memupdate.memory.law import log_errors

FORMS = {"full": (True, True), "rank-free": (False, True), "power": (True, False)}
FORMS["rank-free pow"] = (False, False)


def predict(x, r, ell, with_rank, with_offset):
    log_c, alpha, beta, offset = x
    return np.exp(log_c) * r ** (alpha if with_rank else 0) * ell**-beta + (
        offset if with_offset else 0
    )


def fit(points, with_rank, with_offset):
    """Least squares on censored log ΔL errors from a few starting points; the best of them."""
    r, ell, dl = arrays(points)

    def residuals(x):
        return log_errors(predict(x, r, ell, with_rank, with_offset), points)

    best = None
    for offset in [-100, -10, -1, 0, 0.3] if with_offset else [0.0]:
        for beta in (0.01, 0.3, 1.0):
            start = [np.log(max(dl.mean() - offset, 1e-3)) + beta * np.log(ell.mean()), 0.05]
            result = least_squares(residuals, [*start, beta, offset])
            if best is None or result.cost < best.cost:
                best = result
    return best.x


def arrays(points):
    r = np.array([p.rank for p in points], float)
    ell = np.array([p.sequence_length for p in points], float)
    return r, ell, np.array([p.loss_reduction for p in points])


def main() -> None:
    default = Path(__file__).parents[1] / "docs/calibration/SmolLM2-135M-Instruct/points.jsonl"
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    points = list(load_points(path).values())
    r, ell, dl = arrays(points)
    print(f"{len(points)} points from {path}")
    for name, (with_rank, with_offset) in FORMS.items():
        x = fit(points, with_rank, with_offset)
        errors = log_errors(predict(x, r, ell, with_rank, with_offset), points)
        log_dl = np.log(dl)
        r2 = 1 - (errors**2).sum() / ((log_dl - log_dl.mean()) ** 2).sum()
        loo = []
        for i in range(len(points)):
            xi = fit(points[:i] + points[i + 1 :], with_rank, with_offset)
            guess = predict(xi, r[i : i + 1], ell[i : i + 1], with_rank, with_offset)
            loo.append(abs(log_errors(guess, points[i : i + 1])[0]))
        alpha = x[1] if with_rank else 0.0
        print(
            f"{name:14s} R² (log ΔL) {r2:.3f}   leave-one-out mean |Δ log ΔL| {np.mean(loo):.3f}"
            f"   α={alpha:.4f} β={x[2]:.4f}"
        )


if __name__ == "__main__":
    main()
