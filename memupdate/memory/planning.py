"""Plan an update: observe ℓ, measure the base model's loss on the facts, and let the law pick
the smallest rank predicted to reach the requested fact recall.

Laws are looked up by base-model identity and adapter family: first in $MEMUPDATE_HOME/laws
(refined by finished jobs), then among the laws shipped in the package. A model with no law gets
a clear message and the conservative fallback: the largest rank on the ladder within the serving
limit (MemFT still stops as soon as every token passes, so a too-large rank costs parameters,
not correctness). When the law says no rank reaches the target, the smallest rank predicted to
do about as well as the best one is taken, or the largest where ℓ is beyond the law's points
(see ParametricMemoryLaw.best_effort_rank).
"""

import fcntl
import hashlib
import json
import logging
import random
import re
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

from memupdate.home import home
from memupdate.memory.adapter import RANK_LADDER, AdapterFamily, params_per_rank
from memupdate.memory.base_model import ModelIdentity
from memupdate.memory.calibration import MIN_TRAINING_STEPS, budget_steps
from memupdate.memory.encoding import EncodedFact, sequence_length
from memupdate.memory.law import LawError, LawPoint, ParametricMemoryLaw
from memupdate.memory.novelty import novel_share
from memupdate.memory.recall import measure_recall

DEFAULT_MAX_RANK = 64
# The law needs the base model's mean loss on the targets, not every fact's: above this many
# sequences it is measured on a seeded sample of them (a full pass over 1,000 facts with their chat
# forms took 3.5 minutes of every update's plan on a 2-core CPU; bench/plan_sample.py measures the
# sample's error).
LOSS_SAMPLE_SEQUENCES = 256
log = logging.getLogger("memupdate.memory.planning")


@dataclass
class PlanReport:
    sequence_length: int  # ℓ, target tokens over all facts
    facts: int
    rank: int
    adapter_params: int
    target_recall: float  # fact recall requested
    predicted_fact_recall: float | None  # None when no law was available
    loss_before_nats: float
    law: str  # where the law came from, or why none was used
    candidates: dict[int, float] | None = None
    budget_steps: int | None = None  # the law's training budget for this base, in steps
    training_steps: int = 0  # the step budget the training gets (see `budgeted`)
    loss_measured_on: int = 0  # sequences the base loss was measured on (a sample of large bases)
    novel_share: float | None = None  # share of ℓ the model cannot predict in context
    law_length: int | None = None  # ℓ as the law counts it (novel tokens, or all of them)

    def budgeted(self, floor: int = MIN_TRAINING_STEPS, requested: int = 0) -> "PlanReport":
        """This plan with its training's step budget: `requested`, else the law's budget for
        the base (the one it was calibrated with, so it describes the training), at least
        `floor`."""
        return replace(self, training_steps=requested or max(floor, self.budget_steps or 0))

    def to_dict(self) -> dict:
        return asdict(self)


def law_file_name(identity: ModelIdentity, family: AdapterFamily) -> str:
    """Readable (model, layers, modules) plus a digest of the whole family (modules, alpha and
    learning rate included): a law says nothing about any other family."""
    layers = "all" if family.layers is None else "-".join(map(str, family.layers))
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", identity.name)
    modules = family.target_modules[0] if len(family.target_modules) == 1 else "multi"
    digest = hashlib.sha256(json.dumps(family.to_dict(), sort_keys=True).encode()).hexdigest()
    return f"{safe}-{identity.digest}-L{layers}-{modules}-{digest[:8]}.json"


def user_law_path(identity: ModelIdentity, family: AdapterFamily) -> Path:
    return home() / "laws" / law_file_name(identity, family)


def shipped_law_path(identity: ModelIdentity, family: AdapterFamily) -> Path:
    return (
        Path(str(resources.files("memupdate"))) / "data" / "laws" / law_file_name(identity, family)
    )


def find_law(identity: ModelIdentity, family: AdapterFamily) -> tuple[ParametricMemoryLaw, str]:
    """The law for this model and family; raises LawError naming what is missing. This
    machine's law (installed by `calibrate --install`) comes first; a refined copy of a shipped
    law is the installed shipped law refined with the copy's job points (after an upgrade, the
    next refinement saves it)."""
    user, shipped = user_law_path(identity, family), shipped_law_path(identity, family)
    laws = {}
    for path, shown in ((user, str(user)), (shipped, f"shipped:{shipped.name}")):
        if path.is_file():
            law = ParametricMemoryLaw.load(path)
            if law.family and law.family != family.to_dict():  # a file copied under a wrong name
                raise LawError(f"{path} was fitted for another adapter family: {law.family}")
            laws[shown] = law
    if not laws:
        raise LawError(
            f"no calibrated law for {identity.name} ({identity.digest}) with this adapter "
            f"family; run `memupdate calibrate` to fit one"
        )
    refined, installed = laws.get(str(user)), laws.get(f"shipped:{shipped.name}")
    if refined is None:
        return installed, f"shipped:{shipped.name}"
    if installed is None or not _is_copy(refined):
        return refined, str(user)
    # Each refinement recorded the point it added. The copy is rebuilt from the installed law
    # and those points by today's rule (law.refined_with): the same law when nothing changed,
    # the upgraded law after an upgrade, and no drift kept from copies refitted on points the
    # law already predicted (before 2026-12-06). Rebuilt, they are recorded so again.
    added = [LawPoint(**step["added_point"]) for step in refined.history if "added_point" in step]
    added = [p for p in added if installed.can_size(p)]  # recorded before the law counted novel ℓ
    if not added:
        return installed, f"shipped:{shipped.name}"
    law = installed.refined_with(*added)
    law.history.append({"copied_from": f"shipped:{shipped.name}"})
    if refined.points[: len(installed.points)] == installed.points:
        return law, str(user)
    return law, f"shipped:{shipped.name} with {len(added)} job point(s) from {user}"


