"""``accountd db verify``: the integrity check of the three databases.

The invariants the daemon keeps, and the references that cannot be foreign keys, checked
after the fact. Three kinds of check:

* **status log** (``wework_platform``): every account's status is the ``new_status`` of its
  last ``account_status_logs`` row, each row's ``old_status`` is the previous row's
  ``new_status``, no decision is logged twice in a row, and the daemon's
  ``accountd_supervision`` row agrees with the account's status (or, for an account with a
  row in ``accountd_supervision_journal`` not folded yet, its newest journaled status does);
* **orphans** inside one database, where partitioning made MySQL drop the foreign key
  (``message_records``, ``operation_logs``; docs/schema.md);
* **cross-database references**: ``tenant_id`` into ``saas_unified_core.tenants`` and
  ``account_metrics.account_id`` into ``wework_platform.wework_accounts``.

Every check is set-based SQL that works on SQLite and MariaDB and keeps nothing but a page of
ids in memory: a check inside one database is one query (run twice: a ``COUNT(*)`` and the first
`limit` ids). A cross-database check cannot join, so it walks the distinct referenced values
in keyset-paged chunks (`page_size`) and asks the other database which of them exist. The one
exception: while the supervision journal holds rows, the supervision check reads the journal
and the mismatching ids in full (at most the accounts of the last mass event).

Run against a live daemon, the result can lag a concurrent write by one statement; the checks
inside one database share one connection (one snapshot on InnoDB's REPEATABLE READ), and a
cross-database check reads the referencing rows *before* it looks up their targets, so a row
and its target created together never show up as a violation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from accountd.adapters.db import DATABASE_KEYS, open_databases
from accountd.adapters.repository import journal_entries
from accountd.adapters.schema import (
    account_metrics,
    account_status_logs,
    accountd_supervision,
    accountd_supervision_journal,
    file_resources,
    message_callbacks,
    message_records,
    message_tasks,
    message_templates,
    operation_logs,
    performance_stats,
    system_alerts,
    tenants,
    users,
    wework_accounts,
)
from accountd.errors import AccountdError

DEFAULT_LIMIT = 20
# Distinct referenced values per cross-database round trip: one IN (…) list of this many
# binds, far below SQLite's 32766-variable limit and MySQL's max_allowed_packet.
DEFAULT_PAGE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one check: how many rows violate it and the first few of their ids."""

    name: str
    description: str
    subject: str  # what `ids` are, e.g. "account_status_logs.id"
    violations: int
    ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.violations == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "description": self.description,
            "subject": self.subject,
            "violations": self.violations,
            "ids": list(self.ids),
        }


@dataclass(frozen=True, slots=True)
class VerifyReport:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    def get(self, name: str) -> Check:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [check.as_dict() for check in self.checks]}

    def __str__(self) -> str:
        width = max((len(c.name) for c in self.checks), default=0)
        lines = []
        for c in self.checks:
            if c.ok:
                lines.append(f"OK    {c.name}")
                continue
            noun = "violation" if c.violations == 1 else "violations"
            more = c.violations - len(c.ids)
            ids = ", ".join(c.ids) + (f" (and {more} more)" if more > 0 else "")
            lines.append(f"FAIL  {c.name:<{width}}  {c.violations} {noun}, {c.subject}: {ids}")
        failed = self.failed()
        if failed:
            lines.append("")
            lines.append("What the failed checks require:")
            lines.extend(f"  {c.name}: {c.description}" for c in failed)
            lines.append("")
            lines.append(f"{len(failed)} of {len(self.checks)} checks failed.")
        else:
            lines.append(f"All {len(self.checks)} checks passed.")
        return "\n".join(lines)


# --------------------------------------------------------------------------- single-database


@dataclass(frozen=True, slots=True)
class _QueryCheck:
    """A check answered by one query selecting the offending ids (column ``id``)."""

    name: str
    database: str
    description: str
    subject: str
    query: sa.Select[Any]


