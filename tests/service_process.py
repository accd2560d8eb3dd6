"""Run `memupdate serve` and `memupdate worker` as real child processes on 127.0.0.1 for
end-to-end tests."""

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from clients.client import MemupdateClient
from memupdate.serving.vllm_server import terminate_with_parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(host, port) of every listening TCP socket of a process and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.add((conn.laddr.ip, conn.laddr.port))
    return found


def is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


class ServiceProcess:
    ready_text = "memupdate gRPC on"

    def __init__(self, data_dir: Path, model: Path, *extra: str, env: dict | None = None):
        self.data_dir = data_dir
        self.port = free_port()
        self.metrics_port = free_port()
        self.args = [
            sys.executable,
            "-m",
            "memupdate.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--model",
            str(model),
            "--grpc-port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            "--max-lora-rank",
            "8",
            *extra,
        ]
        self.env = {**os.environ, **(env or {})}
        self.log = data_dir.parent / f"{data_dir.name}-{self.args[3]}.log"
        self.process: subprocess.Popen | None = None
        self.vllm_url: str | None = None

    def start(self, timeout_s: float = 300) -> "ServiceProcess":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log.stat().st_size if self.log.exists() else 0  # a restart appends
        self.process = subprocess.Popen(
            self.args,
            env=self.env,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # If the test or bench dies without its clean-up (SIGTERM, SIGKILL), the service
            # gets SIGTERM and stops its vLLM server: nothing is left running. The signal follows
            # the starting thread, so start services from one that outlives them.
            preexec_fn=terminate_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            if self.ready_text in text:
                for line in text.splitlines():
                    if line.startswith("vLLM (OpenAI API) on "):
                        self.vllm_url = line.split(" on ", 1)[1].split(",")[0]
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"memupdate {self.args[3]} exited: {text[-2000:]}")
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"memupdate {self.args[3]} did not start in time")

    def client(self, **kw) -> MemupdateClient:
        return MemupdateClient(f"127.0.0.1:{self.port}", **kw)

    def kill(self) -> None:
        """SIGKILL the server and everything it started (its vLLM too), as a crash would."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


class WorkerProcess(ServiceProcess):
    """`memupdate worker` with its own working folder (no gRPC port of its own)."""

    ready_text = "taking jobs from"

    def __init__(self, data_dir: Path, model: Path, *extra: str, env: dict | None = None):
        super().__init__(data_dir, model, *extra, env=env)
        self.args[3] = "worker"
        at = self.args.index("--grpc-port")
        del self.args[at : at + 2]
        self.log = data_dir.parent / f"{data_dir.name}-worker.log"
