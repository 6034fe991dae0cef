"""Engines for the three seed databases.

One `AsyncEngine` per database (``core``, ``platform``, ``analytics``), built from a SQLAlchemy URL.
Every connection runs in UTC: MySQL/MariaDB ``TIMESTAMP`` values are converted through the session
time zone, so we pin it to ``+00:00`` and store naive UTC datetimes everywhere. SQLite gets WAL,
foreign keys and a busy timeout, which is what makes it a fair embedded default.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL, Row, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql import Executable

from accountd.errors import DatabaseUnavailable

DATABASE_KEYS: tuple[str, ...] = ("core", "platform", "analytics")
# Connections kept for admin reads (accountctl's show runs two reads at once; a second show or a
# history beside it), and at most as many again under load.
READ_POOL_SIZE = 3


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Connection pool sizing (ignored for SQLite, which uses one connection per file)."""

    size: int = 10
    max_overflow: int = 10
    timeout: float = 10.0
    recycle: float = 3600.0
    connect_timeout: float = 5.0


# Every MySQL/MariaDB session of ours. UTC for TIMESTAMP conversion; strict mode so a bad ENUM
# value is an error, not ''; room for the heartbeat poll's packed page
# (loader.heartbeats_packed_statement: ~60 bytes a row; MySQL's default is 1 KiB, MariaDB's
# 1 MiB). NO_BACKSLASH_ESCAPES: a backslash in a string literal is just a backslash (standard
# SQL), so the driver quotes a value by doubling its single quotes, one C call, instead of
# pymysql's per-character `str.translate`: a mass event binds four or five strings per account
# (ids, reasons), and the translate was 4 % of the event loop (py-spy, 2026-12-04). The driver
# reads the mode from the server's status flags and SQLAlchemy from the session, so both quote
# for it; no SQL text of ours holds a backslash escape.
MYSQL_SESSION = (
    "SET time_zone = '+00:00', "
    "sql_mode = CONCAT(@@sql_mode, ',STRICT_TRANS_TABLES,NO_BACKSLASH_ESCAPES'), "
    "group_concat_max_len = 4194304"
)


def safe_url(url: str | URL) -> str:
    """The URL with its password masked: the only form a URL may take in logs and errors."""
    return make_url(url).render_as_string(hide_password=True)


def is_sqlite(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # aiosqlite's adapter exposes a sync-looking cursor; these pragmas are per connection.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(
    url: str | URL, pool: PoolSettings | None = None, *, reads: bool = False
) -> AsyncEngine:
    """Build the async engine for one database URL.

    ``reads=True`` (MySQL/MariaDB): a small pool for the control API's reads (`fetch_all`),
    in autocommit mode and without the pre-ping. A checkout with pre-ping costs a round trip
    before the query, and the return to the pool another (the rollback): three per read, and
    `accountctl show` makes two reads. Without the ping, and with autocommit (each SELECT
    its own transaction, so there is nothing to roll back and the rollback is skipped), a
    read is one round trip. A connection the server closed meanwhile fails once, is
    discarded, and `fetch_all` retries on a fresh one.
    """
    pool = pool or PoolSettings()
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        if u.database and u.database != ":memory:":
            from pathlib import Path

            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(u, pool_pre_ping=False)
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        return engine
    if backend == "mysql":
        connect_args: dict[str, Any] = {
            "init_command": MYSQL_SESSION,
            "connect_timeout": pool.connect_timeout,
            "charset": "utf8mb4",
        }
        return create_async_engine(
            u,
            pool_size=min(pool.size, READ_POOL_SIZE) if reads else pool.size,
            max_overflow=min(pool.max_overflow, READ_POOL_SIZE) if reads else pool.max_overflow,
            pool_timeout=pool.timeout,
            pool_recycle=int(pool.recycle),
            pool_pre_ping=not reads,
            # Our writes lock exactly the rows they change (SELECT … FOR UPDATE by primary key);
            # REPEATABLE READ would add gap locks that deadlock against other services'
            # INSERTs of new accounts and against the heartbeat flush.
            isolation_level="AUTOCOMMIT" if reads else "READ COMMITTED",
            skip_autocommit_rollback=reads,
            connect_args=connect_args,
        )
    raise ValueError(f"unsupported database backend {backend!r} in {safe_url(u)}")


