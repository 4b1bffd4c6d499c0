"""Engine and sessions: SQLite (WAL, durable) by default, PostgreSQL by URL.

Two kinds of session:

* :meth:`Database.read` for queries;
* :meth:`Database.write` for changes. On SQLite it starts with ``BEGIN IMMEDIATE``
  so that concurrent writers queue on the busy timeout instead of failing with
  "database is locked" when a read lock cannot be upgraded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from dicomnode.errors import DicomNodeError

log = logging.getLogger(__name__)

_MIGRATIONS_DIR = Path(__file__).with_name("migrations")
#: pg_advisory_lock key used while migrating, so that hosts starting together queue.
_MIGRATION_LOCK_KEY = 0x6469636F  # "dico"


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own handling
    # of transactions defers the write lock, which leads to SQLITE_BUSY).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed transaction survives a power cut, not only a process crash.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()


def _sqlite_on_begin(conn: Any) -> None:
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


class PreparedStatement:
    """A Core statement compiled once for a dialect and run straight on a DBAPI cursor.

    For the few statements the receive path runs per instance, SQLAlchemy's execution
    machinery (session, compiled-cache lookup, parameter and result objects) costs
    several times what SQLite itself does. The SQL text is still SQLAlchemy's, and every
    value passes through its column type's own bind and result processors (e.g.
    :class:`~dicomnode.db.models.UTCDateTime`), so rows are stored and read back exactly
    as the ORM stores and reads them.
    """

    def __init__(
        self, statement: ClauseElement, dialect: Dialect, column_keys: list[str] | None = None
    ) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=column_keys))
        self.sql = str(compiled)
        self._compiled = compiled
        self._order = tuple(compiled.positiontup or ()) if compiled.positional else None
        self._bind = {
            name: bind.type.dialect_impl(dialect).bind_processor(dialect)
            for name, bind in compiled.binds.items()
        }
        columns = getattr(statement, "selected_columns", ())
        self._result = tuple(
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
        )

    def execute(self, cursor: Any, values: dict[str, Any]) -> Any:
        """Run with ``values`` (by bind or column name); the cursor, for fetching."""
        params = self._compiled.construct_params(values) or {}
        for name, process in self._bind.items():
            if process is not None and params.get(name) is not None:
                params[name] = process(params[name])
        cursor.execute(
            self.sql, tuple(params[n] for n in self._order) if self._order is not None else params
        )
        return cursor

    def first(self, cursor: Any, values: dict[str, Any]) -> tuple[Any, ...] | None:
        """The first row of a SELECT, each value through its column's result processor."""
        row = self.execute(cursor, values).fetchone()
        if row is None:
            return None
        return tuple(
            process(value) if process is not None else value
            for process, value in zip(self._result, row, strict=True)
        )


class Database:
    """A database URL made usable: an engine, sessions and migrations."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # A small pool of long-lived connections: opening one costs several PRAGMAs.
            self.engine: Engine = create_engine(
                url,
                echo=echo,
                pool_size=8,
                max_overflow=8,
                connect_args={"timeout": 60, "check_same_thread": False},
            )
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
            write_engine: Engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        else:
            self.engine = create_engine(url, echo=echo, pool_pre_ping=True, pool_size=5)
            write_engine = self.engine
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(write_engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for queries. Closing it ends its transaction; loaded objects stay usable."""
        with self._read() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits when the block ends without an exception."""
        with self._write() as session, session.begin():
            yield session

    @contextmanager
    def write_cursor(self) -> Iterator[Any]:
        """A DBAPI cursor in a write transaction, for :class:`PreparedStatement`.

        On SQLite the transaction starts with ``BEGIN IMMEDIATE`` (as :meth:`write`);
        it commits when the block ends without an exception and rolls back otherwise.
        """
        connection = self.engine.raw_connection()
        try:
            cursor = connection.cursor()
            if self.is_sqlite:
                cursor.execute("BEGIN IMMEDIATE")
            try:
                yield cursor
            except BaseException:
                connection.rollback()
                raise
            connection.commit()
        finally:
            connection.close()

    def schema_revisions(self) -> tuple[set[str], set[str]]:
        """(the database's Alembic revisions, the newest this code has); reads only."""
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        newest = set(ScriptDirectory(str(_MIGRATIONS_DIR)).get_heads())
        with self.engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
        return current, newest

    def require_current_schema(self) -> None:
        """Raise :class:`DicomNodeError` unless the schema is the newest (never migrates).

        For commands that only read or make small changes (``status``, ``requeue``):
        an upgrade is an admin's decision (``dicomnode db upgrade``, or ``serve``).
        """
        current, newest = self.schema_revisions()
        if current == newest:
            return
        where = make_url(self.url).render_as_string(hide_password=True)
        if not current:
            raise DicomNodeError(
                f"the database {where} has no dicomnode schema yet: run `dicomnode db upgrade` "
                "(or start `dicomnode serve`, which creates it)"
            )
        if current - newest and not self._known(current):
            raise DicomNodeError(
                f"the database {where} is at schema revision {', '.join(sorted(current))}, "
                f"which this dicomnode does not know (its newest is {', '.join(sorted(newest))}): "
                "it was upgraded by a newer dicomnode; use that version"
            )
        raise DicomNodeError(
            f"the database {where} is at schema revision {', '.join(sorted(current))}; this "
            f"dicomnode needs {', '.join(sorted(newest))}: run `dicomnode db upgrade` first "
            "(this command does not change the schema)"
        )

    @staticmethod
    def _known(revisions: set[str]) -> bool:
        from alembic.script import ScriptDirectory

        script = ScriptDirectory(str(_MIGRATIONS_DIR))
        known = {rev.revision for rev in script.walk_revisions()}
        return revisions <= known

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (safe to call from many hosts)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS_DIR))
        with self.engine.connect() as connection:
            if not self.is_sqlite:
                connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
                connection.commit()
            try:
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                connection.commit()
            finally:
                if not self.is_sqlite:
                    connection.execute(
                        text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK_KEY}
                    )
                    connection.commit()

    def dispose(self) -> None:
        """Close pooled connections (call in a child process after fork)."""
        self.engine.dispose()
