"""The start-up load: every account with its supervision row, as plain values, fast.

`AccountRepository.iter_accounts` gives rich `AccountRow` objects, and at a million accounts
that cost ~48 s on MariaDB (profiled: the driver converting four DATETIMEs per row, the JSON
type decoding ``offline_history`` for every row, SQLAlchemy's row mappings and one dict per
supervision row). The daemon must be ready in well under 30 s, so this loader asks the database
for exactly what `Supervisor._adopt_values` needs, in the cheapest form for the driver:

- timestamps as epoch seconds computed by the database (a DOUBLE parses with ``float()``);
- ``offline_history`` as its raw JSON text (almost always ``[]``; decoded only when not);
- plain tuples from ``exec_driver_sql``-style text statements, no ORM rows;
- on MySQL/MariaDB, each page packed into one string (`load_packed_statement`), because
  aiomysql's row parsing in Python was then half of a 57 s start-up.

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

from accountd.adapters.batch_sql import epoch_seconds


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


def load_statement(dialect: str, *, bounded: bool = False) -> str:
    """One page of the load, keyset by id: the ``:limit`` accounts after ``:after``, or
    (``bounded``) every account in (``:after``, ``:last``]."""
    beat, entered, next_at, since = (
        epoch_seconds(dialect, c)
        for c in ("a.last_heartbeat_at", "s.entered_at", "s.next_action_at", "s.online_since")
    )
    history = "CAST(s.offline_history AS CHAR)" if dialect == "mysql" else "s.offline_history"
    page = "AND a.id <= :last ORDER BY a.id" if bounded else "ORDER BY a.id LIMIT :limit"
    # S608: the text holds fixed names and expressions only; values are bound parameters.
    return (
        f"SELECT a.id, a.tenant_id, a.wework_guid, a.status, {beat}, "  # noqa: S608
        f"s.account_id IS NOT NULL, s.status, {entered}, s.attempts, s.qr_refreshes, "
        f"s.next_action, {next_at}, {since}, {history}, s.paused, s.paused_reason "
        "FROM wework_accounts a LEFT JOIN accountd_supervision s ON s.account_id = a.id "
        f"WHERE a.id > :after {page}"
    )


# A packed page's separators: ASCII's own unit and record separators, which no id, status,
# number or timestamp holds. A text value holding one (a pause reason, say) changes a count,
# and that page is read row by row instead.
_UNIT, _RECORD = "\x1f", "\x1e"
_LOADED_FIELDS = 16


def load_packed_statement() -> str:
    """MySQL/MariaDB: a page of `load_statement` as ONE row, ``(count, last id, packed)``.

    aiomysql parses every row and field in Python: at a million accounts the load spent
    about 30 s reading rows, half the start-up (py-spy: `_read_row_from_packet` and
    `read_length_coded_string`). One string per page, cut by ``str.split``, leaves the
    database's side (about 12 s on a million, on another core) and a few µs a row here.

    A NULL becomes ``''`` (CONCAT_WS would skip it and shift the fields): none of the text
    fields that can be NULL means anything when empty. Timestamps are ``UNIX_TIMESTAMP`` as
    exact decimal text; ``:unit`` and ``:record`` are `_UNIT` and `_RECORD`.
    """
    epoch = "UNIX_TIMESTAMP({})".format
    fields = [
        "id",
        "tenant_id",
        "wework_guid",
        "status",
        epoch("beat"),
        "has_supervision",
        "s_status",
        epoch("entered_at"),
        "attempts",
        "qr_refreshes",
        "next_action",
        epoch("next_action_at"),
        epoch("online_since"),
        "offline_history",
        "paused",
        "paused_reason",
    ]
    packed = ", ".join(f"IFNULL({f}, '')" for f in fields)
    # S608: fixed names and functions only; the cursor, the limit and separators are bound.
    return (
        f"SELECT COUNT(*), MAX(id), GROUP_CONCAT(CONCAT_WS(:unit, {packed}) "  # noqa: S608
        "ORDER BY id SEPARATOR :record) FROM ("
        "SELECT a.id, a.tenant_id, a.wework_guid, a.status, a.last_heartbeat_at AS beat, "
        "s.account_id IS NOT NULL AS has_supervision, s.status AS s_status, s.entered_at, "
        "s.attempts, s.qr_refreshes, s.next_action, s.next_action_at, s.online_since, "
        "CAST(s.offline_history AS CHAR) AS offline_history, s.paused, s.paused_reason "
        "FROM wework_accounts a LEFT JOIN accountd_supervision s ON s.account_id = a.id "
        "WHERE a.id > :after ORDER BY a.id LIMIT :limit) AS page"
    )


def unpack_loaded(count: int, packed: str | None) -> list[tuple[Any, ...]] | None:
    """The tuples (in `LoadedRow` order) of a packed page, or None when the text does not hold
    exactly ``count`` records of 16 fields (a separator inside a value, or a page cut at
    ``group_concat_max_len``): the caller then reads that page row by row."""
    records = packed.split(_RECORD) if packed else []
    if len(records) != count:
        return None
    out = []
    try:
        for record in records:
            f = record.split(_UNIT)
            if len(f) != _LOADED_FIELDS:
                return None
            # fmt: off
            out.append((
                f[0], f[1], f[2], f[3], float(f[4]) if f[4] else None, f[5] == "1",
                f[6] or None, float(f[7]) if f[7] else None, int(f[8]) if f[8] else None,
                int(f[9]) if f[9] else None, f[10] or None, float(f[11]) if f[11] else None,
                float(f[12]) if f[12] else None, f[13] or None, f[14] == "1", f[15] or None,
            ))
            # fmt: on
    except ValueError:  # not expected once the counts matched; the row read is always right
        return None
    return out


async def iter_loaded(engine: AsyncEngine, page_size: int = 10_000) -> AsyncIterator[list[Any]]:
    """Every account in pages of raw tuples in `LoadedRow` order (wrap with ``LoadedRow._make``).

    One connection for the whole load (no checkout, ping and rollback per page), and the next
    page is asked for before this one is unpacked and handed out: the database reads page k+1
    while the caller turns page k into accounts, instead of each waiting for the other. On
    MySQL/MariaDB a page arrives packed (`load_packed_statement`); one that does not unpack is
    read again row by row on a second connection, bounded by the packed page's last id so that
    rows inserted meanwhile cannot push one of its rows out.
    """
    dialect = engine.dialect.name
    rows_stmt = text(load_statement(dialect))
    bounded_stmt = text(load_statement(dialect, bounded=True))
    packed_stmt = text(load_packed_statement()) if dialect == "mysql" else None

    async with engine.connect() as conn:

        async def fetch(after: str) -> tuple[str | None, Any]:
            """(the page's last id or None at the end, what `page` turns into rows)."""
            params = {"after": after, "limit": page_size}
            if packed_stmt is None:
                rows = list(await conn.execute(rows_stmt, params))
                return (rows[-1][0] if rows else None), rows
            params.update(unit=_UNIT, record=_RECORD)
            count, last, packed = (await conn.execute(packed_stmt, params)).one()
            return (last if count else None), (after, last, int(count), packed)

        async def page(payload: Any) -> list[Any]:
            if packed_stmt is None:
                return list(payload)
            after, last, count, packed = payload
            rows = unpack_loaded(count, packed)
            if rows is None:
                async with engine.connect() as other:
                    params = {"after": after, "last": last}
                    rows = list(await other.execute(bounded_stmt, params))
            return rows

        pending = asyncio.ensure_future(fetch(""))
        try:
            while True:
                last, payload = await pending
                if last is None:
                    break
                pending = asyncio.ensure_future(fetch(last))
                await asyncio.sleep(0)  # the query goes out before this page is unpacked
                yield await page(payload)
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
    beat = epoch_seconds(dialect, "last_heartbeat_at")
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


__all__ = [
    "LoadedRow",
    "heartbeats_after",
    "iter_loaded",
    "load_packed_statement",
    "load_statement",
    "shown_qr_hashes",
    "unpack_loaded",
]
