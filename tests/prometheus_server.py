"""A real Prometheus server (Debian's `prometheus` binary) on 127.0.0.1 for end-to-end tests."""

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from service_process import free_port

ALERTS = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "alerts.yml"


class PrometheusServer:
    """Scrapes `targets` every `interval` and evaluates the project's alert rules, with every
    rule's `for:` shortened to `rule_for` so that a test sees an alert within seconds."""

    def __init__(self, folder: Path, targets: list[str], interval: str = "1s", rule_for="2s"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        rules = re.sub(r"(?m)^(\s+for:) \S+$", rf"\1 {rule_for}", ALERTS.read_text())
        (self.folder / "alerts.yml").write_text(rules)
        (self.folder / "prometheus.yml").write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": interval, "evaluation_interval": interval},
                    "rule_files": ["alerts.yml"],
                    "scrape_configs": [
                        {"job_name": "memupdate", "static_configs": [{"targets": targets}]}
                    ],
                }
            )
        )
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> "PrometheusServer":
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed (make test installs Debian's package)"
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={self.folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=open(self.folder / "prometheus.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2)
                return self
            except OSError:
                assert self.process.poll() is None, (self.folder / "prometheus.log").read_text()
                time.sleep(0.3)
        raise RuntimeError("prometheus did not become ready")

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, expr: str) -> float | None:
        result = self.api("query", query=expr)["result"]
        return float(result[0]["value"][1]) if result else None

    def alerts(self, name: str, state: str = "firing", **labels) -> list[dict]:
        return [
            a
            for a in self.api("alerts")["alerts"]
            if a["labels"]["alertname"] == name
            and a["state"] == state
            and all(a["labels"].get(k) == v for k, v in labels.items())
        ]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
