"""The outbox: ordered, retried cross-database writes, on real databases.

"The database is down" is real here: on MariaDB the outbox talks to it through a loopback TCP
forwarder that refuses connections until the test opens it; on SQLite another connection holds
the write lock (``BEGIN EXCLUSIVE``) until the test commits it. Both make the driver fail the way
an outage does (connection refused / "database is locked").

This module also holds those two helpers for ``tests/test_alerts.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from accountd.adapters.db import Databases, is_sqlite, make_engine
from accountd.adapters.schema import performance_stats, system_alerts
from accountd.daemon.outbox import Outbox
from accountd.ids import uuid7

# ------------------------------------------------------------------------- an outage, for real


class Forwarder:
    """A loopback TCP port that refuses connections until `open`, then forwards to a server."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._pipes):
            task.cancel()
        for task in list(self._pipes):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        pipes = [
            asyncio.create_task(_pipe(reader, up_writer)),
            asyncio.create_task(_pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._pipes.difference_update(pipes)
            for w in (writer, up_writer):
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


class Outage:
    """One database made unavailable, then available again (``restore``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine
        self._forwarder: Forwarder | None = None
        self._lock: sqlite3.Connection | None = None

    async def __aenter__(self) -> Outage:
        u = make_url(self.url)
        if is_sqlite(u):
            self.engine = make_engine(u)
            # Fail fast instead of waiting out the engine's 10 s busy timeout on every retry.
            event.listen(self.engine.sync_engine, "connect", _short_busy_timeout)
            self._lock = sqlite3.connect(str(u.database), isolation_level=None)
            self._lock.execute("BEGIN EXCLUSIVE")
        else:
            self._forwarder = Forwarder(u.host or "127.0.0.1", u.port or 3306)
            self.engine = make_engine(u.set(host="127.0.0.1", port=self._forwarder.port))
        return self

    async def restore(self) -> None:
        if self._lock is not None:
            self._lock.commit()
            self._lock.close()
            self._lock = None
        if self._forwarder is not None:
            await self._forwarder.open()

    async def __aexit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.close()
        await self.engine.dispose()
        if self._forwarder is not None:
            await self._forwarder.close()


def _short_busy_timeout(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=100")
    cur.close()


async def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture
async def dbs(migrated_urls: dict[str, str]) -> AsyncIterator[Databases]:
    d = Databases(migrated_urls)
    try:
        yield d
    finally:
        await d.dispose()


@contextlib.asynccontextmanager
async def running(outbox: Outbox) -> AsyncIterator[Outbox]:
    await outbox.start()
    try:
        yield outbox
    finally:
        await outbox.stop(grace=5.0)


def stat_row(name: str, day: int = 1, row_id: str | None = None) -> dict[str, Any]:
    import datetime as dt

    return {
        "id": row_id or uuid7(),
        "stat_date": dt.date(2025, 1, day),
        "tenant_id": "t1",
        "metric_name": name,
        "metric_value": 1,
    }


def _raw_insert(row: dict[str, Any]) -> Any:
    """An insert that bypasses SQLAlchemy's own Enum check, so the database is what refuses."""
    cols = ", ".join(row)
    params = ", ".join(f":{c}" for c in row)

    async def write(conn: AsyncConnection) -> None:
        await conn.execute(text(f"INSERT INTO system_alerts ({cols}) VALUES ({params})"), row)

    return write


async def names_in_order(engine: AsyncEngine) -> list[str]:
    t = performance_stats
    async with engine.connect() as conn:
        rows = await conn.execute(select(t.c.metric_name).order_by(t.c.created_at, t.c.id))
        return [r[0] for r in rows]


# ----------------------------------------------------------------------------------- the tests


async def test_writes_land_in_submission_order(dbs: Databases) -> None:
    seen: list[int] = []

    def write_n(n: int) -> Any:
        async def write(conn: AsyncConnection) -> None:
            seen.append(n)
            await conn.execute(insert(performance_stats), [stat_row(f"m{n:03d}")])

        return write

    async with running(Outbox({"analytics": dbs.analytics})) as outbox:
        for n in range(50):
            outbox.submit("analytics", f"write {n}", write_n(n))
        await wait_for(lambda: outbox.written == 50)
    assert seen == list(range(50))
    assert outbox.pending() == 0 and outbox.dropped == 0
    assert sorted(await names_in_order(dbs.analytics)) == [f"m{n:03d}" for n in range(50)]


async def test_write_retried_until_the_database_is_back(
    dbs: Databases, migrated_urls: dict[str, str]
) -> None:
    async with Outage(migrated_urls["analytics"]) as outage:
        errors: list[str] = []
        outbox = Outbox({"analytics": outage.engine}, on_error=errors.append)
        async with running(outbox):
            outbox.insert("analytics", performance_stats, [stat_row("first")])
            outbox.insert("analytics", performance_stats, [stat_row("second")])
            await wait_for(lambda: len(errors) >= 2)
            assert outbox.written == 0 and outbox.pending() == 2
            assert outbox.healthy["analytics"] is False
            await outage.restore()
            await wait_for(lambda: outbox.written == 2)
            assert outbox.healthy["analytics"] is True
    assert set(errors) == {"analytics"}
    assert sorted(await names_in_order(dbs.analytics)) == ["first", "second"]


async def test_duplicate_key_counts_as_done_and_other_refusals_are_dropped(
    dbs: Databases,
) -> None:
    same = uuid7()
    async with running(Outbox({"analytics": dbs.analytics})) as outbox:
        outbox.insert("analytics", performance_stats, [stat_row("dup", row_id=same)])
        # The retry of a write whose commit happened but whose answer was lost.
        outbox.insert("analytics", performance_stats, [stat_row("dup", row_id=same)])
        # A write that can never succeed (alert_title is NOT NULL): dropped, loudly.
        bad = {"id": uuid7(), "alert_type": "x", "alert_level": "info", "alert_title": None}
        bad["alert_content"] = "c"
        outbox.insert("analytics", system_alerts, [bad])
        # Bad data (not in the ENUM): a CHECK failure on SQLite, a DataError on strict MariaDB.
        # Either way it can never land, so it must not block the writes behind it.
        worse = {**bad, "id": uuid7(), "alert_title": "t", "alert_level": "apocalyptic"}
        outbox.submit("analytics", "bad enum", _raw_insert(worse))
        outbox.insert("analytics", performance_stats, [stat_row("after")])
        await wait_for(lambda: outbox.pending() == 0)
    assert outbox.written == 3
    assert outbox.dropped == 2
    assert sorted(await names_in_order(dbs.analytics)) == ["after", "dup"]
    async with dbs.analytics.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(system_alerts))).scalar() == 0


async def test_queue_is_bounded_and_drops_the_oldest(dbs: Databases) -> None:
    outbox = Outbox({"analytics": dbs.analytics}, max_pending=3)
    for n in range(5):
        outbox.insert("analytics", performance_stats, [stat_row(f"m{n}")])
    assert outbox.pending("analytics") == 3
    assert outbox.dropped == 2
    async with running(outbox):
        await wait_for(lambda: outbox.written == 3)
    assert sorted(await names_in_order(dbs.analytics)) == ["m2", "m3", "m4"]


async def test_stop_writes_what_is_queued(dbs: Databases) -> None:
    outbox = Outbox({"analytics": dbs.analytics})
    await outbox.start()
    for n in range(20):
        outbox.insert("analytics", performance_stats, [stat_row(f"m{n:02d}")])
    await outbox.stop(grace=10.0)
    assert outbox.pending() == 0
    assert len(await names_in_order(dbs.analytics)) == 20
