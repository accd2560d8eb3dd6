"""The Parametric Memory Law, fitted per base model and adapter family, and its inversion.

    ΔL(r, ℓ) = C · r^α · ℓ^(−β) + b                (response "absolute": the paper's form)
    ΔL(r, ℓ) / L0 = C · r^α · ℓ^(−β) + b           (response "relative")
    L(r, ℓ) / L0 = C · r^α · ℓ^(−β) + b            (response "residual": the share left)

ΔL is the loss reduction under a fixed training budget: mean cross-entropy (nats per target
token) before training (L0) minus after. r is the LoRA rank (the adapter's parameter count is
proportional to it for a fixed family), ℓ the total number of target tokens to be held, or
(length "novel") those of them the base model cannot predict with other facts of the base in
context: facts that share a template store only what differs (memory/novelty.py). The
relative response predicts the share of the base loss that training removes, so facts the base
model finds surprising (a counterfactual update, L0 ≈ 7 nats) and facts it half knows (phone
numbers, L0 ≈ 2.5) can share one law (bench/law_forms.py measures which response predicts a
kind of fact it was not fitted on). The residual response predicts the share of L0 left after
training instead (α < 0 there: more rank leaves less): recall is decided by that small remainder,
where a share removed near 1 hides it.

A second fitted link maps the loss left after training to fact recall (share of facts whose
every target token has p > 0.5), a log-logistic curve:

    recall(L) = 1 / (1 + (L / L50)^k)

Planning: measure the base model's loss L0 on the facts, predict L = L0 − ΔL(r, ℓ) for each
candidate rank, and pick the smallest rank whose predicted recall reaches the request.
"""

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from memupdate.memory.adapter import RANK_LADDER

_LINK = "recall = 1 / (1 + (L_after / L50)**k)"
FORMS = {
    "absolute": f"dL = C * r**alpha * ell**(-beta) + b; {_LINK}",
    "relative": f"dL / L0 = C * r**alpha * ell**(-beta) + b; {_LINK}",
    "residual": f"L_after / L0 = C * r**alpha * ell**(-beta) + b; {_LINK}",
}
# Recall 1.0 is the asymptote of the link; a request for 1.0 is planned as this value
# (training itself still runs until every token passes).
PLANNING_RECALL_CAP = 0.999
LENGTHS = ("tokens", "novel")  # what ℓ counts (ParametricMemoryLaw.length)
LOSS_FLOOR_NATS = 1e-4
# Predicted loss reductions within this much of each other (in log ΔL) count as equal, unless
# the law knows its own held-out error.
FLAT_TOLERANCE = 0.05
# A finished training the law predicts this closely refines it without a refit
# (ParametricMemoryLaw.refined_with).
EXPLAINED_LOG_ERROR = 0.05
EXPLAINED_RECALL_ERROR = 0.05


class LawError(ValueError):
    """A request the law cannot answer, or points it cannot be fitted to."""


def counted_length(length: str, sequence_length: int, novel_share: float | None) -> int:
    """ℓ as a law with this `length` counts it: every target token, or the novel ones."""
    if length == "tokens":
        return sequence_length
    if novel_share is None:
        raise LawError("this law counts novel tokens: the base's novel share was not measured")
    return max(1, round(sequence_length * novel_share))


class UnreachableTarget(LawError):
    """No candidate rank is predicted to reach the requested recall."""


@dataclass
class LawPoint:
    rank: int
    sequence_length: int  # ℓ, target tokens
    loss_before_nats: float
    loss_after_nats: float
    fact_recall: float
    token_recall: float | None = None
    params: int = 0  # trainable adapter parameters
    source: str = ""  # calibration run or job that produced the point
    steps: int = 0  # optimizer steps the training took (0: not recorded)
    facts: int = 0  # facts the ℓ target tokens came in
    locality: float | None = None  # token agreement with the base (memory/locality.py)
    kind: str = ""  # the fact set the run trained on (calibration), e.g. "counterfactual"
    # Share of ℓ the base model gets wrong with other facts of the base in context
    # (memory/novelty.py); None: not measured (points recorded before 2026-12-06).
    novel_share: float | None = None

    @property
    def stopped(self) -> bool:
        """Every fact recalled: MemFT stopped the run there, so its ΔL is a lower bound."""
        return self.fact_recall >= 1.0

    @property
    def loss_reduction(self) -> float:
        return self.loss_before_nats - self.loss_after_nats

    def reduction(self, response: str) -> float:
        """What the law's power term predicts for this point: ΔL, ΔL / L0, or L / L0."""
        if response == "relative":
            return self.loss_reduction / self.loss_before_nats
        if response == "residual":
            return max(self.loss_after_nats, LOSS_FLOOR_NATS) / self.loss_before_nats
        return self.loss_reduction


