"""Monitoring tables on real databases: account_metrics snapshots, the performance_stats rollup,
and partition upkeep (MariaDB: checked in information_schema.PARTITIONS)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text

from accountd.adapters.db import Databases
from accountd.adapters.partitions import (
    PARTITIONED_TABLES,
    ExistingPartition,
    list_partitions,
    partition_by_sql,
    partitions_from,
)
from accountd.adapters.schema import (
    account_metrics,
    account_status_logs,
    performance_stats,
    wework_accounts,
)
from accountd.daemon import partition_upkeep
from accountd.daemon.alerts import AlertManager
from accountd.daemon.monitoring import (
    Monitoring,
    Snapshots,
    due_days,
    last_rolled_up,
    rollup,
    rollup_day,
)
from accountd.daemon.outbox import Outbox
from accountd.daemon.policy import PolicyConfig
from accountd.ids import uuid7
from accountd.settings import Settings
from accountd.statemachine import State
from tests.test_engine import Rig, events, open_rig, settle

SPECS = {t.table: t for t in PARTITIONED_TABLES}
# Long timeouts, deadlines and backoff: only what a test does happens.
QUIET = PolicyConfig(
    heartbeat_timeout=10_000,
    base=10_000,
    cap=10_000,
    deadlines={
        s: 10_000.0
        for s in ("initializing", "waiting_qr", "waiting_confirm", "verifying", "recovering")
    },
)

# ---------------------------------------------------------------------------------- snapshots


@pytest.fixture
async def rig(migrated_urls: dict[str, str]) -> AsyncIterator[Rig]:
    async with open_rig(migrated_urls) as r:
        yield r


async def metric_rows(rig: Rig) -> list[dict[str, Any]]:
    m = account_metrics
    async with rig.dbs.analytics.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(select(m))]


async def test_snapshot_writes_the_selected_metric_types(rig: Rig) -> None:
    cfg = QUIET
    online_a, online_b, recovering = await rig.insert(
        [State.online, State.online, State.recovering], heartbeat=rig.clock.now()
    )
    (offline,) = await rig.insert([State.offline])
    sup = rig.supervisor(cfg, startup_grace=0)
    await sup.load()
    snaps = Snapshots(
        sup,
        rig.dbs.analytics,
        rig.clock,
        metrics=("heartbeat_age_seconds", "online_seconds", "recoveries", "transitions"),
        chunk=2,  # several chunks, as with a million accounts
    )
    sup.listeners.append(snaps.on_transition)
    await sup.start()
    await rig.clock.advance(100)
    await events(sup, rig.clock, [(recovering, "recovered", {})])
    await rig.clock.advance(50)
    await settle(sup, rig.clock)
    start = rig.clock.now()

    assert await snaps.snapshot() == 8
    rows = await metric_rows(rig)
    got = {(r["account_id"], r["metric_type"]): float(r["metric_value"]) for r in rows}
    assert got == {
        (online_a, "heartbeat_age_seconds"): 150.0,
        (online_b, "heartbeat_age_seconds"): 150.0,
        (recovering, "heartbeat_age_seconds"): 50.0,
        (online_a, "online_seconds"): 150.0,
        (online_b, "online_seconds"): 150.0,
        (recovering, "online_seconds"): 50.0,
        (recovering, "recoveries"): 1.0,
        (recovering, "transitions"): 1.0,
    }
    assert offline not in {r["account_id"] for r in rows}
    assert {r["recorded_at"] for r in rows} == {
        dt.datetime.fromtimestamp(start, dt.UTC).replace(tzinfo=None)
    }
    assert {r["metric_unit"] for r in rows if r["metric_type"] == "online_seconds"} == {"s"}

    # The next interval starts from zero: counters were reset, online time counts from `start`.
    await rig.clock.advance(30)
    sup.record_heartbeats([online_a], [dt.datetime.fromtimestamp(rig.clock.now(), dt.UTC)])
    assert await snaps.snapshot() == 6
    later = [r for r in await metric_rows(rig) if r["recorded_at"] > rows[0]["recorded_at"]]
    second = {(r["account_id"], r["metric_type"]): float(r["metric_value"]) for r in later}
    assert second[(online_a, "heartbeat_age_seconds")] == 0.0
    assert second[(online_b, "heartbeat_age_seconds")] == 180.0
    assert second[(online_a, "online_seconds")] == 30.0
    assert (recovering, "recoveries") not in second


def settings(**monitoring: Any) -> Settings:
    return Settings.model_validate({"monitoring": monitoring})


async def test_switched_off_parts_have_no_job(rig: Rig) -> None:
    sup = rig.supervisor()
    outbox = Outbox({"analytics": rig.dbs.analytics})
    engines = rig.dbs.engines
    on = Monitoring(settings(), engines, sup, AlertManager(outbox, rig.clock), rig.clock)
    assert [fn.__name__ for fn, _ in on.jobs()] == [
        "alert_checks",
        "snapshot",
        "rollup",
        "partition_upkeep",
    ]
    assert dict((fn.__name__, s) for fn, s in on.jobs())["snapshot"] == 300
    off = Monitoring(
        settings(snapshot_interval=0, rollup=False, partition_upkeep_interval=0, alerts=False),
        engines,
        sup,
        AlertManager(outbox, rig.clock, enabled=False),
        rig.clock,
    )
    assert off.jobs() == []
    off.attach()
    assert off.snapshots.on_transition not in sup.listeners


def test_bad_monitoring_settings_are_refused() -> None:
    from pydantic import ValidationError

    for bad in ({"rollup_time": "24:00"}, {"rollup_time": "7"}, {"snapshot_metrics": ["cpu"]}):
        with pytest.raises(ValidationError):
            settings(**bad)


# ------------------------------------------------------------------------------------- rollup

DAY = dt.date(2025, 3, 10)


def at(day_offset: int, hh: int, mm: int = 0, ss: int = 0) -> dt.datetime:
    return dt.datetime(DAY.year, DAY.month, DAY.day, hh, mm, ss) + dt.timedelta(days=day_offset)


async def build_day(dbs: Databases) -> None:
    """Hand-built accounts and log rows around DAY (see the expectations in the test)."""
    accounts = [
        ("acc-a", "t1", "online", at(-30, 0)),
        ("acc-b", "t1", "offline", at(-30, 0)),
        ("acc-c", "t2", "error", at(-30, 0)),
        ("acc-d", "t2", "online", at(0, 5)),
        ("acc-e", "t2", "created", at(-1, 0)),
        ("acc-f", "t1", "online", at(1, 10)),  # created after the day
    ]
    # Rows in commit order: ids are UUIDv7, increasing (created_at has whole seconds only).
    logs = [
        ("acc-a", "online", "offline", at(-1, 20)),
        ("acc-a", "offline", "recovering", at(0, 2)),
        ("acc-a", "recovering", "online", at(0, 3)),
        ("acc-a", "online", "offline", at(0, 12)),
        ("acc-a", "offline", "recovering", at(0, 12, 30)),
        ("acc-a", "recovering", "online", at(0, 13)),
        ("acc-d", "created", "initializing", at(0, 6)),
        ("acc-d", "initializing", "waiting_qr", at(0, 6, 1)),
        ("acc-d", "waiting_qr", "waiting_confirm", at(0, 6, 5)),
        ("acc-d", "waiting_confirm", "verifying", at(0, 6, 6)),
        ("acc-d", "verifying", "online", at(0, 6, 7)),
        # Exactly at the next midnight: belongs to the next day, so b was online all of DAY.
        ("acc-b", "online", "offline", at(1, 0)),
    ]
    async with dbs.platform.begin() as conn:
        await conn.execute(
            insert(wework_accounts),
            [
                {
                    "id": aid,
                    "tenant_id": tenant,
                    "account_name": aid,
                    "wework_guid": f"guid-{aid}",
                    "status": status,
                    "created_at": created,
                }
                for aid, tenant, status, created in accounts
            ],
        )
        await conn.execute(
            insert(account_status_logs),
            [
                {
                    "id": uuid7(),
                    "account_id": aid,
                    "old_status": old,
                    "new_status": new,
                    "change_reason": "test",
                    "created_at": when,
                }
                for aid, old, new, when in logs
            ],
        )


async def stats_table(dbs: Databases) -> dict[tuple[str | None, str], dict[str, Any]]:
    t = performance_stats
    async with dbs.analytics.connect() as conn:
        rows = (await conn.execute(select(t).where(t.c.stat_date == DAY))).all()
    out: dict[tuple[str | None, str], dict[str, Any]] = {}
    for r in rows:
        key = (r.tenant_id, r.metric_name)
        assert key not in out, f"two rows for {key}"
        out[key] = dict(r._mapping)
    return out


@pytest.fixture
async def dbs(migrated_urls: dict[str, str]) -> AsyncIterator[Databases]:
    d = Databases(migrated_urls)
    try:
        yield d
    finally:
        await d.dispose()


async def test_rollup_of_a_hand_built_day(dbs: Databases) -> None:
    await build_day(dbs)
    stats = await rollup_day(dbs.platform, DAY)
    t1, t2, platform = stats["t1"], stats["t2"], stats[None]
    # a: online 03:00-12:00 and 13:00-24:00 (20 h) of 24 h; b: online all day (its row is at
    # the next midnight); f did not exist yet.
    assert t1.online_seconds == 20 * 3600 + 86400
    assert t1.observed_seconds == 2 * 86400
    # c: in error all day; d: created at 06:00 (not supervised before), online from 06:07;
    # e: still `created` (not supervised).
    assert t2.online_seconds == 17 * 3600 + 53 * 60
    assert t2.observed_seconds == 86400 + 18 * 3600
    assert (t1.transitions, t1.recoveries, t1.recovery_attempts) == (5, 2, 2)
    assert (t2.transitions, t2.recoveries, t2.recovery_attempts) == (5, 0, 0)
    # a left online at 20:00 the day before (7 h outage), then 12:00-13:00 (1 h); d's first
    # login is no recovery.
    assert (t1.ttr_count, t1.ttr_min, t1.ttr_max) == (2, 3600.0, 7 * 3600.0)
    assert t1.mttr_seconds == 4 * 3600.0
    assert t2.mttr_seconds is None
    assert platform.transitions == 10
    assert platform.mttr_seconds == 4 * 3600.0
    assert platform.availability_percent == pytest.approx(
        100 * (t1.online_seconds + t2.online_seconds) / (t1.observed_seconds + t2.observed_seconds)
    )

    assert await rollup(dbs.platform, dbs.analytics, DAY) == 14
    first = await stats_table(dbs)
    assert first[("t1", "availability_percent")]["metric_value"] == Decimal("91.6667")
    assert first[("t2", "availability_percent")]["metric_value"] == Decimal("42.5794")
    assert first[(None, "availability_percent")]["metric_value"] == Decimal("68.7593")
    mttr = first[("t1", "mttr_seconds")]
    assert (mttr["metric_value"], mttr["metric_count"]) == (Decimal("14400.0000"), 2)
    assert (mttr["min_value"], mttr["max_value"]) == (Decimal("3600.0000"), Decimal("25200.0000"))
    assert ("t2", "mttr_seconds") not in first
    assert first[(None, "transitions")]["metric_value"] == Decimal("10.0000")
    assert await last_rolled_up(dbs.analytics) == DAY

    # Idempotent: a re-run replaces the rows, the NULL-tenant ones included.
    assert await rollup(dbs.platform, dbs.analytics, DAY) == 14
    again = await stats_table(dbs)
    assert {k: v["metric_value"] for k, v in again.items()} == {
        k: v["metric_value"] for k, v in first.items()
    }
    async with dbs.analytics.connect() as conn:
        n = (await conn.execute(select(func.count()).select_from(performance_stats))).scalar()
    assert n == 14


def test_due_days_wait_for_the_rollup_time_and_catch_up() -> None:
    ten_past = dt.time(0, 10)

    def ts(y: int, m: int, d: int, hh: int, mm: int) -> float:
        return dt.datetime(y, m, d, hh, mm, tzinfo=dt.UTC).timestamp()

    assert due_days(ts(2025, 3, 11, 0, 5), ten_past, None) == [dt.date(2025, 3, 9)]
    assert due_days(ts(2025, 3, 11, 0, 10), ten_past, None) == [dt.date(2025, 3, 10)]
    assert due_days(ts(2025, 3, 11, 0, 10), ten_past, dt.date(2025, 3, 10)) == []
    assert due_days(ts(2025, 3, 11, 6, 0), ten_past, dt.date(2025, 3, 8)) == [
        dt.date(2025, 3, 9),
        dt.date(2025, 3, 10),
    ]
    # Down for a month: the last 7 days are caught up, not thirty.
    month = due_days(ts(2025, 3, 11, 6, 0), ten_past, dt.date(2025, 2, 1))
    assert month[0] == dt.date(2025, 3, 4) and month[-1] == dt.date(2025, 3, 10)


# ---------------------------------------------------------------------------- partition upkeep


def test_plan_adds_ahead_from_the_last_bound_and_drops_past_retention() -> None:
    spec = SPECS["account_metrics"]
    existing = [
        ExistingPartition(p.name, p.bound) for p in partitions_from(dt.date(2024, 1, 1), "month", 3)
    ] + [ExistingPartition("p_future", None)]
    todo = partition_upkeep.plan(spec, existing, dt.date(2024, 6, 15), ahead=2, retention_days=90)
    assert [p.name for p in todo.add] == ["p202404", "p202405", "p202406", "p202407", "p202408"]
    assert todo.drop == ("p202401", "p202402")  # p202403 still has rows newer than 90 days
    with pytest.raises(partition_upkeep.UnexpectedLayout):
        partition_upkeep.plan(spec, existing[:-1], dt.date(2024, 6, 15), ahead=2, retention_days=1)


async def test_partition_upkeep_on_sqlite_is_not_applicable(dbs: Databases, backend: str) -> None:
    if backend != "sqlite":
        pytest.skip("SQLite only")
    results = await partition_upkeep.upkeep(
        dbs.engines, dt.date(2024, 6, 15), ahead=2, retention=Settings().retention.model_dump()
    )
    assert [(r.table, r.added, r.dropped) for r in results] == [
        ("operation_logs", [], []),
        ("message_records", [], []),
        ("account_metrics", [], []),
    ]
    assert all(r.skipped == "no partitions on sqlite" for r in results)


async def partitions(dbs: Databases, key: str, table: str) -> list[tuple[str, int | None]]:
    async with dbs.engines[key].connect() as conn:
        return [(p.name, p.bound) for p in await list_partitions(conn, table)]


async def test_partition_upkeep_adds_and_drops_on_mariadb(dbs: Databases, backend: str) -> None:
    if backend != "mysql":
        pytest.skip("partitions exist on MySQL/MariaDB only")
    metrics, oplogs = SPECS["account_metrics"], SPECS["operation_logs"]
    # Tables as an upkeep-less daemon would have left them in early 2024 / 2023.
    async with dbs.analytics.begin() as conn:
        await conn.execute(
            text(partition_by_sql(metrics, partitions_from(dt.date(2024, 1, 1), "month", 3)))
        )
        await conn.execute(
            insert(account_metrics),
            [
                {
                    "id": uuid7(),
                    "account_id": "a",
                    "metric_type": "m",
                    "metric_value": 1,
                    "recorded_at": when,
                }
                for when in (
                    dt.datetime(2024, 1, 15),
                    dt.datetime(2024, 3, 20),
                    dt.datetime(2024, 5, 2),
                )
            ],
        )
    async with dbs.core.begin() as conn:
        await conn.execute(
            text(partition_by_sql(oplogs, partitions_from(dt.date(2023, 1, 1), "quarter", 4)))
        )
    today = dt.date(2024, 6, 15)
    retention = {
        "account_metrics_days": 90,
        "message_records_days": 180,
        "operation_logs_days": 365,
    }
    results = await partition_upkeep.upkeep(dbs.engines, today, ahead=2, retention=retention)
    by_table = {r.table: r for r in results}
    assert by_table["account_metrics"].added == [
        "p202404",
        "p202405",
        "p202406",
        "p202407",
        "p202408",
    ]
    assert by_table["account_metrics"].dropped == ["p202401", "p202402"]
    assert by_table["operation_logs"].added == ["p2024q1", "p2024q2", "p2024q3", "p2024q4"]
    assert by_table["operation_logs"].dropped == ["p2023q1"]
    # message_records was partitioned from the real current month: nothing due in "2024".
    assert (by_table["message_records"].added, by_table["message_records"].dropped) == ([], [])

    assert await partitions(dbs, "analytics", "account_metrics") == [
        (p.name, p.bound) for p in partitions_from(dt.date(2024, 3, 1), "month", 6)
    ] + [("p_future", None)]
    assert await partitions(dbs, "core", "operation_logs") == [
        (p.name, p.bound) for p in partitions_from(dt.date(2023, 4, 1), "quarter", 7)
    ] + [("p_future", None)]
    # January's row went with its partition; May's row moved out of p_future into p202405.
    async with dbs.analytics.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT PARTITION_NAME, TABLE_ROWS FROM information_schema.PARTITIONS "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'account_metrics'"
            )
        )
        kept = (await conn.execute(select(account_metrics.c.recorded_at))).scalars().all()
    assert sorted(kept) == [dt.datetime(2024, 3, 20), dt.datetime(2024, 5, 2)]
    assert {name for name, _ in rows} >= {"p202403", "p202405", "p_future"}
    async with dbs.analytics.connect() as conn:
        in_may = await conn.execute(
            text("SELECT COUNT(*) FROM account_metrics PARTITION (p202405)")
        )
        assert in_may.scalar() == 1

    # Nothing left to do: a second run changes nothing.
    again = await partition_upkeep.upkeep(dbs.engines, today, ahead=2, retention=retention)
    assert all((r.added, r.dropped) == ([], []) for r in again)
