"""The load promises (bench/load.py, run small): 50 clients submit, watch and query at once
while a job trains; every call is answered within its 5 s deadline or refused with
RESOURCE_EXHAUSTED, no job is lost or run twice, health stays SERVING, memory stays bounded."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from load import check_jobs, report, run_load, start_service, start_training  # noqa: E402


def test_fifty_clients_while_a_job_trains(tiny_dir, tmp_path, capsys):
    proc = start_service(tmp_path, tiny_dir)
    try:
        job_id = start_training(proc)
        result = run_load(proc, job_id, clients=50, seconds=10)
        problems = check_jobs(proc, result, job_id)
    finally:
        proc.stop()
    with capsys.disabled():
        report(result, None, 50)
    assert not result.unexpected(), result.unexpected()
    assert set(result.health) == {"SERVING"} and sum(result.health.values()) >= 10
    assert not problems, problems
    ops = {op for op, code in result.codes if code == "OK"}
    assert ops == {"status", "list", "submit", "watch"}  # every kind of call got through
    assert result.codes[("submit", "RESOURCE_EXHAUSTED")] > 0  # the queue limit held
    assert max(result.rss_mb) - result.rss_mb[0] < 300, result.rss_mb
