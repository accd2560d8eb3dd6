import math

import numpy as np
import pytest

from memupdate.memory.law import (
    FLAT_TOLERANCE,
    LawError,
    LawPoint,
    ParametricMemoryLaw,
    UnreachableTarget,
    log_errors,
)

TRUE = {"C": 10.0, "alpha": 0.45, "beta": 0.6, "b": 0.05}


def synthetic_points(noise: float, seed: int = 0) -> list[LawPoint]:
    rng = np.random.default_rng(seed)
    points = []
    for r in (1, 2, 4, 8, 16, 32):
        for ell in (250, 500, 1000, 2000, 4000):
            dl = TRUE["C"] * r ** TRUE["alpha"] * ell ** -TRUE["beta"] + TRUE["b"]
            dl *= math.exp(rng.normal(0, noise))
            after = max(3.0 - dl, 1e-3)
            recall = 1 / (1 + (after / 0.4) ** 3)
            points.append(LawPoint(r, ell, 3.0, after, recall, source=f"r{r}-l{ell}"))
    return points


def relative_points(kinds: dict[str, float]) -> list[LawPoint]:
    """Points of several kinds (name -> base loss L0) from one relative law: training removes
    the same share of the base loss whatever L0 is."""
    points = []
    for kind, l0 in kinds.items():
        for r in (1, 4, 16):
            for ell in (250, 1000, 4000):
                share = min(1.5 * r**0.2 * ell**-0.25 + 0.3, 0.995)
                after = l0 * (1 - share)
                recall = 1 / (1 + (after / 0.4) ** 3)
                points.append(LawPoint(r, ell, l0, after, recall, source=f"{kind}-{r}-{ell}"))
                points[-1].kind = kind
    return points


def test_a_relative_law_predicts_a_kind_of_fact_it_was_not_fitted_on():
    """Fitted on facts with base losses 2 and 3, the relative response predicts facts with a
    base loss of 7 (a counterfactual update); the absolute one, which takes ΔL in nats as fixed,
    predicts far too much left over."""
    seen = relative_points({"phonebook": 2.0, "biography": 3.0})
    unseen = relative_points({"counterfactual": 7.0})
    relative = ParametricMemoryLaw.fit_points(seen, "relative")
    absolute = ParametricMemoryLaw.fit_points(seen, "absolute")

    assert relative.response == "relative" and relative.fit["r2_log"] > 0.99
    assert relative.recall_error(unseen) < 0.05 < absolute.recall_error(unseen)
    reloaded = ParametricMemoryLaw.from_dict(relative.to_dict())
    assert reloaded.response == "relative" and reloaded.predict(4, 1000, 7.0) == relative.predict(
        4, 1000, 7.0
    )
    assert "dL / L0" in relative.to_dict()["form"]
    # A law stored before responses existed is absolute.
    old = {k: v for k, v in absolute.to_dict().items() if k != "response"}
    assert ParametricMemoryLaw.from_dict(old).response == "absolute"
    with pytest.raises(LawError, match="response must be one of"):
        ParametricMemoryLaw.fit_points(seen, "squared")


def test_a_residual_law_predicts_the_share_left_and_stopped_runs_bound_it_from_above():
    """The residual response fits the share of L0 left (less with more rank, α < 0), and a run
    MemFT stopped counts only where the law predicts more left than it reached."""
    points = []
    for r in (1, 4, 16):
        for ell in (250, 1000, 4000):
            left = 0.02 * r**-0.5 * ell**0.4
            after = 3.0 * left
            recall = 1 / (1 + (after / 0.4) ** 3)
            points.append(LawPoint(r, ell, 3.0, after, recall, source=f"r{r}-l{ell}"))
    law = ParametricMemoryLaw.fit_points(points, "residual")
    assert law.alpha == pytest.approx(-0.5, abs=0.05) and law.fit["r2_log"] > 0.99
    assert law.predict(4, 1000, 3.0)[0] == pytest.approx(3.0 * 0.02 * 4**-0.5 * 1000**0.4, rel=0.05)
    assert law.loss_reduction(4, 1000, 3.0) == pytest.approx(3.0 - law.predict(4, 1000, 3.0)[0])
    stopped = LawPoint(16, 250, 3.0, 0.3, 1.0)  # stopped at 0.1 of L0 left: an upper bound
    assert log_errors(np.array([0.05]), [stopped], "residual")[0] == 0.0  # less left: no error
    assert log_errors(np.array([0.2]), [stopped], "residual")[0] == pytest.approx(np.log(2))


