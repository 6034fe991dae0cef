"""The start-up load: every account with its supervision row, as plain values, fast.

`AccountRepository.iter_accounts` gives rich `AccountRow` objects, and at a million accounts
that cost ~48 s on MariaDB (profiled: the driver converting four DATETIMEs per row, the JSON
type decoding ``offline_history`` for every row, SQLAlchemy's row mappings and one dict per
supervision row). The daemon must be ready in well under 30 s, so this loader asks the database
for exactly what `Supervisor._adopt_values` needs, in the cheapest form for the driver:

- timestamps as epoch seconds computed by the database (a DOUBLE parses with ``float()``);
- ``offline_history`` as its raw JSON text (almost always ``[]``; decoded only when not);
- plain tuples from ``exec_driver_sql``-style text statements, no ORM rows.

Keyset-paginated by id, like `iter_accounts`: O(n) overall, and each page is a short read.

`shown_qr_hashes` reads the QR codes on show apart from it.

`heartbeats_after` serves the periodic pick-up of heartbeats other services wrote, in pages
keyed by (``last_heartbeat_at``, id) so that a second holding more rows than a page never
stalls it; on MySQL/MariaDB a page arrives packed in one row (`heartbeats_packed_statement`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from sqlalchemy import DateTime, bindparam, text
from sqlalchemy.ext.asyncio import AsyncEngine


class LoadedRow(NamedTuple):
    """One account as loaded; supervision fields are None when it has no supervision row."""

    id: str
    tenant_id: str
    wework_guid: str
    status: str
    last_heartbeat_at: float | None
    has_supervision: bool
    s_status: str | None
    entered_at: float | None
    attempts: int | None
    qr_refreshes: int | None
    next_action: str | None
    next_action_at: float | None
    online_since: float | None
    offline_history: str | None  # JSON text
    paused: bool
    paused_reason: str | None


def _epoch(dialect: str, column: str) -> str:
    """SQL for a DATETIME/TIMESTAMP column as epoch seconds (a float, microseconds kept)."""
    if dialect == "mysql":
        # The session time zone is UTC (accountd.adapters.db), so stored values are UTC.
        return f"UNIX_TIMESTAMP({column}) + 0e0"
    # SQLite keeps 'YYYY-MM-DD HH:MM:SS[.ffffff]' text: whole seconds plus the fraction.
    return f"CAST(strftime('%s', {column}) AS REAL) + CAST(substr({column}, 20) AS REAL)"


def load_statement(dialect: str) -> str:
    beat, entered, next_at, since = (
        _epoch(dialect, c)
        for c in ("a.last_heartbeat_at", "s.entered_at", "s.next_action_at", "s.online_since")
    )
    history = "CAST(s.offline_history AS CHAR)" if dialect == "mysql" else "s.offline_history"
    # S608: the text holds fixed names and expressions only; values are bound parameters.
    return (
        f"SELECT a.id, a.tenant_id, a.wework_guid, a.status, {beat}, "  # noqa: S608
        f"s.account_id IS NOT NULL, s.status, {entered}, s.attempts, s.qr_refreshes, "
        f"s.next_action, {next_at}, {since}, {history}, s.paused, s.paused_reason "
        "FROM wework_accounts a LEFT JOIN accountd_supervision s ON s.account_id = a.id "
        "WHERE a.id > :after ORDER BY a.id LIMIT :limit"
    )


async def iter_loaded(engine: AsyncEngine, page_size: int = 10_000) -> AsyncIterator[list[Any]]:
    """Every account in pages of raw tuples in `LoadedRow` order (wrap with ``LoadedRow._make``).

    One connection for the whole load (no checkout, ping and rollback per page), and the next
    page is asked for before this one is handed out: the database reads page k+1 while the
    caller turns page k into accounts, instead of each waiting for the other.
    """
    stmt = text(load_statement(engine.dialect.name))
    async with engine.connect() as conn:

        async def fetch(after: str) -> list[Any]:
            result = await conn.execute(stmt, {"after": after, "limit": page_size})
            return list(result)

        pending = asyncio.ensure_future(fetch(""))
        try:
            while rows := await pending:
                pending = asyncio.ensure_future(fetch(rows[-1][0]))
                await asyncio.sleep(0)  # the query goes out before the caller gets busy
                yield rows
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending


async def shown_qr_hashes(engine: AsyncEngine, page_size: int = 1_000) -> dict[str, int]:
    """``hash(login_qr_code)`` of every account in waiting_qr that shows a code.

    Apart from the main load, which reads every row: few accounts wait for a scan at any
    time, `idx_status` finds them, and a code (TEXT, up to 64 KB) is not worth carrying
    through a million-row read. Paged, so that many large codes never arrive at once.
    """
    stmt = text(
        "SELECT id, login_qr_code FROM wework_accounts WHERE status = 'waiting_qr' "
        "AND login_qr_code IS NOT NULL AND id > :after ORDER BY id LIMIT :limit"
    )
    shown: dict[str, int] = {}
    after = ""
    async with engine.connect() as conn:
        while rows := (await conn.execute(stmt, {"after": after, "limit": page_size})).all():
            shown.update((account_id, hash(code)) for account_id, code in rows)
            after = rows[-1][0]
    return shown


# The keyset position of the heartbeat poll: at or after the second `ts`, past `id` within it.
_AFTER = "last_heartbeat_at >= :ts AND (last_heartbeat_at > :ts OR id > :id)"


def heartbeats_statement(dialect: str) -> str:
    beat = _epoch(dialect, "last_heartbeat_at")
    # A range on idx_last_heartbeat (whose entries carry the id), keyset by (time, id).
    return (
        f"SELECT id, {beat} FROM wework_accounts "  # noqa: S608 - fixed text, bound values
        f"WHERE {_AFTER} ORDER BY last_heartbeat_at, id LIMIT :limit"
    )


def heartbeats_packed_statement() -> str:
    """MySQL/MariaDB: the same page as ONE row, ``(count, 'id ts,id ts,…')`` in page order.

    Our own flush writes tens of thousands of ``last_heartbeat_at`` rows a second at a million
    accounts, and the poll reads them all back. aiomysql parses every row in Python, 4.2 µs a
    row of two fields (measured, 200,000 rows); one packed string split by ``str.split`` costs
    0.8 µs a row. ``UNIX_TIMESTAMP`` without ``+ 0e0`` keeps its exact decimal text.
    """
    # S608: fixed names and functions only; since, cursor and limit are bound parameters.
    return (
        "SELECT COUNT(*), GROUP_CONCAT(id, ' ', UNIX_TIMESTAMP(last_heartbeat_at) "  # noqa: S608
        "ORDER BY last_heartbeat_at, id SEPARATOR ',') FROM ("
        f"SELECT id, last_heartbeat_at FROM wework_accounts WHERE {_AFTER} "
        "ORDER BY last_heartbeat_at, id LIMIT :limit) AS page"
    )


def unpack_heartbeats(count: int, packed: str | None) -> list[tuple[str, float]] | None:
    """The pairs of a packed page, or None when the text does not hold exactly ``count``.

    An id holding a ``,`` adds a record, and a value cut at ``group_concat_max_len`` loses
    some: either way the count differs and the caller reads that page row by row. An id holding
    a space is fine: the time is split off at the last one.
    """
    if not count:
        return []
    records = packed.split(",") if packed else []
    if len(records) != count:
        return None
    out = []
    try:
        for record in records:
            account_id, _, ts = record.rpartition(" ")
            out.append((account_id, float(ts)))
    except ValueError:  # not expected once the count matched; the row read is always right
        return None
    return out


async def heartbeats_after(
    engine: AsyncEngine, ts: dt.datetime, after_id: str, limit: int
) -> list[tuple[str, float]]:
    """(id, last_heartbeat_at as epoch seconds) after the keyset position (`ts`, `after_id`),
    oldest first; ``after_id=""`` starts at `ts` itself."""
    params = {"ts": ts, "id": after_id, "limit": limit}
    async with engine.connect() as conn:
        # Not on SQLite: its group_concat has no ORDER BY before 3.44, and the page's keyset
        # position must be the database's last row; sqlite3 builds rows in C anyway.
        if engine.dialect.name == "mysql":
            packed = text(heartbeats_packed_statement()).bindparams(
                bindparam("ts", type_=DateTime())
            )
            count, joined = (await conn.execute(packed, params)).one()
            pairs = unpack_heartbeats(int(count), joined)
            if pairs is not None:
                return pairs
        # Typed, so that SQLite compares the stored text against the same spelling of the time.
        stmt = text(heartbeats_statement(engine.dialect.name)).bindparams(
            bindparam("ts", type_=DateTime())
        )
        result = await conn.execute(stmt, params)
        return [(r[0], float(r[1])) for r in result]


__all__ = ["LoadedRow", "heartbeats_after", "iter_loaded", "load_statement"]
