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

`heartbeats_after` serves the periodic pick-up of heartbeats other services wrote, in pages
keyed by (``last_heartbeat_at``, id) so that a second holding more rows than a page never
stalls it.
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


def heartbeats_statement(dialect: str) -> str:
    beat = _epoch(dialect, "last_heartbeat_at")
    # A range on idx_last_heartbeat (whose entries carry the id), keyset by (time, id).
    return (
        f"SELECT id, {beat} FROM wework_accounts "  # noqa: S608 - fixed text, bound values
        "WHERE last_heartbeat_at >= :ts AND (last_heartbeat_at > :ts OR id > :id) "
        "ORDER BY last_heartbeat_at, id LIMIT :limit"
    )


async def heartbeats_after(
    engine: AsyncEngine, ts: dt.datetime, after_id: str, limit: int
) -> list[tuple[str, float]]:
    """(id, last_heartbeat_at as epoch seconds) after the keyset position (`ts`, `after_id`),
    oldest first; ``after_id=""`` starts at `ts` itself."""
    # Typed, so that SQLite compares the stored text against the same spelling of the time.
    stmt = text(heartbeats_statement(engine.dialect.name)).bindparams(
        bindparam("ts", type_=DateTime())
    )
    async with engine.connect() as conn:
        result = await conn.execute(stmt, {"ts": ts, "id": after_id, "limit": limit})
        return [(r[0], float(r[1])) for r in result]


__all__ = ["LoadedRow", "heartbeats_after", "iter_loaded", "load_statement"]
