"""`memupdate calibrate` end to end on the tiny model with a small grid."""

import json

from memupdate.calibration import load_points
from memupdate.cli import main
from memupdate.law import ParametricMemoryLaw


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
    refit = ParametricMemoryLaw.fit_points(law.points)
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
    ) in (0, 2)
    output = capsys.readouterr()
    assert "home/laws" in output.out or "no rank up to" in output.err
