"""Calibrate the Parametric Memory Law: a grid of trainings (rank × ℓ × seed) at a fixed budget.

Each run trains a fresh adapter with MemFT within the law's fixed training budget (MemFT stops
early once every token passes) and records one LawPoint. The budget is either a number of
optimizer steps, the same for every ℓ, or a number of epochs (the paper's protocol: every fact is
seen that many times, so a larger ℓ gets proportionally more steps). With a step budget, a large
ℓ is limited by steps and rank hardly matters; with an epoch budget and an adapter narrow enough
for its capacity to bind, rank decides (README, "Calibration").
Points are appended to `points.jsonl` as each run finishes (flushed and fsynced), so a crash or
Ctrl-C loses at most the run in flight, and rerunning the same command skips finished runs.
"""

import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from memupdate.memory.adapter import AdapterFamily, params_per_rank
from memupdate.memory.encoding import EncodedFact, sequence_length
from memupdate.memory.fact_sets import phonebook_facts
from memupdate.memory.law import LawError, LawPoint, ParametricMemoryLaw, log_errors
from memupdate.memory.locality import measure_locality, retain_set
from memupdate.memory.memft import Progress, TrainSettings, train_adapter


@dataclass(frozen=True)
class Grid:
    ranks: tuple[int, ...]
    lengths: tuple[int, ...]  # ℓ: target tokens per run
    seeds: tuple[int, ...] = (0,)
    steps: int | None = 150  # training budget: optimizer steps per run, or
    epochs: int | None = None  # passes over the run's facts (steps = epochs x batches)
    batch_size: int = 16
    facts: str = "phonebook"  # where the facts come from, as stored in the law

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise LawError("give the training budget either in steps or in epochs")

    def training(self) -> dict:
        """The budget as stored in the law (and read back by `budget_steps`)."""
        budget = {"steps": self.steps} if self.steps is not None else {"epochs": self.epochs}
        return {"mode": "memft", **budget, "batch_size": self.batch_size, "facts": self.facts}

    def runs(self) -> Iterator[tuple[int, int, int]]:
        for seed in self.seeds:
            for ell in self.lengths:
                for rank in self.ranks:
                    yield rank, ell, seed


def budget_steps(training: dict, facts: int) -> int | None:
    """Optimizer steps a law's training budget allows for a run over `facts` facts (None: the
    law does not say)."""
    if training.get("epochs"):
        return training["epochs"] * math.ceil(facts / training["batch_size"])
    return training.get("steps")


def slice_to_length(facts: list[EncodedFact], ell: int) -> list[EncodedFact]:
    """The shortest prefix of `facts` holding at least `ell` target tokens."""
    total = 0
    for i, fact in enumerate(facts):
        total += len(fact.target_ids)
        if total >= ell:
            return facts[: i + 1]
    raise LawError(f"the fact source holds only {total} target tokens, fewer than ℓ={ell}")


