"""Range partitions of the seed's time-series tables on MySQL/MariaDB.

``message_records`` (``created_at``) and ``account_metrics`` (``recorded_at``) are partitioned
by month, ``operation_logs`` (``created_at``) by quarter, with
``PARTITION BY RANGE (UNIX_TIMESTAMP(col))`` as in the seed. Partition ``pYYYYMM`` (monthly) or
``pYYYYqN`` (quarterly) holds rows from the first instant of its period up to, excluding, the
first instant of the next one; ``p_future`` takes everything later. The initial migration
creates the current period plus a few ahead; the upkeep job keeps splitting ``p_future`` to
stay ahead and drops partitions past retention.

Boundaries are computed in UTC and written as integer epoch seconds rather than
``UNIX_TIMESTAMP('2025-02-01')``: MySQL evaluates that literal in the *session* time zone, so
the same DDL run from a session that forgot ``SET time_zone = '+00:00'`` would shift every
boundary. An integer means the same instant whoever runs it (MySQL stores the evaluated
integer either way: it is what ``information_schema.PARTITIONS`` shows).

The functions that build SQL are pure; `list_partitions` and `partition_table` run it.
"""

from __future__ import annotations

import calendar
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

Period = Literal["month", "quarter"]

FUTURE_PARTITION = "p_future"


@dataclass(frozen=True, slots=True)
class PartitionedTable:
    """A table partitioned by time: where it lives, on which column, by which period."""

    database: str
    table: str
    column: str
    period: Period
    # Periods created ahead of the current one by the initial migration.
    ahead: int


PARTITIONED_TABLES: tuple[PartitionedTable, ...] = (
    PartitionedTable("core", "operation_logs", "created_at", "quarter", ahead=1),
    PartitionedTable("platform", "message_records", "created_at", "month", ahead=2),
    PartitionedTable("analytics", "account_metrics", "recorded_at", "month", ahead=2),
)


def partitioned_tables(database: str) -> tuple[PartitionedTable, ...]:
    return tuple(t for t in PARTITIONED_TABLES if t.database == database)


@dataclass(frozen=True, slots=True)
class Partition:
    """One period: rows with ``start <= col < end`` (UTC midnights)."""

    name: str
    start: date
    end: date

    @property
    def bound(self) -> int:
        """``VALUES LESS THAN`` of this partition: `end` as UTC epoch seconds."""
        return utc_epoch(self.end)


def utc_epoch(day: date) -> int:
    """Epoch seconds of midnight UTC at the start of `day` (what UNIX_TIMESTAMP gives in UTC)."""
    return calendar.timegm((day.year, day.month, day.day, 0, 0, 0))


def period_start(day: date, period: Period) -> date:
    """First day of the month or quarter containing `day`."""
    if period == "month":
        return day.replace(day=1)
    return date(day.year, 3 * ((day.month - 1) // 3) + 1, 1)


def next_period_start(start: date, period: Period) -> date:
    """First day of the period after the one starting at `start`."""
    months = 1 if period == "month" else 3
    index = start.year * 12 + (start.month - 1) + months
    return date(index // 12, index % 12 + 1, 1)


def partition_name(start: date, period: Period) -> str:
    """``p202501`` for January 2025; ``p2025q1`` for its first quarter."""
    if period == "month":
        return f"p{start.year:04d}{start.month:02d}"
    return f"p{start.year:04d}q{(start.month - 1) // 3 + 1}"


def partitions_from(day: date, period: Period, count: int) -> list[Partition]:
    """`count` consecutive partitions, the first one being the period containing `day`."""
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    out: list[Partition] = []
    start = period_start(day, period)
    for _ in range(count):
        end = next_period_start(start, period)
        out.append(Partition(partition_name(start, period), start, end))
        start = end
    return out


def initial_partitions(spec: PartitionedTable, today: date) -> list[Partition]:
    """The current period plus ``spec.ahead`` more: what the initial migration creates."""
    return partitions_from(today, spec.period, spec.ahead + 1)


def _ranges(partitions: Sequence[Partition]) -> str:
    for earlier, later in itertools.pairwise(partitions):
        if earlier.bound >= later.bound:
            raise ValueError(f"partitions out of order: {earlier.name} then {later.name}")
    parts = [f"PARTITION {p.name} VALUES LESS THAN ({p.bound})" for p in partitions]
    parts.append(f"PARTITION {FUTURE_PARTITION} VALUES LESS THAN MAXVALUE")
    return "(" + ", ".join(parts) + ")"


def partition_by_sql(spec: PartitionedTable, partitions: Sequence[Partition]) -> str:
    """``ALTER TABLE … PARTITION BY RANGE (UNIX_TIMESTAMP(col)) (…, p_future)``."""
    return (
        f"ALTER TABLE `{spec.table}` PARTITION BY RANGE (UNIX_TIMESTAMP(`{spec.column}`)) "
        + _ranges(partitions)
    )


def split_future_sql(spec: PartitionedTable, partitions: Sequence[Partition]) -> str:
    """Carve `partitions` out of ``p_future`` (they must all lie above the last bounded one)."""
    if not partitions:
        raise ValueError("nothing to split off p_future")
    return f"ALTER TABLE `{spec.table}` REORGANIZE PARTITION {FUTURE_PARTITION} INTO " + _ranges(
        partitions
    )


def drop_partitions_sql(spec: PartitionedTable, names: Sequence[str]) -> str:
    """``ALTER TABLE … DROP PARTITION a, b`` (deletes their rows: retention)."""
    if not names or FUTURE_PARTITION in names:
        raise ValueError(f"refusing to drop {list(names)!r}")
    return f"ALTER TABLE `{spec.table}` DROP PARTITION " + ", ".join(names)


@dataclass(frozen=True, slots=True)
class ExistingPartition:
    """A partition as ``information_schema`` reports it; `bound` is None for MAXVALUE."""

    name: str
    bound: int | None


async def list_partitions(conn: AsyncConnection, table: str) -> list[ExistingPartition]:
    """The partitions of `table` in the connection's current database, in order (MySQL only)."""
    result = await conn.execute(
        text(
            "SELECT PARTITION_NAME, PARTITION_DESCRIPTION FROM information_schema.PARTITIONS "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :table "
            "AND PARTITION_NAME IS NOT NULL ORDER BY PARTITION_ORDINAL_POSITION"
        ),
        {"table": table},
    )
    out: list[ExistingPartition] = []
    for name, description in result.all():
        bound = None if str(description).upper() == "MAXVALUE" else int(description)
        out.append(ExistingPartition(str(name), bound))
    return out


async def partition_table(
    conn: AsyncConnection, spec: PartitionedTable, today: date
) -> list[Partition]:
    """Partition an unpartitioned `spec.table` from `today`'s period on; return the partitions."""
    partitions = initial_partitions(spec, today)
    await conn.execute(text(partition_by_sql(spec, partitions)))
    return partitions
