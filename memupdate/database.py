"""SQLite, the way memupdate uses it: WAL (readers never block the writer), full fsync on
commit (a committed job or version survives power loss), and a start-up check that turns a
locked or damaged file into an error that says what to do, instead of silent data loss."""

import sqlite3
from contextlib import closing
from pathlib import Path


def connect(path: Path, timeout_s: float) -> sqlite3.Connection:
    """Autocommit connection (transactions are explicit BEGIN IMMEDIATE ... COMMIT)."""
    db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def check_database(path: Path, schema: str, what: str, error: type[Exception]) -> None:
    """Open (creating the schema) and integrity-check a SQLite database at start-up; raise
    `error` saying what to do when it is locked or damaged. Nothing is changed then."""
    try:
        with closing(connect(path, timeout_s=10)) as db:
            db.executescript(schema)
            problems = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
            db.execute("BEGIN IMMEDIATE")  # can we write? (another writer holds the lock)
            db.execute("ROLLBACK")
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            raise error(
                f"the {what} {path} is locked by another process (another memupdate serve on the "
                f"same data directory?); stop it or use another --data-dir"
            ) from None
        raise error(f"cannot open the {what} {path}: {err}") from None
    except sqlite3.DatabaseError as err:
        problems = [str(err)]
    if problems != ["ok"]:
        raise error(
            f"the {what} {path} is damaged ({'; '.join(problems[:3])}): move it aside and "
            f"restore it from a backup; nothing was changed"
        )
