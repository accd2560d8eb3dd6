"""A real Postgres server (Debian's `postgresql` binaries) on 127.0.0.1 for tests: a cluster
made with initdb in a temporary folder, trust authentication on loopback, stopped and removed at
the end. Postgres refuses to run as root, so as root it runs as the `postgres` user."""

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from service_process import free_port
from tools import tool_missing


def postgres_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


class PostgresServer:
    def __init__(self):
        self.initdb, self.pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            tool_missing("Postgres is not installed (make test installs Debian's postgresql)")
        # Not under pytest's tmp_path: as root that is a 0700 folder the postgres user cannot
        # enter.
        self.folder = Path(tempfile.mkdtemp(prefix="memupdate-pg-"))
        self.port = free_port()
        self.url = f"postgresql://memupdate@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> "PostgresServer":
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        data, log = self.folder / "data", self.folder / "postgres.log"
        self._run(self.initdb, "-D", str(data), "-U", "memupdate", "--auth=trust", "-E", "UTF8")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off"
        self._run(self.pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self) -> None:
        data = self.folder / "data"
        if data.exists():
            try:
                self._run(self.pg_ctl, "-D", str(data), "-m", "immediate", "stop")
            except subprocess.CalledProcessError:
                pass  # not running
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