def test_fit_recovers_known_constants_from_noisy_points():
    law = ParametricMemoryLaw.fit_points(synthetic_points(noise=0.03))
    assert law.alpha == pytest.approx(TRUE["alpha"], abs=0.05)
    assert law.beta == pytest.approx(TRUE["beta"], abs=0.07)
    assert law.fit["r2_log"] > 0.98
    assert law.L50 == pytest.approx(0.4, rel=0.1) and law.k == pytest.approx(3.0, rel=0.2)


def test_runs_stopped_by_full_recall_are_lower_bounds_in_the_fit():
    """MemFT stops once every fact is recalled, so the loss reduction of such a run is capped at
    L0 − L_stop. Treating those as exact flattens the law in rank; the censored fit does not."""
    stop_after = 2.45  # loss at which the synthetic runs count as fully recalled
    points = []
    for p in synthetic_points(noise=0.02):
        if p.loss_after_nats < stop_after:  # would have gone further; MemFT stopped here
            p = LawPoint(p.rank, p.sequence_length, 3.0, stop_after, 1.0, source=p.source)
        else:
            p.fact_recall = min(p.fact_recall, 0.99)
        points.append(p)
    stopped = sum(p.fact_recall == 1.0 for p in points)
    assert 5 <= stopped <= 20, "the case needs both stopped and budget-limited runs"
    law = ParametricMemoryLaw.fit_points(points)
    assert law.alpha == pytest.approx(TRUE["alpha"], abs=0.08)
    assert law.beta == pytest.approx(TRUE["beta"], abs=0.1)
    # Every stopped run is predicted to reduce the loss at least as far as it got.
    predicted = [law.reduction(p.rank, p.sequence_length) for p in points if p.fact_recall == 1]
    observed = [p.loss_reduction for p in points if p.fact_recall == 1]
    assert sum(pr < 0.95 * ob for pr, ob in zip(predicted, observed, strict=True)) <= 1
    # The same points taken as exact (no run marked stopped) give the flat law of the old fit.
    for p in points:
        p.fact_recall = min(p.fact_recall, 0.99)
    assert ParametricMemoryLaw.fit_points(points).alpha < 0.2


def test_choose_rank_returns_the_smallest_rank_that_meets_the_target():
    law = ParametricMemoryLaw.fit_points(synthetic_points(noise=0.0))
    at_8 = law.predict(8, 1000, 3.0)[1]
    at_4 = law.predict(4, 1000, 3.0)[1]
    assert at_4 < at_8
    target = (at_4 + at_8) / 2  # reachable at rank 8, not at rank 4
    plan = law.choose_rank(1000, target, loss_before=3.0)
    assert plan.rank == 8 and plan.predicted_fact_recall == pytest.approx(at_8)
    assert all(plan.candidates[r] < target for r in plan.candidates if r < 8)
    # More to hold needs at least as much rank; an easier target needs no more.
    assert law.choose_rank(4000, target, 3.0).rank > 8
    assert law.choose_rank(1000, at_4, 3.0).rank == 4


def test_requests_out_of_range_get_clear_errors():
    law = ParametricMemoryLaw.fit_points(synthetic_points(noise=0.0))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(LawError, match="target recall must be in"):
            law.choose_rank(1000, bad, 3.0)
    with pytest.raises(LawError, match="ℓ must be positive"):
        law.choose_rank(0, 0.9, 3.0)
    with pytest.raises(LawError, match="no rank up to 2 is predicted to reach"):
        law.choose_rank(10**7, 0.99, 3.0, max_rank=2)
    with pytest.raises(LawError, match="serving limit"):
        law.choose_rank(1000, 0.9, 3.0, candidates=(8, 16), max_rank=4)


def test_fit_needs_enough_varied_points():
    points = synthetic_points(0.0)
    with pytest.raises(LawError, match="at least 4 points"):
        ParametricMemoryLaw.fit_points(points[:3])
    same_rank = [p for p in points if p.rank == 4]
    with pytest.raises(LawError, match="two different ranks"):
        ParametricMemoryLaw.fit_points(same_rank)


