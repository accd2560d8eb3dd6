"""The adapter registry: knowledge bases with numbered, immutable adapter versions.

Layout under the registry root:  <kb>/v<N>/  (a peft adapter folder plus metadata.json), and
`registry.db` (SQLite, WAL) holding the versions, which one is live, and the recall probes of
live versions (the last PROBES_KEPT per knowledge base). A version folder is
copied under a temporary name and renamed into place before its row is written, so a crash
never leaves a half version that is listed; a folder without a row is garbage, swept by
`sweep()`. Names are validated against a safe pattern: nothing can escape the root.
"""

import hashlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from memupdate.database import check_database, connect
from memupdate.memory.facts import Fact, load_facts, write_facts

FACTS_FILE = "facts.jsonl"
PROBES_KEPT = 1000
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    kb TEXT NOT NULL,
    version INTEGER NOT NULL,
    path TEXT NOT NULL,
    rank INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    metadata TEXT NOT NULL,
    serving TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (kb, version)
);
CREATE TABLE IF NOT EXISTS live (
    kb TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS probes (
    kb TEXT NOT NULL,
    at REAL NOT NULL,
    ok INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS probes_by_kb ON probes (kb, ok, at);
"""


class RegistryError(ValueError):
    """Bad name, unknown knowledge base or version, or an adapter folder that is not one."""


@dataclass(frozen=True)
class Version:
    kb: str
    version: int
    path: Path
    rank: int
    sha256: str
    metadata: dict
    serving: dict | None  # recall measured through serving, once verified
    created_at: float

    @property
    def target_fact_recall(self) -> float:
        """The fact recall this version had to reach through serving (1.0 if not recorded)."""
        return self.metadata.get("target_fact_recall", 1.0)

    def facts(self) -> list[Fact]:
        return load_facts(self.path / FACTS_FILE) if (self.path / FACTS_FILE).exists() else []


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise RegistryError(
            f"invalid knowledge base name {name!r}: use 1-63 lowercase letters, digits, '-' or "
            "'_', starting with a letter or digit"
        )
    return name


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault_point(name: str) -> None:
    """Fault injection for the crash tests: MEMUPDATE_FAULT_PAUSE=publish:SECONDS pauses here,
    widening a window that is otherwise milliseconds so that a test can SIGKILL inside it."""
    where, _, seconds = os.environ.get("MEMUPDATE_FAULT_PAUSE", "").partition(":")
    if where == name:
        time.sleep(float(seconds))


def weights_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    with open(folder / "adapter_model.safetensors", "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Registry:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "registry.db"
        check_database(self.db_path, SCHEMA, "registry database", RegistryError)

    def _connect(self) -> sqlite3.Connection:
        return connect(self.db_path, timeout_s=30)

    # --- writing -----------------------------------------------------------------------
    def publish(
        self, kb: str, adapter_dir: Path, metadata: dict, facts: list[Fact] | None = None
    ) -> Version:
        """Copy a trained adapter in as the knowledge base's next version (not live yet), with
        the facts it holds (facts.jsonl: what probes and later updates start from)."""
        validate_name(kb)
        adapter_dir = Path(adapter_dir)
        for required in ("adapter_config.json", "adapter_model.safetensors"):
            if not (adapter_dir / required).is_file():
                raise RegistryError(f"{adapter_dir} is not a peft adapter folder (no {required})")
        try:
            rank = int(json.loads((adapter_dir / "adapter_config.json").read_text())["r"])
        except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
            raise RegistryError(f"{adapter_dir}: unreadable adapter_config.json ({err})") from None
        try:
            kb_dir = self.root / kb
            kb_dir.mkdir(exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=kb_dir, prefix=".incoming-"))
        except OSError as err:
            raise RegistryError(f"cannot publish {kb}: {err}; nothing was published") from None
        try:
            shutil.copytree(adapter_dir, tmp, dirs_exist_ok=True)
            if facts is not None:
                write_facts(facts, tmp / FACTS_FILE)
            sha = weights_sha256(tmp)
            (tmp / "metadata.json").write_text(json.dumps({**metadata, "sha256": sha}, indent=2))
            _fsync_tree(tmp)  # the files are on disk before any row points at them
            _fault_point("publish")
            number = self._commit_version(kb, kb_dir, tmp, rank, sha, metadata)
        except (OSError, sqlite3.Error) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RegistryError(f"cannot publish {kb}: {err}; nothing was published") from None
        return self.version(kb, number)

    def _commit_version(self, kb, kb_dir: Path, tmp: Path, rank, sha, metadata) -> int:
        """Rename the staged folder into place and list it, atomically as far as readers see:
        a folder without a row is never listed (and is swept at the next start)."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")  # one publisher numbers versions at a time
            final = None
            try:
                row = db.execute("SELECT MAX(version) FROM versions WHERE kb=?", (kb,)).fetchone()
                number = (row[0] or 0) + 1
                final = kb_dir / f"v{number}"
                shutil.rmtree(final, ignore_errors=True)  # an unlisted leftover of a crash
                tmp.rename(final)
                db.execute(
                    "INSERT INTO versions VALUES (?,?,?,?,?,?,NULL,?)",
                    (kb, number, str(final), rank, sha, json.dumps(metadata), time.time()),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                if final is not None and final.exists() and not tmp.exists():
                    shutil.rmtree(final, ignore_errors=True)  # renamed, never listed
                raise
        return number

    def record_serving(self, kb: str, version: int, serving: dict) -> None:
        with closing(self._connect()) as db:
            db.execute(
                "UPDATE versions SET serving=? WHERE kb=? AND version=?",
                (json.dumps(serving), kb, version),
            )

    def set_live(self, kb: str, version: int) -> None:
        self.version(kb, version)  # raises if unknown
        with closing(self._connect()) as db:
            db.execute("INSERT OR REPLACE INTO live VALUES (?,?,?)", (kb, version, time.time()))

    def rollback(self, kb: str) -> Version:
        """Make the newest verified version older than the live one live again."""
        live = self.live(kb)
        if live is None:
            raise RegistryError(f"knowledge base {kb!r} has no live version to roll back from")
        older = [v for v in self.versions(kb) if v.version < live.version and v.serving]
        if not older:
            raise RegistryError(f"knowledge base {kb!r} has no earlier verified version")
        self.set_live(kb, older[-1].version)
        return older[-1]

    def delete(self, kb: str) -> None:
        validate_name(kb)
        if not self.versions(kb):
            raise RegistryError(f"unknown knowledge base {kb!r}")
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM live WHERE kb=?", (kb,))
            db.execute("DELETE FROM versions WHERE kb=?", (kb,))
            db.execute("DELETE FROM probes WHERE kb=?", (kb,))
            db.execute("COMMIT")
        shutil.rmtree(self.root / kb, ignore_errors=True)

    def record_probe(self, kb: str, ok: bool, data: dict) -> None:
        """Append a recall probe (`ok`: serving answered); older ones beyond PROBES_KEPT go."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT INTO probes VALUES (?,?,?,?)", (kb, time.time(), int(ok), json.dumps(data))
            )
            db.execute(
                "DELETE FROM probes WHERE kb=? AND rowid NOT IN "
                "(SELECT rowid FROM probes WHERE kb=? ORDER BY at DESC LIMIT ?)",
                (kb, kb, PROBES_KEPT),
            )
            db.execute("COMMIT")

    def last_probe(self, kb: str, only_ok: bool = False) -> tuple[float, dict] | None:
        """(time, data) of the newest probe, or of the newest one that reached serving."""
        sql = "SELECT at, data FROM probes WHERE kb=?" + (" AND ok=1" if only_ok else "")
        with closing(self._connect()) as db:
            row = db.execute(sql + " ORDER BY at DESC LIMIT 1", (kb,)).fetchone()
        return (row[0], json.loads(row[1])) if row else None

    def sweep(self) -> list[Path]:
        """Remove folders no row points at (left by a crash mid-publish)."""
        listed = {Path(v.path) for kb in self.knowledge_bases() for v in self.versions(kb)}
        removed = []
        for kb_dir in (p for p in self.root.iterdir() if p.is_dir()):
            for folder in kb_dir.iterdir():
                if folder.is_dir() and folder not in listed:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
        return removed

    # --- reading -----------------------------------------------------------------------
    def _row(self, row) -> Version:
        return Version(
            row[0],
            row[1],
            Path(row[2]),
            row[3],
            row[4],
            json.loads(row[5]),
            json.loads(row[6]) if row[6] else None,
            row[7],
        )

    def versions(self, kb: str) -> list[Version]:
        validate_name(kb)
        with closing(self._connect()) as db:
            rows = db.execute("SELECT * FROM versions WHERE kb=? ORDER BY version", (kb,))
            return [self._row(r) for r in rows.fetchall()]

    def version(self, kb: str, version: int) -> Version:
        validate_name(kb)
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT * FROM versions WHERE kb=? AND version=?", (kb, version)
            ).fetchone()
        if row is None:
            raise RegistryError(f"knowledge base {kb!r} has no version {version}")
        return self._row(row)

    def live(self, kb: str) -> Version | None:
        validate_name(kb)
        with closing(self._connect()) as db:
            row = db.execute("SELECT version FROM live WHERE kb=?", (kb,)).fetchone()
        return self.version(kb, row[0]) if row else None

    def knowledge_bases(self) -> list[str]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT DISTINCT kb FROM versions ORDER BY kb").fetchall()
        return [r[0] for r in rows]
