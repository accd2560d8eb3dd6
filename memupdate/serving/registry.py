"""The adapter registry: knowledge bases with numbered, immutable adapter versions.

Layout under the registry root:  <kb>/v<N>/  (a peft adapter folder plus metadata.json). The
index (the versions, which one is live, and the recall probes of live versions, the last
PROBES_KEPT per knowledge base) is `registry.db` (SQLite) in the root, or Postgres when a
database URL is given: then the root is a volume every host mounts (NFS, a ReadWriteMany
volume), and the index is shared without file locking over the network.

A version folder is copied under a temporary name, fsynced and renamed into place before its row
is written, so a crash never leaves a half version that is listed; a folder without a row is
garbage, swept by `sweep()`. Rows hold paths relative to the root, so hosts may mount it at
different places. Version numbers are never reused, not even after a knowledge base is deleted
and made again: vLLM caches an adapter by name. Names are validated against a safe pattern:
nothing can escape the root.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from memupdate.database import DATABASE_ERRORS, Database
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
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (kb, version)
);
CREATE TABLE IF NOT EXISTS live (
    kb TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    since DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS retired (
    kb TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS probes (
    kb TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
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

    def held_facts(self) -> tuple[list[Fact], list[int]]:
        """(facts(), per fact the version whose adapter holds it): this one, unless it was
        trained with one adapter per update (metadata `held_by`, 0 standing for this one)."""
        facts = self.facts()
        held = self.metadata.get("held_by") or [0] * len(facts)
        return facts, [v or self.version for v in held]

    def older_adapters(self) -> list[int]:
        """The older versions whose adapters this one routes to (one adapter per update)."""
        return sorted({v for v in self.metadata.get("held_by", ()) if v not in (0, self.version)})


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


def fault_point(name: str) -> None:
    """Fault injection for the crash tests: MEMUPDATE_FAULT_PAUSE=NAME:SECONDS[,NAME:SECONDS]
    pauses at the named points (publish, serving_check), widening a window that is otherwise
    too short for a test to SIGKILL inside it."""
    for pause in os.environ.get("MEMUPDATE_FAULT_PAUSE", "").split(","):
        where, _, seconds = pause.partition(":")
        if where == name:
            time.sleep(float(seconds))


def weights_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    with open(folder / "adapter_model.safetensors", "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Registry:
    """`root`: the folder of adapter versions; `database`: a postgresql:// URL for the index
    (None: registry.db inside the root)."""

    def __init__(self, root: Path, database: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = Database(
            database or self.root / "registry.db", SCHEMA, "registry index", RegistryError
        )

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
            fault_point("publish")
            number = self._commit_version(kb, kb_dir, tmp, rank, sha, metadata)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RegistryError(f"cannot publish {kb}: {err}; nothing was published") from None
        except DATABASE_ERRORS:  # the index is unreachable: a worker retries the job later
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.version(kb, number)

    def _commit_version(self, kb, kb_dir: Path, tmp: Path, rank, sha, metadata) -> int:
        """Rename the staged folder into place and list it, atomically as far as readers see:
        a folder without a row is never listed (and is swept at the next start)."""
        final = None
        try:
            # One publisher numbers a knowledge base's versions at a time.
            with self.db.transaction(lock=f"memupdate-publish-{kb}") as db:
                row = db.execute(
                    "SELECT MAX(v) FROM (SELECT MAX(version) AS v FROM versions WHERE kb=? "
                    "UNION ALL SELECT last_version FROM retired WHERE kb=?) AS numbers",
                    (kb, kb),
                ).fetchone()
                number = (row[0] or 0) + 1
                final = kb_dir / f"v{number}"
                shutil.rmtree(final, ignore_errors=True)  # an unlisted leftover of a crash
                tmp.rename(final)
                db.execute(
                    "INSERT INTO versions VALUES (?,?,?,?,?,?,NULL,?)",
                    (kb, number, f"{kb}/v{number}", rank, sha, json.dumps(metadata), time.time()),
                )
        except BaseException:
            if final is not None and final.exists() and not tmp.exists():
                shutil.rmtree(final, ignore_errors=True)  # renamed, never listed
            raise
        return number

    def record_serving(self, kb: str, version: int, serving: dict) -> None:
        self.db.execute(
            "UPDATE versions SET serving=? WHERE kb=? AND version=?",
            (json.dumps(serving), kb, version),
        )

    def set_live(self, kb: str, version: int) -> None:
        self.version(kb, version)  # raises if unknown
        self.db.execute(
            "INSERT INTO live VALUES (?,?,?) "
            "ON CONFLICT (kb) DO UPDATE SET version=excluded.version, since=excluded.since",
            (kb, version, time.time()),
        )

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
        with self.db.transaction(lock=f"memupdate-publish-{kb}") as db:
            db.execute(  # the numbers stay taken: a new base of the same name goes on from here
                "INSERT INTO retired SELECT kb, MAX(version) FROM versions WHERE kb=? GROUP BY kb "
                "ON CONFLICT (kb) DO UPDATE SET last_version=excluded.last_version",
                (kb,),
            )
            db.execute("DELETE FROM live WHERE kb=?", (kb,))
            db.execute("DELETE FROM versions WHERE kb=?", (kb,))
            db.execute("DELETE FROM probes WHERE kb=?", (kb,))
        shutil.rmtree(self.root / kb, ignore_errors=True)

    def record_probe(self, kb: str, ok: bool, data: dict) -> None:
        """Append a recall probe (`ok`: serving answered); older ones beyond PROBES_KEPT go."""
        with self.db.transaction(lock=f"memupdate-probes-{kb}") as db:
            db.execute(
                "INSERT INTO probes VALUES (?,?,?,?)", (kb, time.time(), int(ok), json.dumps(data))
            )
            db.execute(
                "DELETE FROM probes WHERE kb=? AND at < (SELECT at FROM probes WHERE kb=? "
                "ORDER BY at DESC LIMIT 1 OFFSET ?)",
                (kb, kb, PROBES_KEPT - 1),
            )

    def last_probe(self, kb: str, only_ok: bool = False) -> tuple[float, dict] | None:
        """(time, data) of the newest probe, or of the newest one that reached serving."""
        sql = "SELECT at, data FROM probes WHERE kb=?" + (" AND ok=1" if only_ok else "")
        rows = self.db.query(sql + " ORDER BY at DESC LIMIT 1", (kb,))
        return (rows[0][0], json.loads(rows[0][1])) if rows else None

    def sweep(self, min_age_s: float = 0.0) -> list[Path]:
        """Remove folders no row points at (left by a crash mid-publish) that are older than
        `min_age_s`: on a shared volume, a younger one may be a publish in progress on another
        host."""
        listed = {Path(v.path) for kb in self.knowledge_bases() for v in self.versions(kb)}
        removed = []
        for kb_dir in (p for p in self.root.iterdir() if p.is_dir()):
            for folder in kb_dir.iterdir():
                try:  # another host may rename or remove it meanwhile
                    too_young = time.time() - folder.stat().st_mtime < min_age_s
                except FileNotFoundError:
                    continue
                if folder.is_dir() and folder not in listed and not too_young:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
        return removed

    # --- reading -----------------------------------------------------------------------
    def _row(self, row) -> Version:
        return Version(
            row[0],
            row[1],
            self.root / row[2],  # relative (absolute in registries made before 2026-12)
            row[3],
            row[4],
            json.loads(row[5]),
            json.loads(row[6]) if row[6] else None,
            row[7],
        )

    def versions(self, kb: str) -> list[Version]:
        validate_name(kb)
        rows = self.db.query("SELECT * FROM versions WHERE kb=? ORDER BY version", (kb,))
        return [self._row(r) for r in rows]

    def version(self, kb: str, version: int) -> Version:
        validate_name(kb)
        rows = self.db.query("SELECT * FROM versions WHERE kb=? AND version=?", (kb, version))
        if not rows:
            raise RegistryError(f"knowledge base {kb!r} has no version {version}")
        return self._row(rows[0])

    def live(self, kb: str) -> Version | None:
        validate_name(kb)
        rows = self.db.query("SELECT version FROM live WHERE kb=?", (kb,))
        return self.version(kb, rows[0][0]) if rows else None

    def knowledge_bases(self) -> list[str]:
        return [r[0] for r in self.db.query("SELECT DISTINCT kb FROM versions ORDER BY kb")]

    def version_of_job(self, kb: str, job_id: str) -> Version | None:
        """The version a job published, if it got that far (a retried job goes on from it)."""
        found = [v for v in self.versions(kb) if v.metadata.get("job_id") == job_id]
        return found[-1] if found else None
