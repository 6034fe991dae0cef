"""The multi-row statements of a transition batch, rendered as plain driver SQL.

`AccountRepository.apply_transitions` writes hundreds of accounts per transaction. Through
SQLAlchemy Core each of those statements is compiled per batch (``IN`` lists of varying length),
and every row's parameters pass through per-row bind processors; on aiomysql each parameter is
then escaped in Python. For a batch of 500 that Python work took longer than the server's (see
docs/benchmarks.md), so the hot statements are rendered here once per batch, straight into the
driver's own parameter style, and executed with ``exec_driver_sql``.

Every value is still a bound parameter (never spliced into the SQL text); only column and table
names, which are fixed here, are part of the text. `Binds` gives equal values one shared
parameter: in a mass change most columns repeat (the same old and new status, the same
``entered_at``, NULLs, zeros), so aiomysql escapes about four values per account instead of
twenty-odd.

Values must already be in their database form: `sql_time` for datetimes (the text form
SQLAlchemy's SQLite ``DateTime`` stores and MySQL accepts), JSON as a string, booleans as-is.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

# Columns of wework_accounts an `update_status` may set besides the status (BRIEF §3).
SETTABLE_WITH_STATUS = frozenset({"login_qr_code", "error_message"})

# The columns of the rows written here, in statement order.
LOG_COLUMNS = (
    "id",
    "account_id",
    "old_status",
    "new_status",
    "change_reason",
    "error_details",
    "operator_id",
)
# The supervision state the engine reads and writes (accountd_supervision without its keys).
SUPERVISION_FIELDS = (
    "status",
    "entered_at",
    "attempts",
    "qr_refreshes",
    "next_action",
    "next_action_at",
    "online_since",
    "offline_history",
    "paused",
    "paused_reason",
    "last_log_id",
    "epoch",
)
SUPERVISION_COLUMNS = ("account_id", *SUPERVISION_FIELDS, "updated_at")


def sql_time(value: dt.datetime | None) -> str | None:
    """A naive UTC datetime as ``YYYY-MM-DD HH:MM:SS.ffffff`` (what the DateTime type stores)."""
    return None if value is None else value.isoformat(" ", "microseconds")


class Binds:
    """Named parameters of one driver-level statement; equal values share one parameter."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        # aiomysql interpolates ``%(name)s`` (pyformat); sqlite3 binds ``:name``.
        self._open, self._close = ("%(", ")s") if dialect == "mysql" else (":", "")
        self.params: dict[str, Any] = {}
        # Numbers are keyed by (type, value): True == 1 == 1.0 would otherwise share a
        # parameter. A string (most values) is its own key: it equals no number and no tuple,
        # and the key tuple per value was a visible share of a batch's CPU.
        self._marks: dict[Any, str] = {}

    def __call__(self, value: Any) -> str:
        """The placeholder for ``value`` (hashable: str, int, float, bool or None)."""
        key = value if value.__class__ is str else (value.__class__, value)
        mark = self._marks.get(key)
        if mark is None:
            name = f"p{len(self.params)}"
            self.params[name] = value
            mark = self._marks[key] = self._open + name + self._close
        return mark

    def row(self, values: Iterable[Any]) -> str:
        """``(…, …)`` for one row. The loop of `__call__`, inlined: it runs ~20 times per
        account in a batch, and the call overhead was a visible share of the profile."""
        marks, params = self._marks, self.params
        out = []
        for value in values:
            key = value if value.__class__ is str else (value.__class__, value)
            mark = marks.get(key)
            if mark is None:
                name = f"p{len(params)}"
                params[name] = value
                mark = marks[key] = self._open + name + self._close
            out.append(mark)
        return "(" + ", ".join(out) + ")"


def update_status(
    b: Binds, ids: Sequence[str], expected: str, new: str, extra: Sequence[tuple[str, Any]]
) -> str:
    """The grouped compare-and-set: ``UPDATE … WHERE status = expected AND id IN (…)``.

    ``extra`` holds (column, value) pairs; the caller admits only whitelisted columns.
    """
    bad = [col for col, _ in extra if col not in SETTABLE_WITH_STATUS]
    if bad:
        raise ValueError(f"columns not settable with a status change: {bad}")
    sets = ", ".join([f"status = {b(new)}", *(f"{col} = {b(val)}" for col, val in extra)])
    in_list = ", ".join([b(i) for i in ids])
    where = f"{status_term(b.dialect)} = {b(expected)} AND id IN ({in_list})"
    # S608: the text holds fixed names and placeholders only; every value is a bound parameter.
    return f"UPDATE wework_accounts SET {sets} WHERE {where}"  # noqa: S608