def test_save_load_roundtrip_and_refit_keeps_history(tmp_path):
    law = ParametricMemoryLaw.fit_points(synthetic_points(0.02), base_model={"name": "m"})
    path = tmp_path / "law.json"
    law.save(path)
    back = ParametricMemoryLaw.load(path)
    assert back.to_dict() == law.to_dict()
    assert back.predict(8, 1000, 3.0) == law.predict(8, 1000, 3.0)
    assert not list(tmp_path.glob("*.tmp"))

    refit = law.refit_with(LawPoint(64, 1000, 3.0, 0.01, 1.0, source="job-1"))
    assert len(refit.points) == len(law.points) + 1
    assert refit.history[-1]["added_point"]["source"] == "job-1"
    assert refit.history[-1]["constants"]["alpha"] == law.alpha
    assert refit.base_model == {"name": "m"}


def _add_points(args):
    home, start = args
    import os

    os.environ["MEMUPDATE_HOME"] = home
    from memupdate.memory.adapter import AdapterFamily
    from memupdate.memory.base_model import ModelIdentity
    from memupdate.memory.planning import record_training

    for i in range(start, start + 5):
        point = LawPoint(4, 1000 + i, 3.0, 1.0, 0.5, source=f"w{i}")
        record_training(ModelIdentity("m", "d"), AdapterFamily(layers=(1,)), point)


def test_concurrent_refinements_lose_no_point(tmp_path, monkeypatch):
    import multiprocessing

    from memupdate.memory.adapter import AdapterFamily
    from memupdate.memory.base_model import ModelIdentity
    from memupdate.memory.planning import record_training, user_law_path

    monkeypatch.setenv("MEMUPDATE_HOME", str(tmp_path))
    identity, family = ModelIdentity("m", "d"), AdapterFamily(layers=(1,))
    # No law yet: nothing to refine, nothing written.
    assert record_training(identity, family, LawPoint(1, 10, 3.0, 2.0, 0.0)) is None
    start = ParametricMemoryLaw.fit_points(synthetic_points(0.02))
    start.save(user_law_path(identity, family))

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_add_points, [(str(tmp_path), k * 5) for k in range(4)])
    law = ParametricMemoryLaw.load(user_law_path(identity, family))
    added = {p.source for p in law.points} - {p.source for p in start.points}
    assert added == {f"w{i}" for i in range(20)}
    assert len(law.history) == 20 and law.fit["n_points"] == len(start.points) + 20


def test_plan_takes_the_best_rank_when_no_rank_is_predicted_to_reach(tiny):
    from memupdate.memory.adapter import default_family
    from memupdate.memory.base_model import ModelIdentity
    from memupdate.memory.encoding import encode_facts
    from memupdate.memory.fact_sets import phonebook_facts
    from memupdate.memory.planning import plan_update

    model, tok = tiny
    facts = encode_facts(phonebook_facts(5), tok, 256)
    law = ParametricMemoryLaw.fit_points(synthetic_points(0.0))
    family = default_family(model.config.num_hidden_layers)
    plan = plan_update(
        model, facts, tok.pad_token_id, ModelIdentity("t", "d"), family, 0.999, max_rank=4, law=law
    )
    # Rank matters in this law, so the best effort is the largest rank allowed.
    assert plan.rank == 4 and "so rank 4: the smallest" in plan.law
    assert plan.predicted_fact_recall < 0.999
    ell = plan.sequence_length
    assert law.reduction(4, ell) > law.reduction(2, ell) * math.exp(law.flat_tolerance())
    easy = plan_update(
        model, facts, tok.pad_token_id, ModelIdentity("t", "d"), family, 1e-9, max_rank=4, law=law
    )
    assert easy.rank == 1 and easy.law == "given"


