import os
from pathlib import Path

import pytest
import torch

# Tests share one model cache (the default model is converted once, ~20 s); `make test` points
# it at the repository's ignored .memupdate-home. Anything else a test writes goes to tmp_path.
os.environ.setdefault(
    "MEMUPDATE_HOME", str(Path(__file__).resolve().parents[1] / ".memupdate-home")
)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_dir():
    from memupdate.memory.tiny_model import prepare_tiny_model

    return prepare_tiny_model()


@pytest.fixture()
def tiny(tiny_dir):
    """A fresh tiny model per test (training wraps it in place)."""
    from memupdate.memory.base_model import load_model

    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def default_dir():
    from memupdate.memory.base_model import prepare_default_model

    return prepare_default_model()


@pytest.fixture()
def default(default_dir):
    from memupdate.memory.base_model import load_model

    return load_model(default_dir)


@pytest.fixture(scope="session")
def postgres():
    """One real Postgres server for the session (tests/postgres_server.py)."""
    from postgres_server import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture()
def postgres_url(postgres):
    """A fresh, empty database on the session's server."""
    import uuid

    import psycopg

    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"
