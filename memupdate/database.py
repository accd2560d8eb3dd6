"""Where memupdate keeps its state: SQLite (the embedded default, a file) or Postgres (a URL,
shared by servers and workers on many hosts), behind one small interface.

The SQL is written once: `?` placeholders (turned into `%s` for Postgres) and types both engines
read (TEXT, BIGINT, DOUBLE PRECISION). SQLite runs in WAL mode (readers never block the writer)
with a full fsync on commit (a committed job or version survives power loss); a transaction takes
the write lock at BEGIN. On Postgres a transaction can take a named advisory lock, which
serialises what SQLite's single writer serialises by itself (numbering versions, events).
"""

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import psycopg
import psycopg_pool

# What a database call can raise when the database itself fails (disk full, server gone).
DATABASE_ERRORS = (sqlite3.Error, psycopg.Error, psycopg_pool.PoolTimeout)

_pools: dict[str, psycopg_pool.ConnectionPool] = {}  # one pool per URL and process
_pools_lock = threading.Lock()


def is_postgres(where) -> bool:
    return str(where).startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    info.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in info.items())


def connect(path: Path, timeout_s: float) -> sqlite3.Connection:
    """Autocommit SQLite connection (transactions are explicit BEGIN IMMEDIATE ... COMMIT)."""
    db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


class _Postgres:
    """A psycopg connection that takes the `?` placeholders of the shared SQL."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def execute(self, sql: str, args=()):
        return self.conn.execute(sql.replace("?", "%s"), args or None)


class Database:
    """A SQLite file or a Postgres URL holding `schema`; `what` names it in errors, which are
    raised as `error` with a message that says what to do."""

    def __init__(self, where: str | Path, schema: str, what: str, error: type[Exception]):
        self.postgres = is_postgres(where)
        self.where = str(where) if self.postgres else Path(where)
        self.what, self.error = what, error
        self.check(schema)

    def __str__(self) -> str:
        return redact(self.where) if self.postgres else str(self.where)

    @contextmanager
    def connection(self) -> Iterator:
        if not self.postgres:
            with closing(connect(self.where, timeout_s=30)) as db:
                yield db
            return
        with _pool(self.where).connection() as conn:
            yield _Postgres(conn)

    @contextmanager
    def transaction(self, lock: str = "") -> Iterator:
        """A write transaction. SQLite takes its one write lock at BEGIN; on Postgres, `lock`
        names an advisory lock held until the end (writers with the same name wait)."""
        with self.connection() as db:
            db.execute("BEGIN" if self.postgres else "BEGIN IMMEDIATE")
            try:
                if lock:
                    self.lock(db, lock)
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def lock(self, db, name: str) -> None:
        """Inside a transaction: hold the advisory lock `name` to its end (Postgres; SQLite's
        transaction already holds the one write lock)."""
        if self.postgres:
            db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (name,))

    def query(self, sql: str, args=()) -> list[tuple]:
        with self.connection() as db:
            return db.execute(sql, args).fetchall()

    def execute(self, sql: str, args=()) -> int:
        """One statement in its own transaction; the number of rows it changed."""
        with self.connection() as db:
            return db.execute(sql, args).rowcount

    def add_missing_columns(self, table: str, columns: dict[str, str]) -> None:
        """Columns added after a table first shipped (CREATE TABLE IF NOT EXISTS keeps old ones).
        Only SQLite files can be that old: Postgres stores were made with every column."""
        if self.postgres:
            return
        present = {row[1] for row in self.query(f"PRAGMA table_info({table})")}
        for name, declaration in columns.items():
            if name not in present:
                self.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    def check(self, schema: str) -> None:
        """Create the schema and check that the database can be written; raise `error` saying
        what to do when it is unreachable, locked or damaged. Nothing is changed then."""
        if self.postgres:
            try:  # a connection of its own: an unreachable server fails in seconds, not minutes
                with psycopg.connect(self.where, autocommit=True, connect_timeout=10) as conn:
                    with conn.transaction():  # one creator at a time
                        conn.execute("SELECT pg_advisory_xact_lock(hashtext('memupdate-schema'))")
                        conn.execute(schema)
            except psycopg.Error as err:
                raise self.error(f"cannot use the {self.what} at {self}: {err}") from None
            return
        try:
            with closing(connect(self.where, timeout_s=10)) as db:
                db.executescript(schema)
                problems = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
                db.execute("BEGIN IMMEDIATE")  # can we write? (another writer holds the lock)
                db.execute("ROLLBACK")
        except sqlite3.OperationalError as err:
            if "locked" in str(err):
                raise self.error(
                    f"the {self.what} {self} is locked by another process (another memupdate "
                    f"serve on the same data directory?); stop it or use another --data-dir"
                ) from None
            raise self.error(f"cannot open the {self.what} {self}: {err}") from None
        except sqlite3.DatabaseError as err:
            problems = [str(err)]
        if problems != ["ok"]:
            raise self.error(
                f"the {self.what} {self} is damaged ({'; '.join(problems[:3])}): move it aside "
                f"and restore it from a backup; nothing was changed"
            )


def _pool(url: str) -> psycopg_pool.ConnectionPool:
    with _pools_lock:
        if url not in _pools:
            _pools[url] = psycopg_pool.ConnectionPool(
                url,
                min_size=1,
                max_size=16,
                kwargs={"autocommit": True},
                timeout=30,
                open=True,
                name="memupdate",
            )
        return _pools[url]
