"""Keeping the range partitions of the time-series tables ahead and within retention (MySQL).

For each table of `accountd.adapters.partitions.PARTITIONED_TABLES` (``account_metrics``,
``message_records`` monthly; ``operation_logs`` quarterly):

- **ahead**: partitions exist up to the end of the period ``[retention] partitions_ahead``
  periods after the current one; missing ones are split off ``p_future`` in one ``REORGANIZE
  PARTITION`` starting right at the last bounded partition, so a daemon that was off for months
  fills the gap with one partition per period rather than one huge first partition;
- **retention**: partitions whose every row is older than ``[retention] <table>_days`` days (their
  upper bound is at or before today minus that many days) are dropped, which deletes their rows.

`plan` is pure (tests give it any "today"); `upkeep` reads ``information_schema.PARTITIONS`` and
runs the DDL. On SQLite there are no partitions: `upkeep` reports each table as not applicable.
The job is cheap when there is nothing to do (one ``information_schema`` query per table), so it
runs hourly by default and a daemon restarted often still keeps up.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from accountd.adapters.partitions import (
    FUTURE_PARTITION,
    PARTITIONED_TABLES,
    ExistingPartition,
    Partition,
    PartitionedTable,
    drop_partitions_sql,
    list_partitions,
    next_period_start,
    partition_name,
    partitions_from,
    period_start,
    split_future_sql,
    utc_epoch,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UpkeepPlan:
    add: tuple[Partition, ...]
    drop: tuple[str, ...]


@dataclass(slots=True)
class UpkeepResult:
    table: str
    added: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    skipped: str | None = None  # why nothing was done (SQLite, not partitioned, ...)


class UnexpectedLayout(ValueError):
    """The table's partitions are not what our migrations create; upkeep leaves it alone."""


def _day_of(epoch: int) -> dt.date:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).date()


def plan(
    spec: PartitionedTable,
    existing: Sequence[ExistingPartition],
    today: dt.date,
    *,
    ahead: int,
    retention_days: int,
) -> UpkeepPlan:
    """What to add (split off p_future) and drop so that ``today`` is covered as configured."""
    if not existing or existing[-1].name != FUTURE_PARTITION or existing[-1].bound is not None:
        raise UnexpectedLayout(f"{spec.table}: the last partition is not {FUTURE_PARTITION}")
    bounded = [p for p in existing[:-1] if p.bound is not None]
    if len(bounded) != len(existing) - 1:
        raise UnexpectedLayout(f"{spec.table}: MAXVALUE partition before {FUTURE_PARTITION}")
    wanted_end = partitions_from(today, spec.period, ahead + 1)[-1].end
    names = {p.name for p in existing}
    add: list[Partition] = []
    # Continue right after the last bounded partition (filling any gap), else from today.
    start = _day_of(bounded[-1].bound or 0) if bounded else period_start(today, spec.period)
    while start < wanted_end:
        # Aligned bounds (ours) give whole periods; a foreign, unaligned last bound gets a
        # first partition reaching to the next period start.
        end = next_period_start(period_start(start, spec.period), spec.period)
        name = partition_name(period_start(start, spec.period), spec.period)
        if name in names:
            raise UnexpectedLayout(f"{spec.table}: {name} exists but does not end at {start}")
        add.append(Partition(name, start, end))
        start = end
    cutoff = utc_epoch(today - dt.timedelta(days=retention_days))
    drop = tuple(p.name for p in bounded if p.bound is not None and p.bound <= cutoff)
    return UpkeepPlan(tuple(add), drop)


def retention_days(spec: PartitionedTable, retention: Mapping[str, int]) -> int:
    """``[retention] <table>_days`` for the table."""
    return int(retention[f"{spec.table}_days"])


async def upkeep(
    engines: Mapping[str, AsyncEngine],
    today: dt.date,
    *,
    ahead: int,
    retention: Mapping[str, int],
    tables: Sequence[PartitionedTable] = PARTITIONED_TABLES,
) -> list[UpkeepResult]:
    """Add and drop partitions of every partitioned table; one result per table.

    ``retention`` maps ``<table>_days`` to days (the `[retention]` section's fields).
    """
    results: list[UpkeepResult] = []
    for spec in tables:
        engine = engines[spec.database]
        result = UpkeepResult(spec.table)
        results.append(result)
        if engine.dialect.name != "mysql":
            result.skipped = f"no partitions on {engine.dialect.name}"
            continue
        async with engine.connect() as conn:
            existing = await list_partitions(conn, spec.table)
        if not existing:
            result.skipped = "not partitioned"
            log.warning("partition upkeep: %s is not partitioned; skipped", spec.table)
            continue
        try:
            todo = plan(
                spec,
                existing,
                today,
                ahead=ahead,
                retention_days=retention_days(spec, retention),
            )
        except UnexpectedLayout as exc:
            result.skipped = str(exc)
            log.error("partition upkeep: %s; left alone", exc)
            continue
        # DDL commits implicitly on MySQL; each statement stands alone. Add before dropping so
        # the table is never left without a partition for today's rows.
        if todo.add:
            async with engine.begin() as conn:
                await conn.execute(text(split_future_sql(spec, todo.add)))
            result.added = [p.name for p in todo.add]
            log.info("partition upkeep: %s: added %s", spec.table, ", ".join(result.added))
        if todo.drop:
            async with engine.begin() as conn:
                await conn.execute(text(drop_partitions_sql(spec, todo.drop)))
            result.dropped = list(todo.drop)
            log.info(
                "partition upkeep: %s: dropped %s (past %d days of retention)",
                spec.table,
                ", ".join(result.dropped),
                retention_days(spec, retention),
            )
    return results
