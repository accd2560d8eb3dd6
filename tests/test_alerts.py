"""The alert rules pass promtool's checks and their unit tests (synthetic series), and the
Grafana dashboard only queries metrics the service exports."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from tools import tool_missing

ROOT = Path(__file__).resolve().parents[1]
PROMTOOL = shutil.which("promtool")


def promtool(*args: str) -> subprocess.CompletedProcess:
    if PROMTOOL is None:
        tool_missing("promtool missing: `make test` installs Debian's prometheus")
    return subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True)


def test_rules_are_valid():
    out = promtool("check", "rules", "deploy/prometheus/alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 9 rules found" in out.stdout


def test_rule_unit_tests_pass():
    out = promtool("test", "rules", "tests/prometheus/alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    "right, wrong, alert",
    [
        (
            "memupdate_kb_fact_recall < memupdate_kb_target_fact_recall",
            "memupdate_kb_fact_recall < 0.1 * memupdate_kb_target_fact_recall",
            "MemupdateRecallBelowTarget",
        ),
        (
            "memupdate_kb_verified_locality - memupdate_kb_locality > 0.02",
            "memupdate_kb_verified_locality - memupdate_kb_locality > 0.2",
            "MemupdateLocalityDroppedSincePublish",
        ),
    ],
)
def test_rule_unit_tests_catch_a_broken_rule(tmp_path, right, wrong, alert):
    """The unit tests are not vacuous: a rule with the wrong threshold fails them."""
    if PROMTOOL is None:
        tool_missing("promtool missing: `make test` installs Debian's prometheus")
    rules = (ROOT / "deploy/prometheus/alerts.yml").read_text()
    assert right in rules
    broken = rules.replace(right, wrong)
    (tmp_path / "deploy/prometheus").mkdir(parents=True)
    (tmp_path / "tests/prometheus").mkdir(parents=True)
    (tmp_path / "deploy/prometheus/alerts.yml").write_text(broken)
    shutil.copy(ROOT / "tests/prometheus/alerts_test.yml", tmp_path / "tests/prometheus")
    out = subprocess.run(
        [PROMTOOL, "test", "rules", "tests/prometheus/alerts_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and alert in out.stdout + out.stderr


def exported_metric_names() -> set[str]:
    """Every metric name the service can export, read from the metric definitions."""
    from memupdate.service import metrics

    names = set()
    source = Path(metrics.__file__).read_text()
    for name in re.findall(r'"(memupdate_[a-z_]+)"', source):
        names |= {name, f"{name}_total", f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    names |= {f"memupdate_kb_{n}" for n in re.findall(r'gauge\(\s*"([a-z_]+)"', source)}
    names.add("memupdate_kb_version_info")
    return names


def test_alert_rules_and_dashboard_use_exported_metrics():
    exported = exported_metric_names()
    rules = (ROOT / "deploy/prometheus/alerts.yml").read_text()
    dashboard = json.loads((ROOT / "deploy/grafana/memupdate.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    for text in [rules, *exprs]:
        for name in re.findall(r"\bmemupdate_[a-z_]+", text):
            assert name in exported, f"{name} is not a metric the service exports"