@dataclass
class Plan:
    rank: int
    sequence_length: int
    predicted_fact_recall: float
    predicted_loss_after_nats: float
    loss_before_nats: float
    candidates: dict[int, float]  # rank -> predicted fact recall


@dataclass
class ParametricMemoryLaw:
    C: float
    alpha: float
    beta: float
    b: float
    L50: float
    k: float
    base_model: dict = field(default_factory=dict)
    family: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)  # the budget the law holds for
    points: list[LawPoint] = field(default_factory=list)
    fit: dict = field(default_factory=dict)  # r2_log, n_points, ...
    history: list[dict] = field(default_factory=list)
    response: str = "absolute"  # what the power term predicts: ΔL, or ΔL / L0 ("relative")
    # What ℓ counts: every target token ("tokens"), or those the base model cannot predict with
    # other facts of the base in context ("novel": ℓ × novel share, memory/novelty.py).
    length: str = "tokens"

    # --- what the law calls ℓ ---------------------------------------------------------
    def size(self, sequence_length: int, novel_share: float | None) -> int:
        """ℓ as this law counts it, for a base of `sequence_length` target tokens."""
        return counted_length(self.length, sequence_length, novel_share)

    def point_size(self, point: LawPoint) -> int:
        return point_length(self.length, point)

    def can_size(self, point: LawPoint) -> bool:
        return self.length == "tokens" or point.novel_share is not None

    # --- prediction -------------------------------------------------------------------
    def reduction(self, rank: float, sequence_length: float) -> float:
        """The power term: ΔL in nats (absolute), the share of L0 removed (relative), or the
        share of L0 left (residual)."""
        with np.errstate(over="ignore"):  # a wild fit (bench/law_forms.py) gives inf, not an error
            power = np.power(float(rank), self.alpha) * np.power(float(sequence_length), -self.beta)
        return float(self.C * power + self.b)

    def loss_reduction(self, rank: float, sequence_length: float, loss_before: float) -> float:
        """Predicted ΔL in nats for facts whose base loss is `loss_before`."""
        if self.response == "residual":
            return loss_before * (1.0 - self.reduction(rank, sequence_length))
        scale = loss_before if self.response == "relative" else 1.0
        return scale * self.reduction(rank, sequence_length)

    def recall_at_loss(self, loss_after: float) -> float:
        loss_after = max(loss_after, LOSS_FLOOR_NATS)
        return 1.0 / (1.0 + (loss_after / self.L50) ** self.k)

    def predict(self, rank: int, sequence_length: int, loss_before: float) -> tuple[float, float]:
        """(predicted loss after training, predicted fact recall)."""
        reduced = self.loss_reduction(rank, sequence_length, loss_before)
        after = max(loss_before - reduced, LOSS_FLOOR_NATS)
        return after, self.recall_at_loss(after)

    def recall_error(self, points: list[LawPoint]) -> float:
        """Mean |predicted − achieved fact recall| over `points`, each at its own L0."""
        errors = [
            abs(self.predict(p.rank, self.point_size(p), p.loss_before_nats)[1] - p.fact_recall)
            for p in points
        ]
        return float(np.mean(errors))

    def choose_rank(
        self,
        sequence_length: int,
        target_recall: float,
        loss_before: float,
        candidates=RANK_LADDER,
        max_rank: int | None = None,
    ) -> Plan:
        """The smallest candidate rank predicted to reach `target_recall` (fact recall)."""
        if not 0 < target_recall <= 1:
            raise LawError(f"target recall must be in (0, 1], got {target_recall}")
        if sequence_length <= 0:
            raise LawError(f"sequence length ℓ must be positive, got {sequence_length}")
        ranks = sorted(r for r in candidates if max_rank is None or r <= max_rank)
        if not ranks:
            raise LawError(f"no candidate rank at or below the serving limit {max_rank}")
        goal = min(target_recall, PLANNING_RECALL_CAP)
        predicted = {r: self.predict(r, sequence_length, loss_before) for r in ranks}
        for r in ranks:
            after, recall = predicted[r]
            if recall >= goal:
                return Plan(
                    r,
                    sequence_length,
                    recall,
                    after,
                    loss_before,
                    {k: v[1] for k, v in predicted.items()},
                )
        top = ranks[-1]
        raise UnreachableTarget(
            f"no rank up to {top} is predicted to reach fact recall {target_recall} at "
            f"ℓ={sequence_length} (rank {top} predicts {predicted[top][1]:.3f}); split the "
            f"knowledge base, lower the target, or raise the serving limit"
        )

    def plan(
        self,
        sequence_length: int,
        target_recall: float,
        loss_before: float,
        max_rank: int | None = None,
    ) -> tuple[Plan, bool]:
        """The planner's rule: (the smallest rank predicted to reach the target, True), else
        (the best effort, False). The law's budget is shorter than a job's (MemFT trains until
        every token passes), so a pessimistic prediction is no reason to refuse a job."""
        try:
            return self.choose_rank(
                sequence_length, target_recall, loss_before, max_rank=max_rank
            ), True
        except UnreachableTarget:
            return self.best_effort_rank(sequence_length, loss_before, max_rank=max_rank), False

    def flat_tolerance(self) -> float:
        """Differences in log ΔL below the law's own held-out error are not evidence."""
        return self.fit.get("holdout_mean_abs_log_dl") or FLAT_TOLERANCE

    def extrapolates(self, sequence_length: int) -> bool:
        """ℓ beyond the longest the law has a point at (a law without points never says so)."""
        return sequence_length > self.longest()

    def longest(self) -> float:
        return max((self.point_size(p) for p in self.points), default=math.inf)

    def best_effort_rank(
        self,
        sequence_length: int,
        loss_before: float,
        candidates=RANK_LADDER,
        max_rank: int | None = None,
    ) -> Plan:
        """When no rank is predicted to reach the target: the smallest rank whose predicted
        loss reduction is within the law's error (`flat_tolerance`, in log ΔL) of the best
        rank's. Where the law is flat in rank (the training budget limits, not the adapter),
        that is a small rank: the law has no evidence that more parameters help (measured on
        the 12 example facts, rank 1 needed 1.3x the steps of rank 16 with 1/16 of the
        parameters; bench/rank_speed.py). Where rank matters, the largest. Beyond the longest
        ℓ the law was fitted on, also the largest: a flat extrapolation is no evidence that
        rank does not matter (1,000 phone numbers, ℓ 22,000, got rank 2 before this rule: about
        1.6 bits per parameter, six times the most any training here has stored)."""
        ranks = sorted(r for r in candidates if max_rank is None or r <= max_rank)
        predicted = {r: self.predict(r, sequence_length, loss_before) for r in ranks}
        reduction = {
            r: max(self.loss_reduction(r, sequence_length, loss_before), 1e-9) for r in ranks
        }
        best = max(reduction.values())
        if self.extrapolates(sequence_length):
            rank = ranks[-1]
        else:
            rank = next(r for r in ranks if math.log(best / reduction[r]) <= self.flat_tolerance())
        after, recall = predicted[rank]
        candidates_recall = {k: v[1] for k, v in predicted.items()}
        return Plan(rank, sequence_length, recall, after, loss_before, candidates_recall)

    # --- fitting ----------------------------------------------------------------------
    @classmethod
    def fit_points(
        cls, points: list[LawPoint], response: str = "absolute", length: str = "tokens", **meta
    ) -> "ParametricMemoryLaw":
        if response not in FORMS:
            raise LawError(f"response must be one of {list(FORMS)}, got {response!r}")
        if length not in LENGTHS:
            raise LawError(f"length must be one of {LENGTHS}, got {length!r}")
        power, r2 = _fit_power(points, response, [point_length(length, p) for p in points])
        link = fit_link(points)
        law = cls(**power, **link, points=list(points), response=response, length=length, **meta)
        law.fit = {"r2_log": r2, "n_points": len(points)}
        return law

    def explains(self, point: LawPoint) -> bool:
        """Whether the law already predicts this training: its censored log error within
        EXPLAINED_LOG_ERROR and its fact recall within EXPLAINED_RECALL_ERROR."""
        size = self.point_size(point)
        predicted = np.array([self.reduction(point.rank, size)])
        error = float(log_errors(predicted, [point], self.response)[0])
        recall = self.predict(point.rank, size, point.loss_before_nats)[1]
        return (
            abs(error) <= EXPLAINED_LOG_ERROR
            and abs(recall - point.fact_recall) <= EXPLAINED_RECALL_ERROR
        )

    def refined_with(self, *points: LawPoint) -> "ParametricMemoryLaw":
        """Online refinement: the law with finished trainings' points added, refitted only when
        one of them is a training the law does not already predict. Most points are censored
        (MemFT stopped at full recall), so many constants fit them equally well and a refit on
        a point that adds nothing can still move them far: one job of 20 phone-number forms
        (ℓ 220, rank 1, every fact recalled, as the gated law predicted) took its α from 0.009
        to 10.2, and its rank 2 at ℓ 3,000 from a predicted 0.10 to 1.00."""
        if any(not self.explains(p) for p in points):
            return self.refit_with(*points)
        history = [{"added_point": asdict(p), "refit": False} for p in points]
        return replace(self, points=[*self.points, *points], history=[*self.history, *history])

    def refit_with(self, *points: LawPoint) -> "ParametricMemoryLaw":
        """Add finished trainings' points and refit once; the old constants go to history, with
        each added point."""
        old = {k: getattr(self, k) for k in ("C", "alpha", "beta", "b", "L50", "k")}
        law = ParametricMemoryLaw.fit_points(
            [*self.points, *points],
            self.response,
            self.length,
            base_model=self.base_model,
            family=self.family,
            training=self.training,
        )
        law.history = [
            *self.history,
            *({"constants": old, "fit": self.fit, "added_point": asdict(p)} for p in points),
        ]
        return law

    # --- storage ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["form"] = FORMS[self.response]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ParametricMemoryLaw":
        data = {k: v for k, v in data.items() if k != "form"}
        data["points"] = [LawPoint(**p) for p in data.get("points", [])]
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write atomically: a temporary file in the same folder, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "ParametricMemoryLaw":
        return cls.from_dict(json.loads(Path(path).read_text()))


