"""Does rank carry information in the calibration points? Fits four forms of the law to a
points.jsonl and prints R² (log ΔL) on all points and leave-one-out mean |Δ log ΔL|:

    cd bench && ../.venv/bin/python law_forms.py [POINTS]   (default: the shipped law's points)

full:          ΔL = C·r^α·ℓ^−β + b      (the Parametric Memory Law)
rank-free:     ΔL = C·ℓ^−β + b          (α fixed at 0)
power:         ΔL = C·r^α·ℓ^−β          (b fixed at 0)
rank-free pow: ΔL = C·ℓ^−β
If dropping r costs nothing, the law's rank choice carries no information at that budget.
"""

import json
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

FORMS = {"full": (True, True), "rank-free": (False, True), "power": (True, False)}
FORMS["rank-free pow"] = (False, False)


def predict(x, r, ell, with_rank, with_offset):
    log_c, alpha, beta, offset = x
    return np.exp(log_c) * r ** (alpha if with_rank else 0) * ell**-beta + (
        offset if with_offset else 0
    )


def fit(r, ell, dl, with_rank, with_offset):
    """Least squares on log ΔL from a few starting points; the best of them."""

    def residuals(x):
        pred = predict(x, r, ell, with_rank, with_offset)
        return np.log(np.maximum(pred, 1e-9)) - np.log(dl)

    best = None
    for offset in [-100, -10, -1, 0, 0.3] if with_offset else [0.0]:
        for beta in (0.01, 0.3, 1.0):
            start = [np.log(max(dl.mean() - offset, 1e-3)) + beta * np.log(ell.mean()), 0.05]
            result = least_squares(residuals, [*start, beta, offset])
            if best is None or result.cost < best.cost:
                best = result
    return best.x


def main() -> None:
    default = Path(__file__).parents[1] / "docs/calibration/SmolLM2-135M-Instruct/points.jsonl"
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    r = np.array([p["rank"] for p in points], float)
    ell = np.array([p["sequence_length"] for p in points], float)
    dl = np.array([p["loss_before_nats"] - p["loss_after_nats"] for p in points])
    print(f"{len(points)} points from {path}")
    for name, (with_rank, with_offset) in FORMS.items():
        x = fit(r, ell, dl, with_rank, with_offset)
        pred = np.maximum(predict(x, r, ell, with_rank, with_offset), 1e-9)
        log_dl = np.log(dl)
        r2 = 1 - ((log_dl - np.log(pred)) ** 2).sum() / ((log_dl - log_dl.mean()) ** 2).sum()
        loo = []
        for i in range(len(points)):
            keep = np.arange(len(points)) != i
            xi = fit(r[keep], ell[keep], dl[keep], with_rank, with_offset)
            guess = max(predict(xi, r[i], ell[i], with_rank, with_offset), 1e-9)
            loo.append(abs(np.log(guess) - log_dl[i]))
        alpha = x[1] if with_rank else 0.0
        print(
            f"{name:14s} R² (log ΔL) {r2:.3f}   leave-one-out mean |Δ log ΔL| {np.mean(loo):.3f}"
            f"   α={alpha:.4f} β={x[2]:.4f}"
        )


if __name__ == "__main__":
    main()