def phonebook_source(encode: Callable, seed: int, ell: int) -> list[EncodedFact]:
    """Enough seeded phonebook facts for ℓ target tokens (each holds about 11)."""
    facts = encode(phonebook_facts(ell // 4 + 10, seed=seed))
    return slice_to_length(facts, ell)


def file_source(facts: list[EncodedFact], seed: int, ell: int) -> list[EncodedFact]:
    """A user's facts, shuffled by the seed (each seed a different sample), cut to ℓ."""
    shuffled = list(facts)
    random.Random(seed).shuffle(shuffled)
    return slice_to_length(shuffled, ell)


def run_key(rank: int, ell: int, seed: int) -> str:
    return f"r{rank}-l{ell}-s{seed}"


def load_points(path: Path) -> dict[str, LawPoint]:
    """Finished runs by key. A torn last line (crash mid-write) is ignored."""
    points: dict[str, LawPoint] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            points[data["source"]] = LawPoint(**data)
    return points


def append_point(path: Path, point: LawPoint) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(asdict(point)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def calibrate(
    load_model: Callable,
    family: AdapterFamily,
    grid: Grid,
    out: Path,
    source: Callable[[int, int], list[EncodedFact]],
    on_run: Callable[[str, LawPoint | None], None] = lambda key, point: None,
    on_progress: Callable[[str, Progress], None] = lambda key, progress: None,
) -> list[LawPoint]:
    """Run every grid cell not yet in out/points.jsonl; return all points of the grid."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "points.jsonl"
    done = load_points(path)
    for rank, ell, seed in grid.runs():
        key = run_key(rank, ell, seed)
        if key in done:
            on_run(key, done[key])
            continue
        facts = source(seed, ell)
        model, tokenizer = load_model()
        settings = TrainSettings(
            rank=rank,
            family=family,
            seed=seed,
            max_steps=budget_steps(grid.training(), len(facts)),
            batch_size=grid.batch_size,
        )
        peft_model, result = train_adapter(
            model,
            facts,
            tokenizer.pad_token_id,
            settings,
            lambda p, key=key: on_progress(key, p),
            retain=retain_set(model, tokenizer, family, seed=seed),
        )
        point = LawPoint(
            rank=rank,
            sequence_length=sequence_length(facts),
            loss_before_nats=result.loss_before_nats,
            loss_after_nats=result.recall.mean_loss_nats,
            fact_recall=result.recall.fact_recall,
            token_recall=result.recall.token_recall,
            params=rank * params_per_rank(peft_model, family),
            source=key,
            steps=result.steps,
            facts=len(facts),
            locality=measure_locality(peft_model, tokenizer).token_agreement,
        )
        append_point(path, point)
        done[key] = point
        on_run(key, point)
    return [done[run_key(*cell)] for cell in grid.runs()]


def fit_with_holdout(points: list[LawPoint], **meta) -> ParametricMemoryLaw:
    """Fit on all points, and estimate the law's error on points it has not seen: leave each
    point out in turn, refit, predict it (log ΔL, censored as in the fit, and fact recall).
    The error is also given over the budget-limited runs alone, the ones whose ΔL is exact."""
    law = ParametricMemoryLaw.fit_points(points, **meta)
    log_err, recall_err, limited = [], [], []
    for i, held in enumerate(points):
        try:
            partial = ParametricMemoryLaw.fit_points(points[:i] + points[i + 1 :])
        except LawError:  # without this point the grid no longer spans two ranks or two ℓ
            continue
        predicted = partial.loss_reduction(held.rank, held.sequence_length)
        log_err.append(abs(float(log_errors(np.array([predicted]), [held])[0])))
        _, recall = partial.predict(held.rank, held.sequence_length, held.loss_before_nats)
        recall_err.append(abs(recall - held.fact_recall))
        if not held.stopped:
            limited.append(log_err[-1])
    law.fit.update(
        {
            "holdout": "leave-one-out",
            "holdout_points": len(log_err),
            "holdout_mean_abs_log_dl": float(np.mean(log_err)) if log_err else None,
            "holdout_mean_abs_fact_recall": float(np.mean(recall_err)) if recall_err else None,
            "holdout_budget_limited_points": len(limited),
            "holdout_budget_limited_mean_abs_log_dl": float(np.mean(limited)) if limited else None,
        }
    )
    return law


def plot(law: ParametricMemoryLaw, path: Path) -> None:
    """Two panels: ΔL against rank (one curve per ℓ), and fact recall against predicted loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    lengths = sorted({p.sequence_length for p in law.points})
    ranks = np.geomspace(min(p.rank for p in law.points), max(p.rank for p in law.points), 50)
    for i, ell in enumerate(lengths):
        color = plt.cm.viridis(i / max(1, len(lengths) - 1))
        pts = [p for p in law.points if p.sequence_length == ell]
        for stopped, marker in ((False, "o"), (True, "^")):  # ^: MemFT stopped it, a lower bound
            some = [p for p in pts if p.stopped == stopped]
            left.scatter(
                [p.rank for p in some], [p.loss_reduction for p in some], color=color, marker=marker
            )
        left.plot(ranks, [law.loss_reduction(r, ell) for r in ranks], color=color, label=f"ℓ={ell}")
    left.set(
        xscale="log",
        xlabel="LoRA rank r",
        ylabel="ΔL (nats/token)",
        title=f"ΔL = C·r^α·ℓ^-β + b   (R² log = {law.fit.get('r2_log', float('nan')):.3f})",
    )
    l0 = float(np.mean([p.loss_before_nats for p in law.points]))
    left.axhline(l0, color="grey", linestyle=":", label=f"mean L0 = {l0:.2f} (all learned)")
    left.scatter([], [], marker="^", color="grey", label="every fact recalled (lower bound)")
    left.legend(fontsize=8)
    predicted = [law.predict(p.rank, p.sequence_length, p.loss_before_nats)[0] for p in law.points]
    right.scatter(predicted, [p.fact_recall for p in law.points], label="runs (predicted loss)")
    grid = np.geomspace(max(1e-3, min(predicted) / 2), max(predicted) * 2, 100)
    right.plot(grid, [law.recall_at_loss(x) for x in grid], color="black", label="link")
    right.set(
        xscale="log",
        xlabel="loss after training (nats/token)",
        ylabel="fact recall",
        title="fact recall against predicted loss",
    )
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
