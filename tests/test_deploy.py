"""deploy/compose.yaml, checked without a Docker engine (none runs on these machines): the
server's and workers' commands parse with the real command line and give valid settings that
agree (one database, one registry, the replicas that exist), the vLLM replicas start with the
flags the managed server is tested with, the shared registry is mounted everywhere and the
workers' working folders nowhere shared, and Prometheus's configuration passes promtool."""

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from tools import tool_missing

from memupdate.cli import build_parser
from memupdate.cli.service import _config
from memupdate.serving.vllm_server import ManagedVLLM, ServerConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def substituted(text: str) -> str:
    """Compose's ${VAR:-default}, with every variable unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(substituted((DEPLOY / "compose.yaml").read_text()))["services"]


def settings(service: dict, monkeypatch):
    for key, value in service["environment"].items():
        monkeypatch.setenv(key, str(value))
    return _config(build_parser().parse_args(service["command"]))


def test_server_and_workers_share_one_queue_registry_and_set_of_replicas(compose, monkeypatch):
    server = settings(compose["server"], monkeypatch)
    worker = settings(compose["worker"], monkeypatch)
    assert server.workers == 0  # the workers train; the server only takes requests
    assert compose["worker"]["command"][0] == "worker"
    for key in ("database_url", "registry_dir", "vllm_urls", "max_lora_rank"):
        assert getattr(server, key) == getattr(worker, key), key
    assert urlparse(server.database_url).hostname in compose
    for url in server.vllm_urls:
        host, port = urlparse(url).hostname, urlparse(url).port
        replica = compose[host]["command"]
        assert f"--port={port}" in replica and f"--max-lora-rank={server.max_lora_rank}" in replica
        env = compose[host]["environment"]
        assert env["MEMUPDATE_DATABASE_URL"] == server.database_url  # the resolver's index
        assert f"adapters:{env['MEMUPDATE_REGISTRY']}:ro" in compose[host]["volumes"]
    for name in ("server", "worker"):
        assert f"adapters:{server.registry_dir}" in compose[name]["volumes"]
    assert not any(str(worker.data_dir) in v for v in compose["worker"]["volumes"])


def test_replicas_start_with_the_flags_the_managed_server_is_tested_with(compose, tmp_path):
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 512}')
    managed = ManagedVLLM(ServerConfig(model=tmp_path)).command()
    expected = {arg for arg in managed if arg.startswith("--")}
    for name in ("vllm-1", "vllm-2"):
        flags = {arg.split("=")[0] for arg in compose[name]["command"]}
        assert flags == expected, name
        env = compose[name]["environment"]
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"  # resolvers are consulted


def test_prometheus_scrapes_what_runs_and_passes_promtool(compose, tmp_path):
    promtool = shutil.which("promtool")
    if not promtool:
        tool_missing("promtool is not installed (make test installs Debian's prometheus)")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["memupdate"]["static_configs"][0]["targets"] == ["server:9464"]
    assert "--metrics-port=9464" in compose["server"]["command"]
    assert jobs["memupdate-worker"]["dns_sd_configs"][0]["port"] == 9465
    assert "--metrics-port=9465" in compose["worker"]["command"]
    out = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_grafana_is_provisioned_with_the_dashboard(compose):
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "memupdate.yml").read_text()
    )
    folder = provider["providers"][0]["options"]["path"]
    assert f"./grafana/memupdate.json:{folder}/memupdate.json:ro" in compose["grafana"]["volumes"]
    assert (DEPLOY / "grafana" / "memupdate.json").is_file()