def test_a_training_gets_at_least_the_law_budget(tiny):
    """The law promises recall within its budget (epochs over the base), so a job's step
    budget is the law's for that base, at least MIN_TRAINING_STEPS. (And a large base is planned
    from a sample of its sequences.)"""
    from memupdate.memory.adapter import default_family
    from memupdate.memory.base_model import ModelIdentity
    from memupdate.memory.calibration import MIN_TRAINING_STEPS
    from memupdate.memory.encoding import encode_facts
    from memupdate.memory.fact_sets import phonebook_facts
    from memupdate.memory.planning import LOSS_SAMPLE_SEQUENCES, plan_update
    from memupdate.memory.recall import measure_recall

    model, tok = tiny
    law = ParametricMemoryLaw.fit_points(
        synthetic_points(0.0), training={"epochs": 150, "batch_size": 16}
    )
    family = default_family(model.config.num_hidden_layers)

    def plan(count):
        facts = encode_facts(phonebook_facts(count), tok, 256)  # no chat template: one form
        return plan_update(
            model, facts, tok.pad_token_id, ModelIdentity("t", "d"), family, 0.9, law=law
        )

    small, large = plan(40), plan(300)
    assert small.budget_steps == 150 * 3 and small.budgeted().training_steps == MIN_TRAINING_STEPS
    # A large base's base loss comes from a sample of its sequences, close to the full mean.
    assert small.loss_measured_on == 40 and large.loss_measured_on == LOSS_SAMPLE_SEQUENCES
    every = encode_facts(phonebook_facts(300), tok, 256)
    full = measure_recall(model, every, tok.pad_token_id).mean_loss_nats
    assert large.loss_before_nats == pytest.approx(full, rel=0.05)
    assert large.budget_steps == 150 * 19 == large.budgeted().training_steps
    assert large.budgeted(requested=7).to_dict()["training_steps"] == 7


def test_a_law_flat_in_rank_falls_back_to_the_smallest_rank():
    """Where the law says rank hardly matters (the budget limits), the best effort is rank 1:
    no larger rank is predicted to reduce the loss by more than FLAT_TOLERANCE (log) more."""
    flat = ParametricMemoryLaw(C=125.5, alpha=0.0002, beta=0.0076, b=-118.4, L50=0.376, k=6.72)
    with pytest.raises(UnreachableTarget):
        flat.choose_rank(330, 0.9, 2.5, max_rank=8)
    plan = flat.best_effort_rank(330, 2.5, max_rank=8)
    assert plan.rank == 1
    assert flat.reduction(8, 330) / flat.reduction(1, 330) < math.exp(FLAT_TOLERANCE)
    steep = ParametricMemoryLaw(C=2.0, alpha=0.5, beta=0.3, b=0.0, L50=0.4, k=3.0)
    assert steep.best_effort_rank(4000, 3.0, max_rank=8).rank == 8


def test_beyond_its_points_a_flat_law_falls_back_to_the_largest_rank():
    """The same flat law, fitted on points up to ℓ 1,000: at ℓ 330 the best effort is still rank
    1, at ℓ 22,000 (1,000 phone numbers with their chat forms) it is the largest allowed."""
    flat = ParametricMemoryLaw(C=125.5, alpha=0.0002, beta=0.0076, b=-118.4, L50=0.376, k=6.72)
    flat.points = [LawPoint(1, ell, 3.0, 0.05, 1.0) for ell in (150, 1000)]
    assert not flat.extrapolates(1000) and flat.extrapolates(1001)
    assert flat.best_effort_rank(330, 2.5, max_rank=8).rank == 1
    with pytest.raises(UnreachableTarget):
        flat.choose_rank(22000, 0.9, 3.0, max_rank=8)
    assert flat.best_effort_rank(22000, 3.0, max_rank=8).rank == 8


def test_only_fresh_trainings_within_the_law_budget_refine_it(tmp_path, monkeypatch):
    """A job that trained past the law's budget is not a point of the law (with an epoch budget
    of 10, 40 facts (3 batches) allow 30 steps), nor is a warm start."""
    from memupdate.memory.adapter import AdapterFamily
    from memupdate.memory.base_model import ModelIdentity
    from memupdate.memory.planning import record_training, user_law_path

    monkeypatch.setenv("MEMUPDATE_HOME", str(tmp_path))
    identity, family = ModelIdentity("m", "d"), AdapterFamily(layers=(1,))
    law = ParametricMemoryLaw.fit_points(synthetic_points(0.02), "relative")
    law.training = {"epochs": 10, "batch_size": 16}
    law.save(user_law_path(identity, family))
    past = LawPoint(4, 440, 3.0, 0.1, 1.0, source="job:long", steps=31, facts=40)
    within = LawPoint(4, 440, 3.0, 0.1, 1.0, source="job:short", steps=30, facts=40)
    assert record_training(identity, family, past) is None
    warm = LawPoint(4, 440, 0.4, 0.1, 1.0, source="job:warm", steps=30, facts=40)
    assert record_training(identity, family, warm, warm_start=True) is None
    assert record_training(identity, family, within) == user_law_path(identity, family)
    refined = ParametricMemoryLaw.load(user_law_path(identity, family))
    sources = {p.source for p in refined.points}
    assert sources & {"job:short", "job:long", "job:warm"} == {"job:short"}
    assert refined.response == "relative" and len(refined.history) == 1  # refitted in its form