def _last_log_check() -> _QueryCheck:
    a, lg = wework_accounts, account_status_logs
    # Log ids are UUIDv7 (accountd.ids): the greatest id is the last row written.
    last = (
        select(lg.c.account_id, func.max(lg.c.id).label("last_id"))
        .group_by(lg.c.account_id)
        .subquery("last")
    )
    last_row = lg.alias("last_row")
    query = (
        select(a.c.id.label("id"))
        .select_from(
            a.outerjoin(last, last.c.account_id == a.c.id).outerjoin(
                last_row, last_row.c.id == last.c.last_id
            )
        )
        .where(
            sa.or_(
                sa.and_(last_row.c.id.is_(None), a.c.status.is_distinct_from("created")),
                sa.and_(
                    last_row.c.id.is_not(None), a.c.status.is_distinct_from(last_row.c.new_status)
                ),
            )
        )
    )
    return _QueryCheck(
        "status_matches_last_log",
        "platform",
        "wework_accounts.status equals the new_status of the account's last "
        "account_status_logs row (greatest id); an account without log rows must be in "
        "'created' (any other status with no log row is a change nobody recorded)",
        "wework_accounts.id",
        query,
    )


def _log_window() -> sa.Subquery:
    """Each log row next to the previous row of the same account (in id order)."""
    lg = account_status_logs

    def previous(column: sa.Column[Any], label: str) -> sa.Label[Any]:
        return func.lag(column).over(partition_by=lg.c.account_id, order_by=lg.c.id).label(label)

    return select(
        lg.c.id,
        lg.c.old_status,
        lg.c.new_status,
        lg.c.change_reason,
        previous(lg.c.id, "prev_id"),
        previous(lg.c.old_status, "prev_old"),
        previous(lg.c.new_status, "prev_new"),
        previous(lg.c.change_reason, "prev_reason"),
    ).subquery("w")


def _log_chain_check() -> _QueryCheck:
    w = _log_window()
    query = select(w.c.id).where(
        w.c.prev_id.is_not(None), w.c.old_status.is_distinct_from(w.c.prev_new)
    )
    return _QueryCheck(
        "log_chain",
        "platform",
        "each account_status_logs row's old_status equals the new_status of the previous "
        "row of the same account (a gap means a status change went unlogged)",
        "account_status_logs.id",
        query,
    )


def _duplicate_check() -> _QueryCheck:
    w = _log_window()
    query = select(w.c.id).where(
        w.c.prev_id.is_not(None),
        w.c.old_status.is_not_distinct_from(w.c.prev_old),
        w.c.new_status.is_not_distinct_from(w.c.prev_new),
        w.c.change_reason.is_not_distinct_from(w.c.prev_reason),
    )
    return _QueryCheck(
        "duplicate_decisions",
        "platform",
        "no two consecutive account_status_logs rows of one account record the same decision "
        "(same old_status, new_status and change_reason): the ids are the second copies",
        "account_status_logs.id",
        query,
    )


def _supervision_check() -> _QueryCheck:
    s, a = accountd_supervision, wework_accounts
    query = (
        select(s.c.account_id.label("id"))
        .select_from(s.outerjoin(a, a.c.id == s.c.account_id))
        .where(sa.or_(a.c.id.is_(None), s.c.status.is_distinct_from(a.c.status)))
    )
    return _QueryCheck(
        "supervision_matches_status",
        "platform",
        "accountd_supervision.status equals wework_accounts.status, and every supervision row "
        "belongs to an existing account",
        "accountd_supervision.account_id",
        query,
    )


def _orphan_check(
    database: str,
    child: sa.Table,
    column: str,
    parent: sa.Table,
    why: str,
) -> _QueryCheck:
    col = child.c[column]
    exists = select(sa.literal(1)).where(parent.c.id == col).exists()
    return _QueryCheck(
        f"{child.name}.{column}",
        database,
        f"{child.name}.{column} names an existing {parent.name}.id ({why})",
        f"{child.name}.id",
        select(child.c.id).where(col.is_not(None), ~exists),
    )


