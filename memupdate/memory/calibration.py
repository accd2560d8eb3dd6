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
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from memupdate.memory.adapter import AdapterFamily, params_per_rank
from memupdate.memory.encoding import EncodedFact, sequence_length
from memupdate.memory.fact_sets import KINDS
from memupdate.memory.law import LawError, LawPoint, ParametricMemoryLaw, log_errors
from memupdate.memory.locality import measure_locality, retain_set
from memupdate.memory.memft import Progress, TrainResult, TrainSettings, train_adapter
from memupdate.memory.novelty import novel_share

# The fewest steps an epoch budget allows. A knowledge base of a few facts fills one batch, so
# E epochs would be E steps, far fewer than MemFT needs to reach a fact: small bases get this
# floor (MemFT stops as soon as every token passes, so it costs nothing once they are learned).
# Jobs get the same budget (planning.PlanReport.budgeted), so the law describes them.
MIN_TRAINING_STEPS = 2000


@dataclass(frozen=True)
class Grid:
    ranks: tuple[int, ...]
    lengths: tuple[int, ...]  # ℓ: target tokens per run
    seeds: tuple[int, ...] = (0,)
    steps: int | None = 150  # training budget: optimizer steps per run, or
    epochs: int | None = None  # passes over the run's facts (steps = epochs x batches)
    min_steps: int = MIN_TRAINING_STEPS  # an epoch budget's floor
    batch_size: int = 16
    # Where the facts come from, as stored in the law: fact-set kinds (memory/fact_sets.py),
    # or ("file:NAME",) for a user's file.
    kinds: tuple[str, ...] = ("phonebook",)

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise LawError("give the training budget either in steps or in epochs")

    def training(self) -> dict:
        """The budget as stored in the law (and read back by `budget_steps`)."""
        if self.steps is not None:
            budget = {"steps": self.steps}
        else:
            budget = {"epochs": self.epochs, "min_steps": self.min_steps}
        facts = ",".join(self.kinds)
        return {"mode": "memft", **budget, "batch_size": self.batch_size, "facts": facts}

    def runs(self) -> Iterator[tuple[str, int, int, int]]:
        for seed in self.seeds:
            for ell in self.lengths:
                for kind in self.kinds:
                    for rank in self.ranks:
                        yield kind, rank, ell, seed


def budget_steps(training: dict, facts: int) -> int | None:
    """Optimizer steps a law's training budget allows for a run over `facts` facts (sequences;
    None: the law does not say)."""
    if training.get("epochs"):
        epochs = training["epochs"] * math.ceil(facts / training["batch_size"])
        return max(training.get("min_steps", 0), epochs)
    return training.get("steps")


def slice_to_length(facts: list[EncodedFact], ell: int) -> list[EncodedFact]:
    """The shortest prefix of `facts` holding at least `ell` target tokens."""
    total = 0
    for i, fact in enumerate(facts):
        total += len(fact.target_ids)
        if total >= ell:
            return facts[: i + 1]
    raise LawError(f"the fact source holds only {total} target tokens, fewer than ℓ={ell}")


def fact_set_source(encode: Callable, kind: str, seed: int, ell: int) -> list[EncodedFact]:
    """Enough seeded facts of `kind` for ℓ target tokens, encoded as jobs encode them (every
    form: a fact's chat form counts towards ℓ)."""
    count = 16
    while True:
        facts = encode(KINDS[kind](count, seed=seed))
        if sequence_length(facts) >= ell:
            return slice_to_length(facts, ell)
        count *= 2


def file_source(facts: list[EncodedFact], kind: str, seed: int, ell: int) -> list[EncodedFact]:
    """A user's facts, shuffled by the seed (each seed a different sample), cut to ℓ."""
    shuffled = list(facts)
    random.Random(seed).shuffle(shuffled)
    return slice_to_length(shuffled, ell)