def test_a_law_file_for_another_family_is_refused(tmp_path, monkeypatch):
    from dataclasses import replace

    from memupdate.memory.adapter import AdapterFamily
    from memupdate.memory.base_model import ModelIdentity
    from memupdate.memory.planning import find_law, user_law_path

    monkeypatch.setenv("MEMUPDATE_HOME", str(tmp_path))
    identity, family = ModelIdentity("m", "d"), AdapterFamily(layers=(1,))
    other = replace(family, learning_rate=1e-2)
    assert user_law_path(identity, family) != user_law_path(identity, other)
    law = ParametricMemoryLaw.fit_points(synthetic_points(0.02), family=other.to_dict())
    law.save(user_law_path(identity, family))  # copied under the wrong family's name
    with pytest.raises(LawError, match="fitted for another adapter family"):
        find_law(identity, family)


def test_an_upgraded_shipped_law_replaces_a_copy_refined_from_the_old_one(tmp_path, monkeypatch):
    """This machine's refined copy wins while it was refined from the installed law; once the
    package ships another law, planning uses that one with the copy's job points added, and
    the next refinement saves it so."""
    from memupdate.memory import planning
    from memupdate.memory.adapter import AdapterFamily
    from memupdate.memory.base_model import ModelIdentity

    monkeypatch.setenv("MEMUPDATE_HOME", str(tmp_path / "home"))
    identity, family = ModelIdentity("m", "d"), AdapterFamily(layers=(1,))
    shipped = tmp_path / "shipped.json"
    monkeypatch.setattr(planning, "shipped_law_path", lambda *_: shipped)
    old = ParametricMemoryLaw.fit_points(synthetic_points(0.02), family=family.to_dict())
    old.save(shipped)
    job = LawPoint(4, 700, 3.0, 1.0, 0.5, source="job:1")
    assert planning.record_training(identity, family, job) == planning.user_law_path(
        identity, family
    )
    law, where = planning.find_law(identity, family)
    assert where == str(planning.user_law_path(identity, family)) and law.points[-1] == job

    new = ParametricMemoryLaw.fit_points(synthetic_points(0.02, seed=1), family=family.to_dict())
    new.save(shipped)  # the package was upgraded
    law, where = planning.find_law(identity, family)
    assert law.points == [*new.points, job] and "1 job point(s)" in where
    second = LawPoint(8, 900, 3.0, 1.2, 0.5, source="job:2")
    planning.record_training(identity, family, second)
    law, where = planning.find_law(identity, family)
    assert law.points == [*new.points, job, second]
    assert where == str(planning.user_law_path(identity, family))
    ParametricMemoryLaw.fit_points(synthetic_points(0.02, seed=2), family=family.to_dict()).save(
        shipped
    )  # and again: no job point is lost
    assert planning.find_law(identity, family)[0].points[-2:] == [job, second]

    # A law this machine calibrated itself (`calibrate --install`) is no copy: it stays first.
    own = ParametricMemoryLaw.fit_points(synthetic_points(0.02, seed=3), family=family.to_dict())
    own.save(planning.user_law_path(identity, family))
    planning.record_training(identity, family, job)
    law, where = planning.find_law(identity, family)
    assert law.points == [*own.points, job] and where == str(
        planning.user_law_path(identity, family)
    )


# The default model as `make setup` installs it, and the first job of a benchmark run on
# 2026-12-06 with the gated family (20 phone-number forms, ℓ 220, rank 1, every fact recalled).
DEFAULT_MODEL = ("SmolLM2-135M-Instruct", "af7a85575389cc2d")
GATED_JOB = LawPoint(1, 220, 2.9457, 0.0079, 1.0, 1.0, 10176, "job:base-0", 172, 20)


