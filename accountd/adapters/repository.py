"""The account repository: every read and write the engine makes to ``wework_platform``.

The central promise lives in `AccountRepository.apply_transitions`: a status change is a
compare-and-set ``UPDATE wework_accounts … WHERE id=? AND status=?`` plus one
``account_status_logs`` row plus the daemon's ``accountd_supervision`` row, all in ONE
transaction. A lost compare-and-set is reported as a `Conflict` carrying the status found, never
as an exception. Many transitions are committed together (set-based: one locking SELECT, one
``UPDATE … WHERE id IN (…)`` per distinct change, one multi-row INSERT of log rows), and each
account keeps the all-or-nothing guarantee because its three writes share the transaction.

A batch may write its supervision rows as one ``accountd_supervision_journal`` row instead of one
``accountd_supervision`` row each (``journal=True``, chosen by the door for large batches): on
MariaDB the upsert of 500 supervision rows cost more server time than the status update and the
log rows together. `AccountRepository.fold_journal` later folds journal rows into
``accountd_supervision`` in the order they were written, and start-up folds whatever is left
before it loads, so every reader that comes after a fold sees exactly the rows a direct upsert
would have left.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.dialects import mysql as mysql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from accountd.adapters import batch_sql
from accountd.adapters.batch_sql import Binds
from accountd.adapters.db import fetch_all
from accountd.adapters.schema import (
    account_status_logs,
    accountd_supervision,
    accountd_supervision_journal,
    wework_accounts,
)
from accountd.ids import uuid7

# Columns of wework_accounts the engine may set along with a status change (BRIEF §3:
# qr_ready stores login_qr_code, verified clears it and error_message, fail records the error).
TRANSITION_FIELDS = batch_sql.SETTABLE_WITH_STATUS

SUPERVISION_FIELDS = batch_sql.SUPERVISION_FIELDS

# The chunk size for ``IN (…)`` lists and multi-row inserts: large enough to amortise round trips,
# small enough to stay far below max_allowed_packet and SQLite's variable limit (32766).
CHUNK = 1000


def utcnow() -> dt.datetime:
    """Naive UTC, the form every timestamp takes in our databases."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def to_db_time(ts: float | None) -> dt.datetime | None:
    if ts is None:
        return None
    return _db_time(ts)


@functools.lru_cache(maxsize=256)
def _db_time(ts: float) -> dt.datetime:
    # Cached: every account of a batch enters its new state at the batch's one `now`.
    return dt.datetime.fromtimestamp(ts, dt.UTC).replace(tzinfo=None)


