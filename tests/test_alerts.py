"""Alerts in system_alerts, through a real supervisor, door and outbox on real databases."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from accountd.adapters.db import make_engine
from accountd.adapters.schema import account_metrics, accountd_supervision, system_alerts
from accountd.daemon.alerts import (
    ACCOUNT_ERROR,
    DATABASE_UNREACHABLE,
    MASS_OFFLINE,
    AlertKey,
    AlertManager,
    open_alert_id,
)
from accountd.daemon.app import Daemon
from accountd.daemon.door import Change
from accountd.daemon.outbox import Outbox
from accountd.daemon.policy import PolicyConfig
from accountd.daemon.protocol import ItemResult
from accountd.daemon.supervisor import Supervisor
from accountd.settings import Settings
from accountd.statemachine import State, Trigger
from tests.test_engine import Rig, events, open_rig, settle
from tests.test_monitoring import QUIET
from tests.test_outbox import Forwarder, Outage, wait_for


@pytest.fixture
async def rig(migrated_urls: dict[str, str]) -> AsyncIterator[Rig]:
    async with open_rig(migrated_urls) as r:
        yield r


@contextlib.asynccontextmanager
async def outbox_for(rig: Rig) -> AsyncIterator[Outbox]:
    outbox = Outbox({"analytics": rig.dbs.analytics})
    await outbox.start()
    try:
        yield outbox
    finally:
        await outbox.stop(grace=5.0)


async def alert_rows(rig: Rig) -> list[dict[str, Any]]:
    t = system_alerts
    async with rig.dbs.analytics.connect() as conn:
        rows = await conn.execute(select(t).order_by(t.c.created_at, t.c.alert_type))
        # created_at has whole seconds: an episode resolved and the next one raised within the
        # same second tie, and MariaDB returned them either way (a CI run, 2026-12-04). Of two
        # episodes of one alert, the resolved one is the older.
        return sorted(
            (dict(r._mapping) for r in rows),
            key=lambda r: (r["created_at"], r["alert_type"], r["resolved_at"] is None),
        )


async def landed(outbox: Outbox) -> None:
    await wait_for(lambda: outbox.pending() == 0)
    await asyncio.sleep(0.05)  # the last write's commit returns after it leaves the queue


async def started(
    rig: Rig, alerts: AlertManager, cfg: PolicyConfig = QUIET, **kwargs: Any
) -> Supervisor:
    sup = rig.supervisor(cfg, startup_grace=0, **kwargs)
    await sup.load()
    await alerts.load(rig.dbs.analytics)
    alerts.reconcile(sup.accounts)
    sup.listeners.append(alerts.on_transition)
    sup.group_listeners.append(alerts.on_group)
    await sup.start()
    return sup


async def fire(rig: Rig, sup: Supervisor, account_id: str, trigger: Trigger) -> None:
    """An admin-style change through the one door."""
    fut = sup.door.fire(Change(account_id, trigger, "test"))
    assert await asyncio.wait_for(fut, 30) is ItemResult.APPLIED
    await settle(sup, rig.clock)


async def test_account_entering_error_raises_one_alert_resolved_when_it_leaves(rig: Rig) -> None:
    (acc_id,) = await rig.insert([State.online], heartbeat=rig.clock.now())
    async with outbox_for(rig) as outbox:
        alerts = AlertManager(outbox, rig.clock)
        sup = await started(rig, alerts)
        await events(sup, rig.clock, [(acc_id, "fail", {"error": "kicked by WeCom"})])
        await landed(outbox)
        (row,) = await alert_rows(rig)
        key = AlertKey("account", acc_id, ACCOUNT_ERROR)
        assert row["id"] == open_alert_id(key)
        assert (row["alert_type"], row["alert_level"], row["status"]) == (
            "account_error",
            "error",
            "active",
        )
        assert (row["resource_type"], row["resource_id"], row["tenant_id"]) == (
            "account",
            acc_id,
            "t1",
        )
        assert "kicked by WeCom" in row["alert_content"]
        assert alerts.active_counts() == {"info": 0, "warning": 0, "error": 1, "critical": 0}

        # The condition seen again (the start-up check, a resume) adds nothing.
        alerts.refresh_account(sup.accounts[acc_id])
        alerts.reconcile(sup.accounts)
        await landed(outbox)
        assert len(await alert_rows(rig)) == 1 and alerts.raised == 1

        # Leaving error resolves it; the next episode is a new row.
        await fire(rig, sup, acc_id, Trigger.recover)
        await landed(outbox)
        (row,) = await alert_rows(rig)
        assert row["status"] == "resolved" and row["resolved_at"] is not None
        assert row["id"] != open_alert_id(key)
        assert alerts.active_counts()["error"] == 0
        await fire(rig, sup, acc_id, Trigger.fail)
        await landed(outbox)
        rows = await alert_rows(rig)
        assert [r["status"] for r in rows] == ["resolved", "active"]


async def test_restart_does_not_duplicate_an_active_alert(rig: Rig) -> None:
    (acc_id,) = await rig.insert([State.online], heartbeat=rig.clock.now())
    async with outbox_for(rig) as outbox:
        first = AlertManager(outbox, rig.clock)
        sup = await started(rig, first)
        await events(sup, rig.clock, [(acc_id, "fail", {"error": "boom"})])
        await landed(outbox)
        await rig.stop(sup)

        # The next daemon: loads the open alert, the account is still in error: nothing new.
        second = AlertManager(outbox, rig.clock)
        sup2 = await started(rig, second)
        assert second.active_counts()["error"] == 1
        assert second.raised == 0
        # A writer that did not load (the restart race) cannot add a second open row: the
        # open alert's id is its key's, and a primary key holds it once.
        blind = AlertManager(outbox, rig.clock)
        assert blind.raise_alert(AlertKey("account", acc_id, ACCOUNT_ERROR), "error", "again")
        await landed(outbox)
        assert [r["status"] for r in await alert_rows(rig)] == ["active"]

        # Someone resolved it in the database by hand: the next raise opens a fresh row.
        async with rig.dbs.analytics.begin() as conn:
            await conn.execute(update(system_alerts).values(status="resolved"))
        assert blind.raise_alert(AlertKey("account", acc_id, "flapping"), "warning", "x")
        blind._open.clear()
        assert blind.raise_alert(AlertKey("account", acc_id, ACCOUNT_ERROR), "error", "again")
        await landed(outbox)
        statuses = sorted((r["alert_type"], r["status"]) for r in await alert_rows(rig))
        assert statuses == [
            ("account_error", "active"),
            ("account_error", "resolved"),
            ("flapping", "active"),
        ]
        # Recovered while no daemon ran: the start-up reconcile resolves what cleared.
        await rig.stop(sup2)
        await rig.set_status(acc_id, State.online)
        third = AlertManager(outbox, rig.clock)
        await started(rig, third)
        await landed(outbox)
        assert third.active_counts() == {"info": 0, "warning": 0, "error": 0, "critical": 0}
        assert {r["status"] for r in await alert_rows(rig)} == {"resolved"}


async def test_paused_account_raises_no_alert(rig: Rig) -> None:
    paused, watched = await rig.insert([State.online, State.online], heartbeat=rig.clock.now())
    first = rig.supervisor(QUIET, startup_grace=0)
    await first.load()  # writes the supervision rows
    async with rig.dbs.platform.begin() as conn:
        s = accountd_supervision
        await conn.execute(update(s).where(s.c.account_id == paused).values(paused=True))
    async with outbox_for(rig) as outbox:
        alerts = AlertManager(outbox, rig.clock)
        sup = await started(rig, alerts)
        assert sup.accounts[paused].paused
        await events(sup, rig.clock, [(paused, "fail", {}), (watched, "fail", {})])
        await landed(outbox)
        assert [r["resource_id"] for r in await alert_rows(rig)] == [watched]
        assert alerts.active_counts()["error"] == 1


async def test_mass_offline_alert_once_per_episode_resolved_after_the_cooldown(rig: Rig) -> None:
    ids = await rig.insert([State.online] * 10, tenant="t9", heartbeat=rig.clock.now())
    cfg = PolicyConfig(
        heartbeat_timeout=10_000,
        base=10_000,
        cap=10_000,
        deadlines=QUIET.deadlines,
        mass_offline_ratio=0.3,
        mass_offline_cooldown=300,
    )
    async with outbox_for(rig) as outbox:
        alerts = AlertManager(outbox, rig.clock)
        sup = await started(rig, alerts, cfg)
        await events(sup, rig.clock, [(i, "logged_out", {}) for i in ids[:6]])
        await rig.clock.advance(30)
        await events(sup, rig.clock, [(i, "logged_out", {}) for i in ids[6:]])
        await landed(outbox)
        rows = await alert_rows(rig)
        assert [(r["alert_type"], r["alert_level"], r["resource_type"]) for r in rows] == [
            (MASS_OFFLINE, "critical", "tenant")
        ]
        assert rows[0]["resource_id"] == "t9" and rows[0]["tenant_id"] == "t9"
        assert alerts.expire() == 0  # still in the cool-down
        await rig.clock.advance(300)
        assert alerts.expire() == 1
        await landed(outbox)
        assert [r["status"] for r in await alert_rows(rig)] == ["resolved"]


async def test_database_unreachable_alert_after_the_grace_resolved_when_back(
    rig: Rig, migrated_urls: dict[str, str]
) -> None:
    async with outbox_for(rig) as outbox:
        alerts = AlertManager(outbox, rig.clock, db_down_after=30)
        forwarder = Forwarder("127.0.0.1", 9)  # refuses until opened; never opened here
        down = make_engine(f"mysql+aiomysql://u@127.0.0.1:{forwarder.port}/x")
        try:
            assert await alerts.check_databases({"platform": down}) == {"platform": False}
            await rig.clock.advance(29)
            await alerts.check_databases({"platform": down})
            assert alerts.raised == 0
            await rig.clock.advance(2)
            await alerts.check_databases({"platform": down})
            await alerts.check_databases({"platform": down})
            assert alerts.active_counts()["critical"] == 1
        finally:
            await down.dispose()
        await alerts.check_databases({"platform": rig.dbs.platform})
        await landed(outbox)
    rows = await alert_rows(rig)
    assert [(r["alert_type"], r["resource_id"], r["status"]) for r in rows] == [
        (DATABASE_UNREACHABLE, "platform", "resolved")
    ]


async def test_alert_lands_once_the_analytics_database_is_back(
    rig: Rig, migrated_urls: dict[str, str]
) -> None:
    (acc_id,) = await rig.insert([State.online], heartbeat=rig.clock.now())
    async with Outage(migrated_urls["analytics"]) as outage:
        failures: list[str] = []
        outbox = Outbox({"analytics": outage.engine}, on_error=failures.append)
        await outbox.start()
        try:
            alerts = AlertManager(outbox, rig.clock)
            sup = await started(rig, alerts)
            await events(sup, rig.clock, [(acc_id, "fail", {"error": "boom"})])
            await wait_for(lambda: len(failures) >= 2)
            assert outbox.pending() == 1
            await outage.restore()
            await landed(outbox)
        finally:
            await outbox.stop(grace=5.0)
    rows = await alert_rows(rig)
    assert [(r["alert_type"], r["resource_id"], r["status"]) for r in rows] == [
        (ACCOUNT_ERROR, acc_id, "active")
    ]


async def test_daemon_raises_at_start_and_snapshots_on_schedule(
    rig: Rig, migrated_urls: dict[str, str], tmp_path: Path
) -> None:
    """The wiring in `Daemon`: an account found in error gets its alert, snapshots run."""
    in_error, online = await rig.insert([State.error, State.online], heartbeat=rig.clock.now())
    settings = Settings.model_validate(
        {
            "state_dir": tmp_path,
            "databases": migrated_urls,
            "ingest": {"listen": "127.0.0.1:0", "token": "t" * 32},
            "metrics": {"listen": "127.0.0.1:0"},
            "worker": {"url": rig.worker.base_url, "timeout": 2},
            "heartbeat": {"timeout": 600},
            "monitoring": {"snapshot_interval": 0.3, "db_check_interval": 0.3},
        }
    )
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run())
    try:
        await wait_for(lambda: daemon.ready or task.done())
        assert daemon.alerts is not None and daemon.outbox is not None
        assert daemon.alerts.active_counts()["error"] == 1
        await wait_for(lambda: daemon.outbox is not None and daemon.outbox.written >= 1)

        async def snapshot_rows() -> set[tuple[str, str]]:
            m = account_metrics
            async with rig.dbs.analytics.connect() as conn:
                rows = await conn.execute(select(m.c.account_id, m.c.metric_type))
                return {(r[0], r[1]) for r in rows}

        for _ in range(200):
            if (online, "heartbeat_age_seconds") in await snapshot_rows():
                break
            await asyncio.sleep(0.05)
        assert (online, "heartbeat_age_seconds") in await snapshot_rows()
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
    rows = await alert_rows(rig)
    assert [(r["alert_type"], r["resource_id"], r["status"]) for r in rows] == [
        (ACCOUNT_ERROR, in_error, "active")
    ]