def test_the_default_and_the_gated_family_each_have_a_shipped_law():
    """What the service trains by default, with and without `--gate`, is planned by a law fitted
    for exactly that family (a law found under another family's name would be refused)."""
    from memupdate.memory.adapter import choose_family
    from memupdate.memory.base_model import ModelIdentity
    from memupdate.memory.planning import shipped_law_path

    identity = ModelIdentity(*DEFAULT_MODEL)  # its digest names the shipped laws
    default, gated = choose_family(30), choose_family(30, gated=True)
    assert "train_until" not in default.to_dict()  # the laws recorded before the line existed
    assert (gated.learning_rate, gated.train_until) == (5e-3, 0.99)
    for family in (default, gated):
        law = ParametricMemoryLaw.load(shipped_law_path(identity, family))
        assert law.family == family.to_dict()


def _shipped_gated_law():
    """(identity, gated family, its shipped law)."""
    from memupdate.memory.adapter import choose_family
    from memupdate.memory.base_model import ModelIdentity
    from memupdate.memory.planning import shipped_law_path

    identity, family = ModelIdentity(*DEFAULT_MODEL), choose_family(30, gated=True)
    return identity, family, ParametricMemoryLaw.load(shipped_law_path(identity, family))


def test_a_job_the_law_already_predicts_refines_it_without_a_refit():
    """The shipped gated law predicted GATED_JOB. Refitting on it moved α from 0.009 to 10.2
    and let rank 2 hold 3,000 tokens of phone numbers; refined, the point is kept and the
    constants stay. A training the law mispredicts still refits it."""
    _, _, law = _shipped_gated_law()
    job = GATED_JOB
    assert law.explains(job)
    refined = law.refined_with(job)
    assert refined.points == [*law.points, job]
    assert refined.history[-1]["added_point"]["source"] == "job:base-0"
    for rank in (1, 2, 4, 8):
        assert refined.predict(rank, 3000, 2.99) == law.predict(rank, 3000, 2.99)
    assert law.predict(2, 3000, 2.99)[1] < 0.2
    assert law.refit_with(job).predict(2, 3000, 2.99)[1] > 0.9  # what a refit did

    # Rank 4 at ℓ 3,000 recalling 0.2 of the facts, where the law predicts 0.83: refitted.
    surprise = LawPoint(4, 3000, 2.99, 1.5, 0.2, source="job:surprise", steps=2000, facts=273)
    assert not law.explains(surprise)
    corrected = law.refined_with(surprise)
    assert corrected.history[-1]["constants"]["alpha"] == law.alpha
    assert corrected.predict(4, 3000, 2.99)[1] < law.predict(4, 3000, 2.99)[1] - 0.3


def test_a_copy_refitted_before_the_rule_is_planned_with_the_rule(tmp_path, monkeypatch):
    """This machine's copy of the gated law had been refitted on the demo's jobs (α 10.2); the
    same copy, written as the old rule wrote it, is read as the shipped law refined by today's
    rule, its job point kept."""
    from memupdate.memory.planning import find_law, shipped_law_path, user_law_path

    monkeypatch.setenv("MEMUPDATE_HOME", str(tmp_path))
    identity, family, shipped = _shipped_gated_law()
    drifted = shipped.refit_with(GATED_JOB)
    drifted.history.insert(0, {"copied_from": f"shipped:{shipped_law_path(identity, family).name}"})
    drifted.save(user_law_path(identity, family))
    law, where = find_law(identity, family)
    assert where == str(user_law_path(identity, family))
    assert law.points == [*shipped.points, GATED_JOB]
    assert (law.alpha, law.beta, law.C) == (shipped.alpha, shipped.beta, shipped.C)
    assert law.predict(2, 3000, 2.99) == shipped.predict(2, 3000, 2.99)


def novel_points(shares: dict[str, float]) -> list[LawPoint]:
    """Points of kinds whose facts share a template to different degrees (kind -> novel share),
    from one relative law in novel tokens: what a rank holds depends on ℓ × share."""
    points = []
    for kind, share in shares.items():
        for r in (1, 4, 16):
            for ell in (500, 2000, 8000):
                removed = min(1.5 * r**0.3 * (ell * share) ** -0.3 + 0.3, 0.995)
                after = 3.0 * (1 - removed)
                recall = 1 / (1 + (after / 0.4) ** 3)
                points.append(
                    LawPoint(r, ell, 3.0, after, recall, source=f"{kind}-{r}-{ell}", kind=kind)
                )
                points[-1].novel_share = share
    return points