_PARTITIONED = "no foreign key: MySQL cannot partition a table that has one"


def _query_checks() -> list[_QueryCheck]:
    return [
        _last_log_check(),
        _log_chain_check(),
        _duplicate_check(),
        _supervision_check(),
        _orphan_check(
            "platform", message_callbacks, "message_record_id", message_records, _PARTITIONED
        ),
        _orphan_check("platform", message_records, "task_id", message_tasks, _PARTITIONED),
        _orphan_check("platform", message_records, "account_id", wework_accounts, _PARTITIONED),
        _orphan_check("core", operation_logs, "tenant_id", tenants, _PARTITIONED),
        _orphan_check("core", operation_logs, "user_id", users, _PARTITIONED),
    ]


async def _run_query_check(conn: AsyncConnection, spec: _QueryCheck, limit: int) -> Check:
    if spec.name == "supervision_matches_status":
        journaled = await _journaled_statuses(conn)
        if journaled:
            return await _supervision_check_with_journal(conn, spec, journaled, limit)
    found = spec.query.subquery("v")
    count = (await conn.execute(select(func.count()).select_from(found))).scalar_one()
    ids: list[str] = []
    if count and limit:
        sample = select(found.c.id).order_by(found.c.id).limit(limit)
        ids = [str(i) for i in (await conn.execute(sample)).scalars()]
    return Check(spec.name, spec.description, spec.subject, int(count), ids)


async def _journaled_statuses(conn: AsyncConnection) -> dict[str, str]:
    """The newest status per account in the supervision journal (rows not folded yet)."""
    j = accountd_supervision_journal
    latest: dict[str, str] = {}
    for (entries,) in await conn.execute(select(j.c.entries).order_by(j.c.id)):
        for row in journal_entries(entries):
            if "status" in row:  # an admin's pause has none
                latest[row["account_id"]] = row["status"]
    return latest


async def _supervision_check_with_journal(
    conn: AsyncConnection, spec: _QueryCheck, journaled: dict[str, str], limit: int
) -> Check:
    """`supervision_matches_status` while the journal holds rows: an account's supervision
    status is its newest journaled one if it has one (what the fold will write), else its
    accountd_supervision row's."""
    a = wework_accounts
    offenders = {str(i) for i in (await conn.execute(spec.query)).scalars() if i not in journaled}
    ids = list(journaled)
    found: dict[str, str] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        rows = await conn.execute(select(a.c.id, a.c.status).where(a.c.id.in_(chunk)))
        found.update((str(r[0]), str(r[1])) for r in rows)
    # A journaled account deleted since is no offender: the fold skips it, its row is gone.
    offenders.update(i for i, status in journaled.items() if i in found and found[i] != status)
    sample = sorted(offenders)[:limit]
    return Check(spec.name, spec.description, spec.subject, len(offenders), sample)


# --------------------------------------------------------------------------- cross-database


@dataclass(frozen=True, slots=True)
class _RefCheck:
    """``child.column`` (in `child_db`) must name a ``parent.id`` in `parent_db`."""

    child_db: str
    child: sa.Table
    column: str
    parent_db: str
    parent: sa.Table

    @property
    def name(self) -> str:
        return f"{self.child.name}.{self.column}"

    @property
    def description(self) -> str:
        return (
            f"{self.child.name}.{self.column} (when set) names an existing {self.parent.name}.id "
            f"in the {self.parent_db} database (across databases: no foreign key possible; "
            "values must match exactly)"
        )


_REF_CHECKS: tuple[_RefCheck, ...] = (
    _RefCheck("platform", wework_accounts, "tenant_id", "core", tenants),
    _RefCheck("platform", message_templates, "tenant_id", "core", tenants),
    _RefCheck("platform", message_tasks, "tenant_id", "core", tenants),
    _RefCheck("platform", file_resources, "tenant_id", "core", tenants),
    _RefCheck("analytics", account_metrics, "account_id", "platform", wework_accounts),
    _RefCheck("analytics", system_alerts, "tenant_id", "core", tenants),
    _RefCheck("analytics", performance_stats, "tenant_id", "core", tenants),
)