def point_length(length: str, point: LawPoint) -> int:
    try:
        return counted_length(length, point.sequence_length, point.novel_share)
    except LawError as err:
        raise LawError(f"{point.source}: {err}") from None


def log_errors(predicted, points: list[LawPoint], response: str = "absolute") -> np.ndarray:
    """log predicted − log observed reduction (ΔL, ΔL / L0, or L / L0), censored: a run that
    recalled every fact was stopped by MemFT there, so its reduction is a lower bound (its
    residual an upper bound) and a prediction beyond it is no error."""
    observed = np.array([p.reduction(response) for p in points], dtype=float)
    stopped = np.array([p.stopped for p in points], dtype=bool)
    error = np.log(np.maximum(predicted, 1e-9)) - np.log(observed)
    beyond = error < 0 if response == "residual" else error > 0
    return np.where(stopped & beyond, 0.0, error)


def _fit_power(points: list[LawPoint], response: str, sizes: list[int]) -> tuple[dict, float]:
    """Least squares in log space, censored (`log_errors`). For a grid of offsets b below the
    smallest ΔL, log(ΔL − b) is linear in (log r, log ℓ); start from the b whose fit predicts
    best, then polish all four constants on the censored errors."""
    if len(points) < 4:
        raise LawError(f"need at least 4 points to fit the law, got {len(points)}")
    dl = np.array([p.reduction(response) for p in points])
    if (dl <= 0).any():
        raise LawError("every calibration point needs a positive loss reduction")
    r = np.array([p.rank for p in points], dtype=float)
    ell = np.array(sizes, dtype=float)
    if len(set(r)) < 2 or len(set(ell)) < 2:
        raise LawError("the fit needs at least two different ranks and two different ℓ")
    design = np.column_stack([np.ones_like(r), np.log(r), -np.log(ell)])
    best = None
    for b in np.concatenate(
        [
            -np.geomspace(dl.max() * 10, 1e-6, 200),
            [0.0],
            np.linspace(0, dl.min(), 200, endpoint=False)[1:],
        ]
    ):
        coef, *_ = np.linalg.lstsq(design, np.log(dl - b), rcond=None)
        pred = np.exp(design @ coef) + b
        if (pred <= 0).any():
            continue
        sse = float((log_errors(pred, points, response) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, b, coef)
    _, b, coef = best
    # The grid fits log(ΔL − b), not log ΔL; polish all four constants by least squares on
    # the log ΔL residuals themselves, starting from the best grid point.
    from scipy.optimize import least_squares

    def residuals(x):
        return log_errors(np.exp(x[0]) * r ** x[1] * ell ** (-x[2]) + x[3], points, response)

    polished = least_squares(residuals, [coef[0], coef[1], coef[2], b])
    if (residuals(polished.x) ** 2).sum() < (residuals([*coef, b]) ** 2).sum():
        coef, b = polished.x[:3], polished.x[3]
    sse = float((residuals([*coef, b]) ** 2).sum())
    sst = float(((np.log(dl) - np.log(dl).mean()) ** 2).sum())
    r2 = 1.0 - sse / sst if sst > 0 else 1.0
    return {
        "C": float(np.exp(coef[0])),
        "alpha": float(coef[1]),
        "beta": float(coef[2]),
        "b": float(b),
    }, r2


def fit_link(points: list[LawPoint]) -> dict:
    """Log-logistic recall(L) by grid search on squared error in recall space."""
    loss = np.maximum(np.array([p.loss_after_nats for p in points]), LOSS_FLOOR_NATS)
    recall = np.array([p.fact_recall for p in points])
    best = None
    for l50 in np.geomspace(1e-3, 10, 161):
        for k in np.geomspace(0.3, 30, 81):
            err = float(((1 / (1 + (loss / l50) ** k) - recall) ** 2).sum())
            if best is None or err < best[0]:
                best = (err, l50, k)
    return {"L50": float(best[1]), "k": float(best[2])}