def training_point(
    result: TrainResult,
    rank: int,
    params: int,
    source: str,
    facts: int,
    locality: float | None = None,
    kind: str = "",
    novel_share: float | None = None,
) -> LawPoint:
    """A finished training as a point of the law (`facts`: sequences trained)."""
    return LawPoint(
        rank=rank,
        sequence_length=result.sequence_length,
        loss_before_nats=result.loss_before_nats,
        loss_after_nats=result.recall.mean_loss_nats,
        fact_recall=result.recall.fact_recall,
        token_recall=result.recall.token_recall,
        params=params,
        source=source,
        steps=result.steps,
        facts=facts,
        locality=locality,
        kind=kind,
        novel_share=novel_share,
    )


def run_key(kind: str, rank: int, ell: int, seed: int) -> str:
    return f"{kind}-r{rank}-l{ell}-s{seed}"


def run_case(source: str) -> tuple[str, int, int]:
    """(kind, ℓ, seed) of a seeded run from its point's source (`run_key`, maybe prefixed):
    enough to rebuild the facts it trained on with `fact_set_source`."""
    found = re.search(r"(\w+)-r\d+-l(\d+)-s(\d+)$", source)
    if found is None:
        raise LawError(f"{source!r} is not a seeded run's key (kind-rR-lL-sS)")
    kind, ell, seed = found.groups()
    return kind, int(ell), int(seed)


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
    source: Callable[[str, int, int], list[EncodedFact]],
    on_run: Callable[[str, LawPoint | None], None] = lambda key, point: None,
    on_progress: Callable[[str, Progress], None] = lambda key, progress: None,
) -> list[LawPoint]:
    """Run every grid cell not yet in out/points.jsonl; return all points of the grid."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "points.jsonl"
    done = load_points(path)
    shares: dict[tuple, float] = {}  # the ranks of a cell train one fact set
    for kind, rank, ell, seed in grid.runs():
        key = run_key(kind, rank, ell, seed)
        if key in done:
            on_run(key, done[key])
            continue
        facts = source(kind, seed, ell)
        model, tokenizer = load_model()
        if (kind, ell, seed) not in shares:  # measured on the base model, before the adapter
            shares[kind, ell, seed] = novel_share(model, facts, tokenizer.pad_token_id)
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
        point = training_point(
            result,
            rank,
            rank * params_per_rank(peft_model, family),
            key,
            len(facts),
            measure_locality(peft_model, tokenizer).token_agreement,
            kind,
            shares[kind, ell, seed],
        )
        append_point(path, point)
        done[key] = point
        on_run(key, point)
    return [done[run_key(*cell)] for cell in grid.runs()]


def folder_points(out: Path, grid: Grid) -> list[LawPoint]:
    """Every point in out/points.jsonl: this grid's and those of earlier grids run into the same
    folder (a calibration run in parts). A point that took more steps than this grid's budget
    allows was calibrated with another budget and is refused."""
    points = list(load_points(out / "points.jsonl").values())
    for point in points:
        budget = budget_steps(grid.training(), point.facts)
        if budget is not None and point.steps > budget:
            raise LawError(
                f"{point.source} in {out} took {point.steps} steps, past this budget's {budget}: "
                f"calibrated with another budget? Fit it with its own --epochs/--steps"
            )
    return points


def fill_novel_shares(path: Path, model, pad_id: int, source: Callable) -> int:
    """Measure the novel share of every seeded run in the points file `path` that lacks one
    (recorded before the share was), rebuilding its facts from its source (`run_case`); the
    file is rewritten atomically. Returns how many points were filled."""
    points = list(load_points(path).values())
    shares: dict[tuple, float] = {}
    filled = 0
    for i, point in enumerate(points):
        if point.novel_share is not None:
            continue
        case = kind, ell, seed = run_case(point.source)
        if case not in shares:
            facts = source(kind, seed, ell)
            if sequence_length(facts) != point.sequence_length:
                raise LawError(f"{point.source}: its facts no longer rebuild to the same ℓ")
            shares[case] = novel_share(model, facts, pad_id)
        points[i] = replace(point, novel_share=shares[case])
        filled += 1
    if filled:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(asdict(p)) + "\n" for p in points))
        os.replace(tmp, path)
    return filled


def fit_with_holdout(
    points: list[LawPoint], response: str = "absolute", length: str = "tokens", **meta
) -> ParametricMemoryLaw:
    """Fit on all points, and estimate the law's error on points it has not seen: leave each
    point out in turn, refit, predict it (log reduction, censored as in the fit, and fact
    recall). The error is also given over the budget-limited runs alone, the ones whose ΔL is
    exact, and, when the points span several kinds of facts, per kind with that whole kind
    left out (how the law does on a kind of fact it has never seen)."""
    law = ParametricMemoryLaw.fit_points(points, response, length, **meta)
    log_err, recall_err, limited = [], [], []
    for i, held in enumerate(points):
        try:
            partial = ParametricMemoryLaw.fit_points(points[:i] + points[i + 1 :], response, length)
        except LawError:  # without this point the grid no longer spans two ranks or two ℓ
            continue
        predicted = partial.reduction(held.rank, partial.point_size(held))
        log_err.append(abs(float(log_errors(np.array([predicted]), [held], response)[0])))
        recall_err.append(partial.recall_error([held]))
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
            "holdout_kinds": kind_holdout(points, response, length),
        }
    )
    return law


def kind_holdout(points: list[LawPoint], response: str, length: str) -> dict[str, float]:
    """Kind -> mean |predicted − achieved fact recall| over that kind's points, from a law
    fitted on the other kinds only (empty when the points hold one kind)."""
    kinds = sorted({p.kind for p in points})
    errors = {}
    for kind in kinds if len(kinds) > 1 else []:
        try:
            others = ParametricMemoryLaw.fit_points(
                [p for p in points if p.kind != kind], response, length
            )
        except LawError:
            continue
        errors[kind] = others.recall_error([p for p in points if p.kind == kind])
    return errors


def plot(law: ParametricMemoryLaw, path: Path) -> None:
    """Two panels: the reduction against rank (one curve per ℓ group; points of several kinds
    of facts fall near, not on, a grid ℓ), and fact recall against predicted loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    lengths = sorted({law.point_size(p) for p in law.points})
    if len(lengths) > 6:  # group by the nearest of 5 ℓ spread over the range (log scale)
        lengths = sorted({int(x) for x in np.geomspace(lengths[0], lengths[-1], 5)})

    def group(point):
        return min(lengths, key=lambda ell: abs(math.log(law.point_size(point) / ell)))

    ranks = np.geomspace(min(p.rank for p in law.points), max(p.rank for p in law.points), 50)
    for i, ell in enumerate(lengths):
        color = plt.cm.viridis(i / max(1, len(lengths) - 1))
        pts = [p for p in law.points if group(p) == ell]
        for stopped, marker in ((False, "o"), (True, "^")):  # ^: MemFT stopped it, a bound
            some = [p for p in pts if p.stopped == stopped]
            left.scatter(
                [p.rank for p in some],
                [p.reduction(law.response) for p in some],
                color=color,
                marker=marker,
            )
        name = "ℓ" if law.length == "tokens" else f"{law.length} ℓ"
        left.plot(ranks, [law.reduction(r, ell) for r in ranks], color=color, label=f"{name}≈{ell}")
    response, bound = {
        "absolute": ("ΔL", "lower"),
        "relative": ("ΔL/L0", "lower"),
        "residual": ("L/L0", "upper"),
    }[law.response]
    left.set(
        xscale="log",
        yscale="log" if law.response == "residual" else "linear",  # the share left is small
        xlabel="LoRA rank r",
        ylabel=response if law.response != "absolute" else "ΔL (nats/token)",
        title=f"{response} = C·r^α·ℓ^-β + b   (R² log = {law.fit.get('r2_log', float('nan')):.3f})",
    )
    if law.response != "residual":
        losses = [p.loss_before_nats for p in law.points]
        l0 = 1.0 if law.response == "relative" else float(np.mean(losses))
        left.axhline(l0, color="grey", linestyle=":", label=f"{l0:.2f}: everything learned")
    left.scatter([], [], marker="^", color="grey", label=f"every fact recalled ({bound} bound)")
    left.legend(fontsize=8)
    predicted = [law.predict(p.rank, law.point_size(p), p.loss_before_nats)[0] for p in law.points]
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
