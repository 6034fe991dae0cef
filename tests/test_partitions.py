"""Partition names and bounds (pure), and the DDL they make, run against MariaDB."""

from __future__ import annotations

import calendar
import itertools
from datetime import date, datetime

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from accountd.adapters.db import make_engine
from accountd.adapters.partitions import (
    FUTURE_PARTITION,
    PartitionedTable,
    drop_partitions_sql,
    list_partitions,
    partition_by_sql,
    partition_table,
    partitioned_tables,
    partitions_from,
    split_future_sql,
    utc_epoch,
)

MONTHLY = PartitionedTable("platform", "events", "created_at", "month", ahead=2)
QUARTERLY = PartitionedTable("core", "events", "created_at", "quarter", ahead=1)


def test_monthly_partitions_cross_the_year_end() -> None:
    parts = partitions_from(date(2025, 11, 17), "month", 3)
    assert [(p.name, p.start, p.end) for p in parts] == [
        ("p202511", date(2025, 11, 1), date(2025, 12, 1)),
        ("p202512", date(2025, 12, 1), date(2026, 1, 1)),
        ("p202601", date(2026, 1, 1), date(2026, 2, 1)),
    ]


def test_quarterly_partitions_start_at_the_quarter() -> None:
    parts = partitions_from(date(2025, 12, 31), "quarter", 2)
    assert [(p.name, p.start, p.end) for p in parts] == [
        ("p2025q4", date(2025, 10, 1), date(2026, 1, 1)),
        ("p2026q1", date(2026, 1, 1), date(2026, 4, 1)),
    ]


def test_bounds_are_utc_midnight_epoch_seconds() -> None:
    assert utc_epoch(date(2024, 2, 1)) == 1706745600  # 2024-02-01T00:00:00Z
    assert partitions_from(date(2024, 1, 5), "month", 1)[0].bound == 1706745600


@given(
    st.dates(min_value=date(1971, 1, 1), max_value=date(2099, 1, 1)),
    st.sampled_from(["month", "quarter"]),
    st.integers(min_value=1, max_value=30),
)
def test_partitions_are_contiguous_and_cover_the_day(day: date, period: str, count: int) -> None:
    parts = partitions_from(day, period, count)  # type: ignore[arg-type]
    assert parts[0].start <= day < parts[0].end
    months = 1 if period == "month" else 3
    for p in parts:
        assert p.start.day == 1 and (p.start.month - 1) % months == 0
        assert (p.end.year * 12 + p.end.month) - (p.start.year * 12 + p.start.month) == months
    for a, b in itertools.pairwise(parts):
        assert a.end == b.start and a.bound < b.bound
    assert len({p.name for p in parts}) == count


def test_seed_strategy_monthly_records_and_metrics_quarterly_logs() -> None:
    assert [(t.table, t.column, t.period) for t in partitioned_tables("platform")] == [
        ("message_records", "created_at", "month")
    ]
    assert [(t.table, t.column, t.period) for t in partitioned_tables("analytics")] == [
        ("account_metrics", "recorded_at", "month")
    ]
    assert [(t.table, t.column, t.period) for t in partitioned_tables("core")] == [
        ("operation_logs", "created_at", "quarter")
    ]


def test_partition_ddl_text() -> None:
    parts = partitions_from(date(2025, 1, 10), "month", 2)
    assert partition_by_sql(MONTHLY, parts) == (
        "ALTER TABLE `events` PARTITION BY RANGE (UNIX_TIMESTAMP(`created_at`)) ("
        f"PARTITION p202501 VALUES LESS THAN ({calendar.timegm((2025, 2, 1, 0, 0, 0))}), "
        f"PARTITION p202502 VALUES LESS THAN ({calendar.timegm((2025, 3, 1, 0, 0, 0))}), "
        "PARTITION p_future VALUES LESS THAN MAXVALUE)"
    )
    with pytest.raises(ValueError):
        partition_by_sql(MONTHLY, list(reversed(parts)))
    with pytest.raises(ValueError):
        split_future_sql(MONTHLY, [])
    with pytest.raises(ValueError):
        drop_partitions_sql(MONTHLY, [FUTURE_PARTITION])


@pytest.mark.parametrize("backend", ["mysql"], indirect=True)
async def test_partition_split_and_drop_on_mariadb(db_urls: dict[str, str]) -> None:
    engine = make_engine(db_urls["analytics"])
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "CREATE TABLE events (id INT NOT NULL, created_at TIMESTAMP NOT NULL, "
                    "PRIMARY KEY (id, created_at)) ENGINE=InnoDB"
                )
            )
            made = await partition_table(conn, MONTHLY, date(2025, 1, 31))
            assert [p.name for p in made] == ["p202501", "p202502", "p202503"]
            # Rows either side of a UTC month boundary (the session runs in UTC).
            rows = {
                1: datetime(2025, 1, 31, 23, 59, 59),
                2: datetime(2025, 2, 1, 0, 0, 0),
                3: datetime(2025, 4, 2, 0, 0, 0),
            }
            for i, at in rows.items():
                await conn.execute(
                    sa.text("INSERT INTO events VALUES (:i, :at)"), {"i": i, "at": at}
                )

            async def ids_in(name: str) -> list[int]:
                result = await conn.execute(
                    sa.text(f"SELECT id FROM events PARTITION ({name}) ORDER BY id")
                )
                return list(result.scalars())

            assert await ids_in("p202501") == [1]
            assert await ids_in("p202502") == [2]
            assert await ids_in(FUTURE_PARTITION) == [3]

            # What the upkeep job will do: split p_future ahead, drop past retention.
            ahead = partitions_from(date(2025, 4, 1), "month", 2)
            await conn.execute(sa.text(split_future_sql(MONTHLY, ahead)))
            assert await ids_in("p202504") == [3]
            await conn.execute(sa.text(drop_partitions_sql(MONTHLY, ["p202501"])))
            found = await list_partitions(conn, "events")
            assert [p.name for p in found] == [
                "p202502",
                "p202503",
                "p202504",
                "p202505",
                FUTURE_PARTITION,
            ]
            assert found[0].bound == utc_epoch(date(2025, 3, 1)) and found[-1].bound is None
            remaining = await conn.execute(sa.text("SELECT id FROM events ORDER BY id"))
            assert list(remaining.scalars()) == [2, 3]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("backend", ["mysql"], indirect=True)
async def test_quarterly_partitioning_on_mariadb(db_urls: dict[str, str]) -> None:
    engine = make_engine(db_urls["core"])
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "CREATE TABLE events (id INT NOT NULL, created_at TIMESTAMP NOT NULL, "
                    "PRIMARY KEY (id, created_at)) ENGINE=InnoDB"
                )
            )
            await partition_table(conn, QUARTERLY, date(2025, 5, 5))
            found = await list_partitions(conn, "events")
    finally:
        await engine.dispose()
    assert [(p.name, p.bound) for p in found] == [
        ("p2025q2", utc_epoch(date(2025, 7, 1))),
        ("p2025q3", utc_epoch(date(2025, 10, 1))),
        (FUTURE_PARTITION, None),
    ]
