"""The `memupdate` commands, run in-process on the tiny model."""

import json

import pytest

from memupdate.cli import main
from memupdate.memory.fact_sets import phonebook_facts
from memupdate.memory.facts import write_facts


@pytest.fixture()
def facts_file(tmp_path):
    path = tmp_path / "pb.jsonl"
    write_facts(phonebook_facts(8, seed=4), path)
    return path


def test_plan_without_a_law_falls_back_and_says_so(
    tiny_dir, facts_file, capsys, monkeypatch, tmp_path
):
    monkeypatch.setenv("MEMUPDATE_HOME", str(tmp_path / "home"))  # no user laws
    code = main(
        [
            "plan",
            str(facts_file),
            "--target-recall",
            "0.9",
            "--model",
            str(tiny_dir),
            "--max-rank",
            "16",
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["facts"] == 8 and report["sequence_length"] > 8 * 5
    assert report["rank"] == 16 and report["predicted_fact_recall"] is None
    assert "no calibrated law" in report["law"]
    assert report["adapter_params"] > 0
    # Read by people: facts as posted, then the sequences trained (the tiny model has no chat
    # template, so one form each).
    args = ["plan", str(facts_file), "--target-recall", "0.9", "--model", str(tiny_dir)]
    assert main(args) == 0
    assert "facts:                   8 (8 sequences: every form of each)" in capsys.readouterr().out


def test_train_writes_adapter_and_report(tiny_dir, facts_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    code = main(
        [
            "train",
            str(facts_file),
            "--out",
            str(out),
            "--rank",
            "8",
            "--lr",
            "1e-2",
            "--model",
            str(tiny_dir),
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["success"] and report["recall"]["fact_recall"] == 1.0
    assert report["greedy"]["exact"] == report["greedy"]["checked"] == 8
    assert report["rank"] == 8 and report["adapter_params"] > 0
    assert report["base_model"]["name"] == "tiny-llama"
    loc = report["locality"]
    assert 0 <= loc["token_agreement"] <= 1 and loc["tokens"] >= 1000 and loc["prompts"] == 48
    assert report["family"]["locality_weight"] == 4.0  # the default family trains with the term
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")]  # no temp left
    shown = capsys.readouterr().out
    assert "every target token passed" in shown and "locality: token agreement" in shown

    assert main(["compare", str(facts_file), "--adapter", str(out), "--model", str(tiny_dir)]) == 0
    assert "greedy verbatim: 8/8 facts" in capsys.readouterr().out
    # An existing output folder is not replaced silently.
    assert (
        main(["train", str(facts_file), "--out", str(out), "--rank", "8", "--model", str(tiny_dir)])
        == 2
    )


def test_train_that_runs_out_of_budget_fails_loudly(tiny_dir, facts_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    code = main(
        [
            "train",
            str(facts_file),
            "--out",
            str(out),
            "--rank",
            "1",
            "--max-steps",
            "2",
            "--model",
            str(tiny_dir),
            "--quiet",
        ]
    )
    assert code == 3
    assert not json.loads((out / "report.json").read_text())["success"]
    assert "NOT all facts recalled" in capsys.readouterr().out


def test_bad_fact_file_is_refused_with_the_line(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "target": " b"}\n{"prompt": "c", "target": ""}\n')
    code = main(
        ["train", str(bad), "--out", str(tmp_path / "x"), "--rank", "1", "--model", str(tiny_dir)]
    )
    assert code == 2
    assert "bad.jsonl:2: `target` is empty" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_contradiction_in_a_file_is_refused(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"prompt": "A is", "target": " 1"}\n{"prompt": "A is", "target": " 2"}\n')
    assert main(["plan", str(bad), "--target-recall", "1", "--model", str(tiny_dir)]) == 2
    assert "c.jsonl:2: contradicts c.jsonl:1" in capsys.readouterr().err


def test_unknown_model_folder_is_a_clear_error(tmp_path, facts_file, capsys):
    assert main(["plan", str(facts_file), "--target-recall", "1", "--model", str(tmp_path)]) == 2
    assert "is not a Hugging Face model folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("calibrate_flags", "calibrate_error", "serve_flags", "serve_error"),
    [
        (
            ["--modules", "down_proj,mlp"],
            "unknown projection(s) ['mlp']",
            ["--adapter-modules", "attn"],
            "unknown projection(s) ['attn']",
        ),
        (
            ["--layers", "1,9"],  # the tiny model has 4 layers
            "no layer [9] to adapt; this model's layers are 0 to 3",
            ["--adapter-layers", "2,2"],
            "a layer is named twice in [2, 2]",
        ),
        (
            ["--train-until", "1.0"],
            "train_until must be in (0.5, 1), got 1.0",
            ["--adapter-train-until", "0.4"],
            "adapter_train_until",
        ),
    ],
    ids=["projection", "layer", "line"],
)
def test_a_bad_adapter_family_is_refused_before_anything_starts(
    tiny_dir, tmp_path, capsys, calibrate_flags, calibrate_error, serve_flags, serve_error
):
    calibrate = ["calibrate", "--model", str(tiny_dir), "--out", str(tmp_path / "cal")]
    assert main([*calibrate, *calibrate_flags]) == 2
    assert calibrate_error in capsys.readouterr().err
    assert not (tmp_path / "cal").exists()
    serve = ["serve", "--data-dir", str(tmp_path / "svc"), *serve_flags]
    assert main(serve) == 2
    assert serve_error in capsys.readouterr().err
    assert not (tmp_path / "svc").exists()