async def _run_ref_check(
    child_engine: AsyncEngine,
    parent_engine: AsyncEngine,
    spec: _RefCheck,
    *,
    limit: int,
    page_size: int,
) -> Check:
    col, child_id, parent_id = spec.child.c[spec.column], spec.child.c.id, spec.parent.c.id
    violations = 0
    ids: list[str] = []
    async with child_engine.connect() as child:
        # Keyset paging over the column's index; ``>= ''`` on the first page skips NULLs only.
        after: str | None = None
        while True:
            values = list(
                (
                    await child.execute(
                        select(col)
                        .distinct()
                        .where(col > after if after is not None else col >= "")
                        .order_by(col)
                        .limit(page_size)
                    )
                ).scalars()
            )
            if not values:
                break
            # A fresh connection, so the lookup sees at least what existed when `child` read.
            async with parent_engine.connect() as parent:
                found = set(
                    (await parent.execute(select(parent_id).where(parent_id.in_(values)))).scalars()
                )
            missing = [v for v in values if v not in found]
            if missing:
                where = col.in_(missing)
                count = (
                    await child.execute(select(func.count()).select_from(spec.child).where(where))
                ).scalar_one()
                violations += int(count)
                if len(ids) < limit:
                    sample = select(child_id).where(where).order_by(child_id)
                    rows = await child.execute(sample.limit(limit - len(ids)))
                    ids.extend(str(i) for i in rows.scalars())
            if len(values) < page_size:
                break
            after = values[-1]
    return Check(spec.name, spec.description, f"{spec.child.name}.id", violations, ids)


# --------------------------------------------------------------------------- entry point


async def verify(
    urls: Mapping[str, str],
    *,
    limit: int = DEFAULT_LIMIT,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> VerifyReport:
    """Check the three databases; `limit` offending ids are kept per check.

    Raises `AccountdError` when a database has no schema yet (run ``accountd db upgrade``) and
    lets ``SQLAlchemyError`` through when a database cannot be read.
    """
    if limit < 0:
        raise ValueError("limit must be 0 or more")
    if page_size < 1:
        raise ValueError("page_size must be at least 1")
    from accountd.adapters.migrate import current

    empty = [key for key, rev in (await current(urls)).items() if rev is None]
    if empty:
        raise AccountdError(
            f"database(s) {', '.join(empty)} have no schema: run `accountd db upgrade` first"
        )
    checks: list[Check] = []
    async with open_databases(urls) as dbs:
        specs = _query_checks()
        for key in DATABASE_KEYS:
            mine = [s for s in specs if s.database == key]
            if not mine:
                continue
            # One connection and one REPEATABLE READ transaction (one InnoDB snapshot) for all
            # checks of this database; the daemon's own engines use READ COMMITTED.
            engine = dbs.engines[key]
            if engine.dialect.name == "mysql":
                engine = engine.execution_options(isolation_level="REPEATABLE READ")
            async with engine.connect() as conn:
                checks.extend([await _run_query_check(conn, s, limit) for s in mine])
        for ref in _REF_CHECKS:
            checks.append(
                await _run_ref_check(
                    dbs.engines[ref.child_db],
                    dbs.engines[ref.parent_db],
                    ref,
                    limit=limit,
                    page_size=page_size,
                )
            )
    order = {s.name: i for i, s in enumerate(specs)}
    checks.sort(key=lambda c: order.get(c.name, len(order)))
    return VerifyReport(checks)


def check_names() -> Sequence[str]:
    """The names of all checks, in report order (for docs and tests)."""
    return [s.name for s in _query_checks()] + [r.name for r in _REF_CHECKS]
