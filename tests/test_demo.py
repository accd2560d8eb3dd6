"""`make demo`'s script on the default model: the service end to end, once, through gRPC and
vLLM (the other service tests use the tiny model)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
ROOT = Path(__file__).resolve().parents[1]


def test_demo_takes_the_example_facts_live_on_the_default_model(default_dir):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for kind in ("planned", "trained", "published", "serving_verified", "live"):
        assert f"] {kind}:" in out
    assert "greedy exact 12/12 prompts, 12/12 chat questions" in out
    assert "fact recall 1.000 (prompt 1.000, chat 1.000)" in out
    assert re.search(r"locality through vLLM: [01]\.\d{3} of next-token answers on 48", out)
    assert "stopped the service and its vLLM" in out