def from_db_time(value: dt.datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


# Not frozen, nor are the other objects built once per account per transition (`Applied`, the
# planner's `Action`, `Effects` and `RecoveryDecision`, `TransitionEvent`): a mass event builds
# 100,000 of each, and a frozen dataclass's __init__ sets every field through
# object.__setattr__ (timeit: the planner's Effects 0.93 µs frozen, 0.17 µs not). Nothing
# changes one once it is built.
@dataclass(slots=True)
class TransitionRequest:
    """One status change to commit: the compare-and-set, its log row and supervision state."""

    account_id: str
    expected_status: str
    new_status: str
    reason: str
    error_details: str | None = None
    operator_id: str | None = None
    # Extra wework_accounts columns to set with the status (keys from TRANSITION_FIELDS).
    fields: Mapping[str, Any] = field(default_factory=dict)
    # The accountd_supervision row after the change (keys from SUPERVISION_FIELDS); None = leave.
    supervision: Mapping[str, Any] | None = None
    log_id: str = field(default_factory=uuid7)

    def __post_init__(self) -> None:
        unknown = set(self.fields) - TRANSITION_FIELDS
        if unknown:
            raise ValueError(f"fields not settable with a transition: {sorted(unknown)}")


@dataclass(slots=True)  # not frozen: see TransitionRequest
class Applied:
    account_id: str
    log_id: str


@dataclass(frozen=True, slots=True)
class Conflict:
    """The compare-and-set lost: the row's status is ``found`` (None: the row is gone)."""

    account_id: str
    expected: str
    found: str | None


Outcome = Applied | Conflict


@dataclass(frozen=True, slots=True)
class AccountRow:
    """What the engine loads per account: the row's status plus our supervision state."""

    id: str
    tenant_id: str
    wework_guid: str
    status: str
    last_heartbeat_at: float | None
    supervision: Mapping[str, Any] | None  # None: the daemon has not seen this account yet


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What the worker needs to open a session (never includes wework_secret)."""

    account_id: str
    wework_guid: str
    corp_id: str | None
    device_info: Any
    proxy_config: Any


class AccountRepository:
    """Reads and writes of accounts, status logs and supervision state on one engine."""

    def __init__(
        self, engine: AsyncEngine, *, chunk: int = CHUNK, reads: AsyncEngine | None = None
    ) -> None:
        self.engine = engine
        # Admin reads (history, accountctl show): `Databases.platform_reads`, no pre-ping.
        self.reads = reads if reads is not None else engine
        self.chunk = chunk
        self.dialect = engine.dialect.name
        # A hook for tests that must prove atomicity: called inside the transaction, between the
        # status UPDATE and the log INSERT. Raising there must leave neither write behind.
        self.between_statements: Callable[[], None] | None = None

    # -- reads ----------------------------------------------------------------------------

    def _account_select(self) -> Any:
        a, s = wework_accounts, accountd_supervision
        return select(
            a.c.id,
            a.c.tenant_id,
            a.c.wework_guid,
            a.c.status,
            a.c.last_heartbeat_at,
            *(s.c[name].label(f"s_{name}") for name in SUPERVISION_FIELDS),
            s.c.account_id.label("s_account_id"),
        ).select_from(a.outerjoin(s, s.c.account_id == a.c.id))

    @staticmethod
    def _row(row: Row[Any]) -> AccountRow:
        m = row._mapping
        sup: dict[str, Any] | None = None
        if m["s_account_id"] is not None:
            sup = {name: m[f"s_{name}"] for name in SUPERVISION_FIELDS}
        return AccountRow(
            id=m["id"],
            tenant_id=m["tenant_id"],
            wework_guid=m["wework_guid"],
            status=m["status"],
            last_heartbeat_at=from_db_time(m["last_heartbeat_at"]),
            supervision=sup,
        )

    async def iter_accounts(self, page_size: int = 5000) -> AsyncIterator[list[AccountRow]]:
        """All accounts in pages, keyset-paginated by id (no OFFSET: O(n) overall)."""
        after = ""
        while True:
            stmt = (
                self._account_select()
                .where(wework_accounts.c.id > after)
                .order_by(wework_accounts.c.id)
                .limit(page_size)
            )
            async with self.engine.connect() as conn:
                rows = (await conn.execute(stmt)).all()
            if not rows:
                return
            page = [self._row(r) for r in rows]
            yield page
            after = page[-1].id

    async def get_accounts(self, ids: Sequence[str]) -> dict[str, AccountRow]:
        out: dict[str, AccountRow] = {}
        async with self.engine.connect() as conn:
            for chunk in _chunks(ids, self.chunk):
                stmt = self._account_select().where(wework_accounts.c.id.in_(chunk))
                for r in (await conn.execute(stmt)).all():
                    row = self._row(r)
                    out[row.id] = row
        return out

    async def fresh_heartbeats(self, ids: Sequence[str], since: float) -> dict[str, float]:
        """``last_heartbeat_at`` of those of ``ids`` whose value is ``since`` or later.

        The re-check before declaring heartbeats lost (other services may write the column):
        the filter runs in the database, so a mass event, where nobody has a fresh heartbeat,
        reads back nothing but primary-key lookups. The column has whole seconds, so a row of
        the very second of ``since`` is returned too; the caller compares exactly. Plain driver
        SQL (`batch_sql`), like the heartbeat flush: a mass event re-checks 100,000 ids, and
        SQLAlchemy's rendering of each ``IN`` list took about 8 µs of the event loop per id.
        """
        cutoff = batch_sql.sql_time(to_db_time(float(int(since))))
        assert cutoff is not None
        out: dict[str, float] = {}
        async with self.engine.connect() as conn:
            for chunk in _chunks(ids, self.chunk):
                b = Binds(self.dialect)
                sql = batch_sql.fresh_heartbeats(b, chunk, cutoff, self.dialect)
                rows: list[Any] = list(await conn.exec_driver_sql(sql, b.params))
                out.update((account_id, float(beat)) for account_id, beat in rows)
        return out

    async def find_created(self, limit: int = 10_000) -> list[AccountRow]:
        """Rows in ``created`` (new accounts inserted by other services); uses idx_status."""
        stmt = (
            self._account_select()
            .where(wework_accounts.c.status == "created")
            .order_by(wework_accounts.c.id)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [self._row(r) for r in (await conn.execute(stmt)).all()]

    async def heartbeats_since(
        self, since: dt.datetime, limit: int = 100_000
    ) -> list[tuple[str, float]]:
        """(id, last_heartbeat_at) written at or after ``since``; uses idx_last_heartbeat."""
        a = wework_accounts
        stmt = (
            select(a.c.id, a.c.last_heartbeat_at)
            .where(a.c.last_heartbeat_at >= since)
            .order_by(a.c.last_heartbeat_at)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return [(r[0], from_db_time(r[1]) or 0.0) for r in rows]

    async def all_ids(self, page_size: int = 50_000) -> AsyncIterator[list[str]]:
        """Every account id, in pages (used to notice rows deleted by other services)."""
        after = ""
        a = wework_accounts
        while True:
            stmt = select(a.c.id).where(a.c.id > after).order_by(a.c.id).limit(page_size)
            async with self.engine.connect() as conn:
                ids = [r[0] for r in (await conn.execute(stmt)).all()]
            if not ids:
                return
            yield ids
            after = ids[-1]

    async def session_info(self, account_id: str) -> SessionInfo | None:
        a = wework_accounts
        stmt = select(
            a.c.id, a.c.wework_guid, a.c.wework_corp_id, a.c.device_info, a.c.proxy_config
        ).where(a.c.id == account_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        if row is None:
            return None
        return SessionInfo(row[0], row[1], row[2], row[3], row[4])

    async def history(self, account_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` log rows of one account, oldest first."""
        return await history_rows(self.reads, account_id, limit)

    # -- writes ---------------------------------------------------------------------------

    async def apply_transition(
        self,
        account_id: str,
        expected_status: str,
        new_status: str,
        reason: str,
        error_details: str | None = None,
        operator_id: str | None = None,
        *,
        fields: Mapping[str, Any] | None = None,
        supervision: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """One compare-and-set transition with its log row, in one transaction."""
        req = TransitionRequest(
            account_id,
            expected_status,
            new_status,
            reason,
            error_details,
            operator_id,
            fields=dict(fields or {}),
            supervision=supervision,
        )
        return (await self.apply_transitions([req]))[0]

    async def apply_transitions(
        self, requests: Sequence[TransitionRequest], *, journal: bool = False
    ) -> list[Outcome]:
        """Commit many transitions in one transaction; results align with ``requests``.

        At most one request per account (the caller's one door guarantees that).

        Optimistic first: the grouped compare-and-set ``UPDATE``s run without a locking read,
        and when each matched every row it named (the common case: nobody else writes status),
        the log rows and supervision rows follow in the same transaction. Should any account's
        status differ, that transaction is rolled back whole and the batch is redone the careful
        way: ``SELECT … FOR UPDATE`` to learn who still matches, then the writes for those.
        Either way each account's status, log row and supervision row commit together or not
        at all. ``journal``: the supervision rows go into one journal row (module docstring).
        """
        if not requests:
            return []
        ids = [r.account_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("apply_transitions: one request per account per batch")
        async with self.engine.connect() as conn:
            await conn.begin()
            if await self._update_statuses(conn, requests, strict=False):
                await self._write_rest(conn, requests, journal)
                await conn.commit()
                return [Applied(r.account_id, r.log_id) for r in requests]
            await conn.rollback()
            await conn.begin()
            found = await self._lock_statuses(conn, ids)
            winners = [r for r in requests if found.get(r.account_id) == r.expected_status]
            if winners:
                await self._update_statuses(conn, winners, strict=True)
                await self._write_rest(conn, winners, journal)
            await conn.commit()
        won = {r.account_id for r in winners}
        return [
            Applied(r.account_id, r.log_id)
            if r.account_id in won
            else Conflict(r.account_id, r.expected_status, found.get(r.account_id))
            for r in requests
        ]

    async def _write_rest(
        self, conn: AsyncConnection, winners: Sequence[TransitionRequest], journal: bool
    ) -> None:
        """The log rows and supervision rows of transitions whose compare-and-set won."""
        if self.between_statements is not None:
            self.between_statements()
        await self._insert_logs(conn, winners)
        rows = self._supervision_rows([r for r in winners if r.supervision is not None])
        if not rows:
            return
        if journal:
            await self._write_journal(conn, batch_sql.SUPERVISION_COLUMNS, rows)
        else:
            await self._upsert_supervision(conn, rows)

    async def _lock_statuses(self, conn: AsyncConnection, ids: Sequence[str]) -> dict[str, str]:
        a = wework_accounts
        found: dict[str, str] = {}
        for chunk in _chunks(ids, self.chunk):
            # FOR UPDATE takes the row locks on MySQL; SQLite ignores it and serialises writers.
            stmt = select(a.c.id, a.c.status).where(a.c.id.in_(chunk)).with_for_update()
            for row in (await conn.execute(stmt)).all():
                found[row[0]] = row[1]
        return found

    async def _update_statuses(
        self, conn: AsyncConnection, winners: Sequence[TransitionRequest], *, strict: bool
    ) -> bool:
        """The grouped compare-and-set; False as soon as one statement matched fewer rows.

        ``strict``: the rows were locked and seen in their expected status, so a shortfall
        means a writer without row locks slipped in: raise `ConcurrentWrite` (the caller's
        transaction is rolled back) rather than commit a status without its log row.
        """
        groups: dict[tuple[Any, ...], list[str]] = defaultdict(list)
        for r in winners:
            extra = tuple(sorted(r.fields.items())) if r.fields else ()
            groups[(r.expected_status, r.new_status, extra)].append(r.account_id)
        for (expected, new, extra), ids in groups.items():
            for chunk in _chunks(ids, self.chunk):
                b = Binds(self.dialect)
                sql = batch_sql.update_status(b, chunk, expected, new, extra)
                result = await conn.exec_driver_sql(sql, b.params)
                if result.rowcount == len(chunk):
                    continue
                if strict:
                    raise ConcurrentWrite(
                        f"compare-and-set matched {result.rowcount} of {len(chunk)} rows"
                    )
                return False
        return True

    async def _insert_logs(
        self, conn: AsyncConnection, winners: Sequence[TransitionRequest]
    ) -> None:
        for chunk in _chunks(winners, self.chunk):
            b = Binds(self.dialect)
            rows = (
                (
                    r.log_id,
                    r.account_id,
                    r.expected_status,
                    r.new_status,
                    _clip(r.reason, 255),
                    r.error_details,
                    r.operator_id,
                )
                for r in chunk
            )
            await conn.exec_driver_sql(batch_sql.insert_logs(b, rows), b.params)

    def _supervision_rows(self, requests: Sequence[TransitionRequest]) -> list[tuple[Any, ...]]:
        """Supervision rows of transitions in database form, `SUPERVISION_COLUMNS` order."""
        if not requests:
            return []
        now = utcnow()
        updated_at = batch_sql.sql_time(now)
        # A mass event writes the same few times and histories for hundreds of accounts: each
        # distinct one is rendered once per call (sql_time, json.dumps), not once per row.
        times: dict[dt.datetime, str | None] = {}
        histories: dict[tuple[float, ...], str] = {(): "[]"}

        def when(value: dt.datetime | None) -> str | None:
            if value is None:
                return None
            text = times.get(value)
            if text is None:
                text = times[value] = batch_sql.sql_time(value)
            return text

        rows = []
        for r in requests:
            assert r.supervision is not None
            get = r.supervision.get
            history = tuple(get("offline_history") or ())
            dumped = histories.get(history)
            if dumped is None:
                dumped = histories[history] = json.dumps(list(history))
            # `batch_sql.SUPERVISION_COLUMNS` order.
            rows.append(
                (
                    r.account_id,
                    r.new_status,
                    when(get("entered_at") or now),
                    get("attempts") or 0,
                    get("qr_refreshes") or 0,
                    get("next_action"),
                    when(get("next_action_at")),
                    when(get("online_since")),
                    dumped,
                    bool(get("paused")),
                    get("paused_reason"),
                    r.log_id,
                    get("epoch") or 0,
                    updated_at,
                )
            )
        return rows

    async def _upsert_supervision(
        self,
        conn: AsyncConnection,
        rows: Sequence[Sequence[Any]],
        columns: Sequence[str] = batch_sql.SUPERVISION_COLUMNS,
    ) -> None:
        """Multi-row upsert of supervision rows in database form (``columns`` order)."""
        alias = bool(getattr(self.engine.dialect, "_requires_alias_for_on_duplicate_key", False))
        for chunk in _chunks(rows, self.chunk):
            b = Binds(self.dialect)
            sql = batch_sql.upsert_supervision(
                b, chunk, self.dialect, mysql_alias=alias, columns=columns
            )
            await conn.exec_driver_sql(sql, b.params)

    async def _write_journal(
        self, conn: AsyncConnection, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """One journal row holding ``rows`` (values in database form, ``columns`` order)."""
        entries = journal_document(columns, rows)
        j = accountd_supervision_journal
        stmt = insert(j).values(row_count=len(rows), entries=entries, created_at=utcnow())
        await conn.execute(stmt)

    async def fold_journal(self, limit: int = 10) -> tuple[int, int]:
        """Fold the oldest ``limit`` journal rows into accountd_supervision, in one transaction.

        Returns (journal rows folded, supervision rows written); (0, 0) when the journal is
        empty. Rows are applied in journal order, the later one winning per account and column,
        which is right only while nothing writes accountd_supervision directly for an account
        that still has a row here: the door sees to that (`Door.journal_active`). Accounts
        deleted since are skipped (their supervision row went with them, by cascade).
        """
        j, a = accountd_supervision_journal, wework_accounts
        async with self.engine.connect() as conn:
            await conn.begin()
            found = (
                await conn.execute(select(j.c.id, j.c.entries).order_by(j.c.id).limit(limit))
            ).all()
            if not found:
                await conn.rollback()
                return 0, 0
            latest: dict[str, dict[str, Any]] = {}
            for _, entries in found:
                for row in journal_entries(entries):
                    older = latest.get(row["account_id"])
                    latest[row["account_id"]] = row if older is None else older | row
            present: set[str] = set()
            for chunk in _chunks(list(latest), self.chunk):
                stmt = select(a.c.id).where(a.c.id.in_(chunk))
                present.update(r[0] for r in (await conn.execute(stmt)).all())
            # Grouped by the columns they carry: complete rows (transitions) nearly always; an
            # admin's pause journals a row without the door's last_log_id and epoch.
            by_columns: dict[tuple[str, ...], list[tuple[Any, ...]]] = defaultdict(list)
            for account_id, row in latest.items():
                if account_id in present:
                    columns = ("account_id", *sorted(row.keys() - {"account_id"}))
                    by_columns[columns].append(tuple(row[c] for c in columns))
            for columns, rows in by_columns.items():
                await self._upsert_supervision(conn, rows, columns)
            await conn.execute(delete(j).where(j.c.id.in_([r[0] for r in found])))
            await conn.commit()
        return len(found), sum(len(v) for v in by_columns.values())

    async def upsert_supervision_rows(
        self, conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Insert-or-update ``accountd_supervision`` rows (complete rows, all columns)."""
        s = accountd_supervision
        cols = [c for c in rows[0] if c != "account_id"]
        if self.dialect == "mysql":
            my = mysql_dialect.insert(s)
            stmt: Any = my.on_duplicate_key_update({c: my.inserted[c] for c in cols})
        else:
            sq = sqlite_dialect.insert(s)
            stmt = sq.on_conflict_do_update(
                index_elements=[s.c.account_id], set_={c: sq.excluded[c] for c in cols}
            )
        for chunk in _chunks(list(rows), self.chunk):
            await conn.execute(stmt, chunk)

    async def save_supervision(
        self, rows: Sequence[Mapping[str, Any]], *, journal: bool = False
    ) -> None:
        """Persist supervision state that changed without a status change (e.g. pause).

        ``journal``: as one journal row (the rows must all have the same keys, in database
        form), for while the journal holds rows of these accounts that are not folded yet.
        """
        if not rows:
            return
        async with self.engine.begin() as conn:
            if journal:
                columns = list(rows[0])
                values = [[_db_form(r[c]) for c in columns] for r in rows]
                await self._write_journal(conn, columns, values)
            else:
                await self.upsert_supervision_rows(conn, rows)

    async def write_heartbeats(self, beats: Mapping[str, float]) -> int:
        """Batched ``last_heartbeat_at`` write: at most one write per account.

        Timestamps are grouped by whole second (the column's resolution), so a flush of N
        accounts costs a handful of ``UPDATE … WHERE id IN (…)`` statements, not N. A newer
        value already in the row (another service writes there too) is never moved back.
        The statements are plain driver SQL (`batch_sql`): through SQLAlchemy Core, compiling
        each ``IN`` list and processing its binds cost 8.5 µs of CPU a row on MariaDB.
        """
        if not beats:
            return 0
        by_second: dict[int, list[str]] = defaultdict(list)
        for account_id, ts in beats.items():
            by_second[int(ts)].append(account_id)
        written = 0
        async with self.engine.connect() as conn:
            for second, ids in by_second.items():
                when = batch_sql.sql_time(to_db_time(second))
                assert when is not None
                for chunk in _chunks(ids, self.chunk):
                    b = Binds(self.dialect)
                    sql = batch_sql.update_heartbeats(b, chunk, when)
                    written += (await conn.exec_driver_sql(sql, b.params)).rowcount
                    # One transaction per statement: a flush of 100k rows on a busy event loop
                    # takes seconds, and one transaction around it would hold SQLite's single
                    # write lock (InnoDB: the row locks) all that time, stalling the door's
                    # transitions behind it (bench.engine measured heartbeat_lost commits 1-2 s
                    # late on SQLite). The rows are independent; a failed flush is retried whole.
                    await conn.commit()
        return written

    async def count_by_status(self) -> dict[str, int]:
        a = wework_accounts
        stmt = select(a.c.status, func.count()).group_by(a.c.status)
        async with self.engine.connect() as conn:
            return {r[0]: int(r[1]) for r in (await conn.execute(stmt)).all()}


class ConcurrentWrite(RuntimeError):
    """A compare-and-set lost after the rows were read: the batch is rolled back whole."""


def journal_document(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A journal row's ``entries``: ``{"columns": [...], "rows": [[...], ...]}`` for the values
    that differ from row to row, and ``"same": {column: value}`` for those every row shares.

    A mass event's rows share most of theirs (status, the time entered, counters, the next
    action's kind, the epoch): written once, they leave the document at about half the size,
    and the database writes, and the driver escapes, half as much per transition.
    """
    n = len(rows)
    by_column = list(zip(*rows, strict=True)) if n else [() for _ in columns]
    same: dict[str, Any] = {}
    varying: list[int] = []
    for i, (name, values) in enumerate(zip(columns, by_column, strict=True)):
        # account_id always varies; `count` compares in C (a mass event: 14 columns x 500).
        if i and n > 1 and values.count(values[0]) == n:
            same[name] = values[0]
        else:
            varying.append(i)
    doc: dict[str, Any] = {
        "columns": [columns[i] for i in varying],
        "rows": list(zip(*(by_column[i] for i in varying), strict=True)),
    }
    if same:
        doc["same"] = same
    return json.dumps(doc, separators=(",", ":"))


def journal_entries(entries: str) -> Iterator[dict[str, Any]]:
    """The supervision rows one journal row holds (`journal_document`), in the order written;
    values in database form, keyed by column."""
    doc = json.loads(entries)
    columns = doc["columns"]
    same = doc.get("same", {})
    for values in doc["rows"]:
        yield {**same, **dict(zip(columns, values, strict=True))}


def _chunks(items: Sequence[Any] | Iterable[Any], size: int) -> Iterable[list[Any]]:
    seq = list(items) if not isinstance(items, list) else items
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _db_form(value: Any) -> Any:
    """A supervision value as the journal keeps it (what `batch_sql` binds)."""
    if isinstance(value, dt.datetime):
        return batch_sql.sql_time(value)
    if isinstance(value, list):
        return json.dumps(value)
    return value


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def history_rows(engine: AsyncEngine, account_id: str, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` log rows of one account, oldest first (on ``engine``'s loop)."""
    lg = account_status_logs
    stmt = select(lg).where(lg.c.account_id == account_id).order_by(lg.c.id.desc()).limit(limit)
    rows = await fetch_all(engine, stmt)
    return [dict(r._mapping) for r in reversed(rows)]


__all__ = [
    "AccountRepository",
    "AccountRow",
    "Applied",
    "ConcurrentWrite",
    "Conflict",
    "Outcome",
    "SessionInfo",
    "TransitionRequest",
    "history_rows",
]