def status_term(dialect: str) -> str:
    """``status`` as the grouped compare-and-set compares it, so that the ids are looked up by
    primary key.

    SQLite has no statistics unless ANALYZE ran, and then takes an equality on an indexed
    column for the more selective term: from five ids up it read ``idx_status`` instead, every
    account in that status (a million at scale), and a batch cost 0.3-0.5 s whatever its size
    (docs/benchmarks.md). The unary ``+`` keeps a term off its index (SQLite's documented way).
    MariaDB/MySQL have statistics and read the ids by primary key; there the ``+`` is left out.
    """
    return "status" if dialect == "mysql" else "+status"


def update_heartbeats(b: Binds, ids: Sequence[str], when: str) -> str:
    """One flush statement: ``last_heartbeat_at = when`` for ``ids``, never moved back."""
    at = b(when)
    in_list = ", ".join([b(i) for i in ids])
    return (
        f"UPDATE wework_accounts SET last_heartbeat_at = {at} "  # noqa: S608
        f"WHERE id IN ({in_list}) AND (last_heartbeat_at IS NULL OR last_heartbeat_at < {at})"
    )


def epoch_seconds(dialect: str, column: str) -> str:
    """SQL for a DATETIME/TIMESTAMP column as epoch seconds (a float, microseconds kept)."""
    if dialect == "mysql":
        # The session time zone is UTC (accountd.adapters.db), so stored values are UTC.
        return f"UNIX_TIMESTAMP({column}) + 0e0"
    # SQLite keeps 'YYYY-MM-DD HH:MM:SS[.ffffff]' text: whole seconds plus the fraction.
    return f"CAST(strftime('%s', {column}) AS REAL) + CAST(substr({column}, 20) AS REAL)"


def fresh_heartbeats(b: Binds, ids: Sequence[str], cutoff: str, dialect: str) -> str:
    """``id`` and ``last_heartbeat_at`` (epoch seconds) of those of ``ids`` whose heartbeat is
    ``cutoff`` or later."""
    in_list = ", ".join([b(i) for i in ids])
    beat = epoch_seconds(dialect, "last_heartbeat_at")
    return (
        f"SELECT id, {beat} FROM wework_accounts "  # noqa: S608
        f"WHERE id IN ({in_list}) AND last_heartbeat_at >= {b(cutoff)}"
    )


def insert_logs(b: Binds, rows: Iterable[Sequence[Any]]) -> str:
    """One multi-row INSERT of account_status_logs rows (values in `LOG_COLUMNS` order)."""
    values = ", ".join([b.row(r) for r in rows])
    return f"INSERT INTO account_status_logs ({', '.join(LOG_COLUMNS)}) VALUES {values}"  # noqa: S608


def upsert_supervision(
    b: Binds,
    rows: Iterable[Sequence[Any]],
    dialect: str,
    *,
    mysql_alias: bool = False,
    columns: Sequence[str] = SUPERVISION_COLUMNS,
) -> str:
    """One multi-row insert-or-update of accountd_supervision (values in ``columns`` order,
    ``account_id`` first; the other columns of an existing row are left as they are)."""
    if columns[0] != "account_id" or not set(columns) <= set(SUPERVISION_COLUMNS):
        raise ValueError(f"not supervision columns led by account_id: {list(columns)}")
    values = ", ".join([b.row(r) for r in rows])
    sql = f"INSERT INTO accountd_supervision ({', '.join(columns)}) VALUES {values}"  # noqa: S608
    rest = columns[1:]
    if dialect != "mysql":
        return f"{sql} ON CONFLICT (account_id) DO UPDATE SET " + ", ".join(
            f"{c} = excluded.{c}" for c in rest
        )
    if mysql_alias:
        # MySQL 8.0.20+ deprecates VALUES() here in favour of a row alias; MariaDB has no alias.
        return f"{sql} AS new ON DUPLICATE KEY UPDATE " + ", ".join(f"{c} = new.{c}" for c in rest)
    return f"{sql} ON DUPLICATE KEY UPDATE " + ", ".join(f"{c} = VALUES({c})" for c in rest)


__all__ = [
    "LOG_COLUMNS",
    "SETTABLE_WITH_STATUS",
    "SUPERVISION_COLUMNS",
    "SUPERVISION_FIELDS",
    "Binds",
    "epoch_seconds",
    "fresh_heartbeats",
    "insert_logs",
    "sql_time",
    "status_term",
    "update_heartbeats",
    "update_status",
    "upsert_supervision",
]