class Databases:
    """The three engines, opened together and disposed together."""

    def __init__(self, urls: Mapping[str, str | URL], pool: PoolSettings | None = None) -> None:
        missing = [k for k in DATABASE_KEYS if k not in urls]
        if missing:
            raise ValueError(f"missing database URL(s): {', '.join(missing)}")
        self.urls = {k: make_url(urls[k]) for k in DATABASE_KEYS}
        self._pool = pool
        self.engines: dict[str, AsyncEngine] = {
            k: make_engine(self.urls[k], pool) for k in DATABASE_KEYS
        }
        # Admin reads (accountctl show, history) of the platform database; SQLite needs no
        # second pool: its "round trips" are calls into a thread.
        platform = self.urls["platform"]
        self._platform_reads: AsyncEngine | None = (
            None if is_sqlite(platform) else make_engine(platform, pool, reads=True)
        )

    @property
    def platform_reads(self) -> AsyncEngine:
        """The engine for admin reads of the platform database (see `make_engine`)."""
        return self._platform_reads or self.engines["platform"]

    def read_engine(self) -> AsyncEngine:
        """A new engine for admin reads of the platform database, to be created, used and
        disposed on another event loop (the side loop, `accountd.daemon.side_loop`): an
        engine's connections belong to the loop that opened them."""
        return make_engine(self.urls["platform"], self._pool, reads=True)

    @property
    def core(self) -> AsyncEngine:
        return self.engines["core"]

    @property
    def platform(self) -> AsyncEngine:
        return self.engines["platform"]

    @property
    def analytics(self) -> AsyncEngine:
        return self.engines["analytics"]

    def dialect(self, key: str) -> str:
        return self.engines[key].dialect.name

    async def ping(self, key: str) -> None:
        """Run ``SELECT 1``; raise `DatabaseUnavailable` with a password-free message."""
        await ensure_reachable(key, self.engines[key])

    async def check_all(self) -> None:
        for key in DATABASE_KEYS:
            await self.ping(key)

    async def dispose(self) -> None:
        for engine in self.engines.values():
            await engine.dispose()
        if self._platform_reads is not None:
            await self._platform_reads.dispose()


async def fetch_all(engine: AsyncEngine, stmt: Executable) -> Sequence[Row[Any]]:
    """Run one read and return its rows; a connection found dead is retried once.

    For engines without pre-ping (`make_engine(reads=True)`): a pooled connection the server
    closed (a restart, ``wait_timeout``) raises with ``connection_invalidated`` set, and
    SQLAlchemy has then discarded it and every other connection of that pool.
    """
    for attempt in (1, 2):
        try:
            async with engine.connect() as conn:
                return (await conn.execute(stmt)).all()
        except DBAPIError as exc:
            if attempt == 2 or not exc.connection_invalidated:
                raise
    raise AssertionError("unreachable")


async def ensure_reachable(key: str, engine: AsyncEngine) -> None:
    """``SELECT 1`` on ``engine``; a failure becomes `DatabaseUnavailable` naming ``key``."""
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except (OperationalError, DBAPIError, OSError) as exc:
        raise DatabaseUnavailable(key, _describe(exc, engine.url)) from exc


def _describe(exc: BaseException, url: URL) -> str:
    orig = getattr(exc, "orig", None) or exc
    detail = str(orig).splitlines()[0] if str(orig) else type(orig).__name__
    if url.password:
        detail = detail.replace(str(url.password), "***")
    return f"{safe_url(url)}: {detail}"


@contextlib.asynccontextmanager
async def open_databases(
    urls: Mapping[str, str | URL], pool: PoolSettings | None = None
) -> AsyncIterator[Databases]:
    dbs = Databases(urls, pool)
    try:
        yield dbs
    finally:
        await dbs.dispose()