def _is_copy(law: ParametricMemoryLaw) -> bool:
    """Whether `law` is this machine's refined copy of a shipped law (record_training marks it)."""
    return any("copied_from" in step for step in law.history)


def record_training(
    identity: ModelIdentity, family: AdapterFamily, point: LawPoint, warm_start: bool = False
) -> Path | None:
    """Online refinement: add a finished training's point to this model's law, refitted when
    the law did not already predict it (ParametricMemoryLaw.refined_with).

    Read-modify-write under an exclusive file lock, written atomically, so concurrent writers
    neither lose points nor leave a torn file. The first refinement of a shipped law copies it
    to $MEMUPDATE_HOME/laws. Returns the law file, or None when the model has no law yet or the
    point does not belong to it.

    Only a training that finished within the law's budget is a point of the law: MemFT stops
    when every token passes, so such a run ended where a calibration run would have (its
    learning rate decayed over a longer budget, so it is a little optimistic). A job that
    trained past the budget says nothing about what the budget achieves, and a `warm_start`
    (trained on from the live version's adapter) began with most of its facts learned, and its
    loss before is the warm adapter's: the law predicts fresh trainings."""
    if warm_start:
        log.info("not refining the law with %s: a warm start", point.source)
        return None
    path = user_law_path(identity, family)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            law, where = find_law(identity, family)
        except LawError:
            return None
        if not law.can_size(point):
            log.info("not refining the law with %s: its novel share was not measured", point.source)
            return None
        if where.startswith("shipped:") and not _is_copy(law):
            law.history = [*law.history, {"copied_from": where}]  # an upgrade replaces it
        budget = budget_steps(law.training, point.facts)
        if budget is not None and point.steps > budget:
            log.info(
                "not refining the law with %s: %d steps, past the law's budget of %d",
                point.source,
                point.steps,
                budget,
            )
            return None
        law.refined_with(point).save(path)
    return path


def base_loss_sample(facts: list[EncodedFact], size: int = LOSS_SAMPLE_SEQUENCES):
    """The sequences the plan measures the base loss on: all of them, or a seeded sample (the
    same facts give the same plan)."""
    return facts if len(facts) <= size else random.Random(0).sample(facts, size)


def share_can_matter(law, ell: int, target: float, loss_before: float, max_rank: int) -> bool:
    """Whether measuring the novel share could change the plan. The share only shortens ℓ, so
    when the ladder's smallest rank reaches the target at every token, and the law predicts no
    less at fewer tokens, it is the choice either way. The in-context pass costs about five
    base-loss passes (9 s of the demo's 12 facts on 2 cores); the job's point then carries no
    share and does not refine the law."""
    plan, reached = law.plan(ell, target, loss_before, max_rank=max_rank)
    smallest = RANK_LADDER[0]
    fewer_no_worse = (
        law.predict(smallest, 1, loss_before)[1] >= law.predict(smallest, ell, loss_before)[1]
    )
    return not (reached and plan.rank == smallest and fewer_no_worse)


def plan_update(
    model,
    facts: list[EncodedFact],
    pad_id: int,
    identity: ModelIdentity,
    family: AdapterFamily,
    target_recall: float,
    max_rank: int = DEFAULT_MAX_RANK,
    law: ParametricMemoryLaw | None = None,
) -> PlanReport:
    ell = sequence_length(facts)
    measured = base_loss_sample(facts)
    loss_before = measure_recall(model, measured, pad_id).mean_loss_nats
    per_rank = params_per_rank(model, family)
    share = size = None

    def planned(rank: int, predicted: float | None, law_note: str, candidates=None):
        return PlanReport(
            ell,
            len(facts),
            rank,
            rank * per_rank,
            target_recall,
            predicted,
            loss_before,
            law_note,
            candidates,
            budget_steps(law.training, len(facts)) if law else None,
            loss_measured_on=len(measured),
            novel_share=share,
            law_length=size,
        )

    largest = max(r for r in RANK_LADDER if r <= max_rank)
    source = "given"
    if law is None:
        try:
            law, source = find_law(identity, family)
        except LawError as err:
            return planned(largest, None, f"fallback to the largest rank: {err}")
    if law.length == "novel" and share_can_matter(law, ell, target_recall, loss_before, max_rank):
        share = novel_share(model, facts, pad_id)
    size = ell if share is None else law.size(ell, share)
    plan, reached = law.plan(size, target_recall, loss_before, max_rank=max_rank)
    if not reached:  # the best effort (law.plan), and why
        counted = f"ℓ={ell}" if law.length == "tokens" else f"ℓ={ell} ({size} {law.length})"
        why = (
            f"the largest: ℓ is beyond the longest the law was fitted on ({law.longest()})"
            if law.extrapolates(size)
            else f"the smallest whose predicted loss reduction is within the law's error "
            f"({law.flat_tolerance():.3f} in log) of the best"
        )
        note = (
            f"{source}; within the law's budget no rank up to {max_rank} is predicted to reach "
            f"fact recall {target_recall} at {counted} (best {max(plan.candidates.values()):.3f}); "
            f"jobs train past that budget, so rank {plan.rank}: {why}"
        )
        return planned(plan.rank, plan.predicted_fact_recall, note, plan.candidates)
    return planned(plan.rank, plan.predicted_fact_recall, source, plan.candidates)
