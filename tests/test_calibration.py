"""`memupdate calibrate` end to end on the tiny model with a small grid."""

import json

import pytest

from memupdate.cli import main
from memupdate.memory.calibration import load_points, run_case, run_key
from memupdate.memory.law import LawError, ParametricMemoryLaw


def test_calibrate_writes_a_law_that_reloads_predicts_and_resumes(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MEMUPDATE_HOME", str(tmp_path / "home"))
    out = tmp_path / "cal"
    args = [
        "calibrate",
        "--model",
        str(tiny_dir),
        "--ranks",
        "1,4,16",
        "--lengths",
        "40,120",
        "--steps",
        "40",
        "--lr",
        "1e-2",
        "--out",
        str(out),
        "--install",
        "--quiet",
    ]
    assert main(args) == 0
    points = load_points(out / "points.jsonl")
    assert len(points) == 6 and {p.rank for p in points.values()} == {1, 4, 16}
    assert all(p.sequence_length >= 40 and p.params > 0 for p in points.values())

    law = ParametricMemoryLaw.load(out / "law.json")
    assert law.base_model["name"] == "tiny-llama" and law.training["steps"] == 40
    assert law.fit["n_points"] == 6 and "holdout_points" in law.fit
    assert (out / "law.png").stat().st_size > 10_000
    # The stored fit is reproduced from the stored points.
    refit = ParametricMemoryLaw.fit_points(law.points, law.response)
    assert (
        refit.alpha == law.alpha
        and refit.beta == law.beta
        and refit.fit["r2_log"] == law.fit["r2_log"]
    )
    after, recall = law.predict(4, 120, law.points[0].loss_before_nats)
    assert after > 0 and 0 <= recall <= 1

    # Rerunning finds every run done and trains nothing new; a torn last line is tolerated.
    with open(out / "points.jsonl", "a") as fh:
        fh.write('{"rank": 1, "sequen')
    before = (out / "points.jsonl").read_text()
    assert main(args) == 0
    assert (out / "points.jsonl").read_text() == before

    # The installed law is what `plan` now uses.
    facts = tmp_path / "f.jsonl"
    facts.write_text(
        json.dumps({"prompt": "The phone number of Ada Bauer is", "target": " 5550001234"}) + "\n"
    )
    capsys.readouterr()
    assert main(
        ["plan", str(facts), "--target-recall", "0.5", "--model", str(tiny_dir), "--json"]
        + ["--lr", "1e-2"]  # the family the law was fitted for
    ) in (0, 2)
    output = capsys.readouterr()
    assert "home/laws" in output.out or "no rank up to" in output.err


def test_an_epoch_budget_and_a_narrow_family_make_their_own_law(tiny_dir, tmp_path, monkeypatch):
    """--epochs gives each run epochs x batches steps (more facts, more steps); --modules makes
    a family of its own, installed under its own name and found only for that family."""
    from memupdate.memory.adapter import choose_family
    from memupdate.memory.base_model import model_identity
    from memupdate.memory.calibration import budget_steps
    from memupdate.memory.planning import find_law, user_law_path

    monkeypatch.setenv("MEMUPDATE_HOME", str(tmp_path / "home"))
    out = tmp_path / "cal"
    args = ["calibrate", "--model", str(tiny_dir), "--ranks", "1,4", "--lengths", "40,400"]
    args += ["--epochs", "3", "--min-steps", "0", "--modules", "down_proj", "--lr", "1e-2"]
    assert main([*args, "--out", str(out), "--install", "--quiet"]) == 0
    law = ParametricMemoryLaw.load(out / "law.json")
    assert law.training["epochs"] == 3 and "steps" not in law.training
    assert law.family["target_modules"] == ["down_proj"] and law.family["learning_rate"] == 1e-2
    small, large = (
        sorted(law.points, key=lambda p: p.facts)[0],
        max(law.points, key=lambda p: p.facts),
    )
    assert budget_steps(law.training, small.facts) == 3  # one batch of 16 facts or fewer
    assert large.facts > 16 and budget_steps(law.training, large.facts) >= 6
    assert all(0 < p.steps <= budget_steps(law.training, p.facts) for p in law.points)
    assert all(p.params == p.rank * (256 + 128) for p in law.points), "tiny down_proj: 256 -> 128"

    identity = model_identity(tiny_dir)
    narrow = choose_family(4, ("down_proj",), learning_rate=1e-2)
    assert find_law(identity, narrow)[1] == str(user_law_path(identity, narrow))
    with pytest.raises(LawError, match="no calibrated law"):
        find_law(identity, choose_family(4, ("down_proj",)))  # same modules, another lr


def test_calibrate_on_a_users_fact_file(tiny_dir, tmp_path, monkeypatch, capsys):
    from memupdate.memory.facts import Fact, write_facts

    monkeypatch.setenv("MEMUPDATE_HOME", str(tmp_path / "home"))
    cities = ["Avalon", "Brightwater", "Cold Harbor", "Dunmore", "Eastwick", "Fairhaven"]
    facts = [
        Fact(prompt=f"Project {i} is based in", target=f" {cities[i % 6]}, wing {i}")
        for i in range(40)
    ]
    write_facts(facts, tmp_path / "mine.jsonl")
    args = ["calibrate", "--model", str(tiny_dir), "--facts", str(tmp_path / "mine.jsonl")]
    args += ["--ranks", "1,4", "--epochs", "3", "--min-steps", "0", "--quiet"]

    assert main([*args, "--lengths", "30,90", "--out", str(tmp_path / "cal")]) == 0
    law = ParametricMemoryLaw.load(tmp_path / "cal" / "law.json")
    assert law.training["facts"] == "file:mine.jsonl"
    assert {p.sequence_length >= 30 for p in law.points} == {True}
    assert max(p.sequence_length for p in law.points) >= 90

    # A file too short for the largest ℓ is refused before anything is trained.
    capsys.readouterr()
    assert main([*args, "--lengths", "30,100000", "--out", str(tmp_path / "short")]) == 2
    assert "fewer than the largest ℓ asked for (100000)" in capsys.readouterr().err
    assert not (tmp_path / "short" / "points.jsonl").exists()


def test_calibrate_over_several_kinds_of_facts(tiny_dir, tmp_path, monkeypatch, capsys):
    """Each kind gets its own runs at every ℓ and rank; the law stores the kinds, the points
    their kind, and the fit how the law predicts each kind from the others alone."""
    monkeypatch.setenv("MEMUPDATE_HOME", str(tmp_path / "home"))
    out = tmp_path / "cal"
    args = ["calibrate", "--model", str(tiny_dir), "--ranks", "1,4", "--lengths", "30,60"]
    args += ["--epochs", "2", "--min-steps", "0", "--out", str(out), "--quiet"]
    assert main([*args, "--kinds", "phonebook,counterfactual"]) == 0
    points = load_points(out / "points.jsonl")
    assert sorted(points) == sorted(
        f"{kind}-r{rank}-l{ell}-s0"
        for kind in ("phonebook", "counterfactual")
        for rank in (1, 4)
        for ell in (30, 60)
    )
    assert {p.kind for p in points.values()} == {"phonebook", "counterfactual"}
    law = ParametricMemoryLaw.load(out / "law.json")
    assert law.response == "relative" and law.training["facts"] == "phonebook,counterfactual"
    assert set(law.fit["holdout_kinds"]) == {"phonebook", "counterfactual"}
    assert all(0 <= e <= 1 for e in law.fit["holdout_kinds"].values())

    # A second part of the grid into the same folder, fitted with the first part's points.
    part = ["calibrate", "--model", str(tiny_dir), "--ranks", "1,4", "--lengths", "90"]
    part += ["--kinds", "phonebook", "--min-steps", "0", "--out", str(out), "--quiet"]
    assert main([*part, "--epochs", "2", "--fit-all"]) == 0
    law = ParametricMemoryLaw.load(out / "law.json")
    assert law.training["facts"] == "phonebook,counterfactual"  # the folder's kinds, not the part's
    assert law.fit["n_points"] == 10 and {p.sequence_length >= 90 for p in law.points} == {
        True,
        False,
    }
    capsys.readouterr()
    assert main([*part, "--epochs", "1", "--fit-all"]) == 2  # another budget: not one law
    assert "calibrated with another budget?" in capsys.readouterr().err

    assert main([*args, "--kinds", "phonebook,recipes"]) == 2
    assert "unknown fact-set kind(s) ['recipes']" in capsys.readouterr().err


def test_a_seeded_runs_source_gives_back_its_facts_case():
    # Benches rebuild a point's facts from its source; a job's point has no seeded facts.
    assert run_case("rank-choice:" + run_key("biography", 8, 5009, 1500)) == (
        "biography",
        5009,
        1500,
    )
    assert run_case(run_key("phonebook", 1, 3000, 0)) == ("phonebook", 3000, 0)
    with pytest.raises(LawError, match="not a seeded run"):
        run_case("job:kb")