def test_a_law_in_novel_tokens_gives_templated_facts_the_rank_their_novel_tokens_need():
    """Fitted on ℓ alone, one law cannot tell a templated kind (0.4 of ℓ novel) from random
    digits (0.9): it splits the difference. Counting novel tokens, it predicts both."""
    points = novel_points({"bio": 0.4, "phone": 0.9})
    novel = ParametricMemoryLaw.fit_points(points, "relative", "novel")
    tokens = ParametricMemoryLaw.fit_points(points, "relative")
    assert novel.recall_error(points) < 0.01 < tokens.recall_error(points)
    assert novel.size(4000, 0.4) == 1600 and tokens.size(4000, 0.4) == 4000
    bio, phone = (novel.plan(novel.size(4000, s), 0.9, 3.0)[0].rank for s in (0.4, 0.9))
    assert bio < phone
    with pytest.raises(LawError, match="novel share was not measured"):
        novel.size(4000, None)
    unmeasured = LawPoint(4, 4000, 3.0, 0.1, 1.0, source="job:old")
    assert tokens.can_size(unmeasured) and not novel.can_size(unmeasured)
    with pytest.raises(LawError, match="job:old"):
        ParametricMemoryLaw.fit_points([*points, unmeasured], "relative", "novel")


def test_a_law_file_says_what_its_length_counts(tmp_path):
    """Saved and loaded, a novel-token law stays one; a file written before laws said (no
    `length`) is read as counting every token, which is how it was fitted."""
    import json

    law = ParametricMemoryLaw.fit_points(
        novel_points({"bio": 0.4, "phone": 0.9}), "relative", "novel"
    )
    law.save(tmp_path / "law.json")
    loaded = ParametricMemoryLaw.load(tmp_path / "law.json")
    assert loaded.length == "novel" and loaded.points == law.points
    data = json.loads((tmp_path / "law.json").read_text())
    del data["length"]
    for point in data["points"]:
        del point["novel_share"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = ParametricMemoryLaw.load(tmp_path / "old.json")
    assert old.length == "tokens" and old.size(4000, None) == 4000


def test_a_novel_token_law_is_refined_only_by_jobs_that_measured_their_share(tmp_path, monkeypatch):
    from memupdate.memory.adapter import AdapterFamily
    from memupdate.memory.base_model import ModelIdentity
    from memupdate.memory.planning import find_law, record_training, user_law_path

    monkeypatch.setenv("MEMUPDATE_HOME", str(tmp_path))
    identity, family = ModelIdentity("m", "d"), AdapterFamily(layers=(1,))
    law = ParametricMemoryLaw.fit_points(
        novel_points({"bio": 0.4, "phone": 0.9}), "relative", "novel"
    )
    law.save(user_law_path(identity, family))
    unmeasured = LawPoint(4, 3000, 3.0, 1.5, 0.2, source="job:unmeasured", steps=10, facts=40)
    assert record_training(identity, family, unmeasured) is None
    measured = LawPoint(4, 3000, 3.0, 1.5, 0.2, source="job:measured", steps=10, facts=40)
    measured.novel_share = 0.5
    assert record_training(identity, family, measured) == user_law_path(identity, family)
    refined, _ = find_law(identity, family)
    assert [p.source for p in refined.points[-1:]] == ["job:measured"]
    assert refined.length == "novel"


def test_the_novel_share_is_measured_only_where_it_can_change_the_rank():
    """The share only shortens ℓ: where the smallest rank reaches the target at every token, the
    plan is rank 1 whatever the share, and its in-context pass (about five base-loss passes) is
    skipped."""
    from memupdate.memory.planning import share_can_matter

    law = ParametricMemoryLaw.fit_points(
        novel_points({"bio": 0.4, "phone": 0.9}), "relative", "novel"
    )
    assert law.plan(10, 0.9, 3.0)[0].rank == 1
    assert not share_can_matter(law, 10, 0.9, 3.0, max_rank=64)
    assert law.plan(6000, 0.9, 3.0)[0].rank > 1
    assert share_can_matter(law, 6000, 0.9, 3.0, max_rank=64)
