"""``accountd db verify`` on real databases: a clean world passes, each injected fault is named.

Every test builds the same small, consistent world through the real code paths (the
repository's compare-and-set transitions write the status log and supervision rows), then
breaks one thing with direct SQL and asserts that exactly the expected checks fail, each with
exactly the offending ids.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, insert, update
from sqlalchemy.ext.asyncio import AsyncConnection

from accountd.adapters.db import Databases
from accountd.adapters.repository import AccountRepository, Applied
from accountd.adapters.schema import (
    account_metrics,
    account_status_logs,
    accountd_supervision,
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
from accountd.adapters.verify import VerifyReport, check_names, verify
from accountd.ids import uuid7

REPO_ROOT = Path(__file__).resolve().parent.parent
NOW = dt.datetime(2025, 1, 15, 12, 0, 0)
LIFECYCLE = [
    ("created", "initializing", "start"),
    ("initializing", "waiting_qr", "qr_ready"),
    ("waiting_qr", "waiting_confirm", "scanned"),
    ("waiting_confirm", "verifying", "confirmed"),
    ("verifying", "online", "verified"),
]


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass
class World:
    dbs: Databases
    urls: dict[str, str]
    tenant: str
    user: str
    online: str  # account that went through the whole lifecycle (5 log rows)
    fresh: str  # account still in 'created', no log rows: valid
    task: str
    record: str


@pytest.fixture
async def world(migrated_urls: dict[str, str]) -> AsyncIterator[World]:
    dbs = Databases(migrated_urls)
    try:
        yield await build_world(dbs, migrated_urls)
    finally:
        await dbs.dispose()


async def build_world(dbs: Databases, urls: dict[str, str]) -> World:
    tenant, user = new_id(), new_id()
    async with dbs.core.begin() as conn:
        await conn.execute(
            insert(tenants).values(id=tenant, tenant_name="Acme", tenant_code="acme")
        )
        await conn.execute(
            insert(users).values(id=user, tenant_id=tenant, username="alice", password="x")
        )
        await conn.execute(
            insert(operation_logs),
            [
                {
                    "id": new_id(),
                    "tenant_id": tenant,
                    "user_id": user,
                    "operation_type": "login",
                    "resource_type": "user",
                    "status": "success",
                },
                # System operations have neither tenant nor user: not an orphan.
                {
                    "id": new_id(),
                    "tenant_id": None,
                    "user_id": None,
                    "operation_type": "upkeep",
                    "resource_type": "system",
                    "status": "success",
                },
            ],
        )
    online, fresh = new_id(), new_id()
    async with dbs.platform.begin() as conn:
        await conn.execute(
            insert(wework_accounts),
            [
                {
                    "id": acc,
                    "tenant_id": tenant,
                    "account_name": name,
                    "wework_guid": f"guid-{acc}",
                    "status": "created",
                }
                for acc, name in ((online, "online"), (fresh, "fresh"))
            ],
        )
    repo = AccountRepository(dbs.platform)
    for old, new, reason in LIFECYCLE:
        outcome = await repo.apply_transition(online, old, new, reason, supervision={})
        assert isinstance(outcome, Applied)
    template, task, record, file_id = new_id(), new_id(), new_id(), new_id()
    async with dbs.platform.begin() as conn:
        await conn.execute(
            insert(message_templates).values(
                id=template,
                tenant_id=tenant,
                template_name="hello",
                template_type="text",
                template_content={"text": "hi"},
            )
        )
        await conn.execute(
            insert(message_tasks).values(
                id=task,
                tenant_id=tenant,
                task_name="greet",
                task_type="single",
                account_id=online,
                template_id=template,
                message_content={"text": "hi"},
                recipients=["bob"],
            )
        )
        await conn.execute(insert(message_records).values(record_row(record, task, online)))
        await conn.execute(insert(message_callbacks).values(callback_row(record)))
        await conn.execute(
            insert(file_resources).values(
                id=file_id,
                tenant_id=tenant,
                file_name="a.png",
                file_type="image",
                file_size=1,
                file_path="/a.png",
            )
        )
    async with dbs.analytics.begin() as conn:
        await conn.execute(insert(account_metrics).values(metric_row(online)))
        await conn.execute(
            insert(system_alerts),
            [alert_row(tenant), alert_row(None)],  # NULL tenant: a system-wide alert
        )
        await conn.execute(insert(performance_stats).values(stat_row(tenant)))
    return World(dbs, urls, tenant, user, online, fresh, task, record)


def record_row(record_id: str, task: str, account: str) -> dict[str, Any]:
    return {
        "id": record_id,
        "task_id": task,
        "account_id": account,
        "recipient_id": "bob",
        "recipient_type": "user",
        "message_type": "text",
        "message_content": {"text": "hi"},
        "created_at": NOW,
    }


def callback_row(record_id: str) -> dict[str, Any]:
    return {
        "id": new_id(),
        "message_record_id": record_id,
        "callback_type": "delivery",
        "callback_data": {},
        "callback_time": NOW,
    }


def metric_row(account: str) -> dict[str, Any]:
    return {
        "id": new_id(),
        "account_id": account,
        "metric_type": "heartbeat_lag",
        "metric_value": 1,
        "recorded_at": NOW,
    }


def alert_row(tenant: str | None) -> dict[str, Any]:
    return {
        "id": new_id(),
        "alert_type": "offline",
        "alert_level": "warning",
        "alert_title": "t",
        "alert_content": "c",
        "tenant_id": tenant,
    }


def stat_row(tenant: str) -> dict[str, Any]:
    return {
        "id": new_id(),
        "stat_date": NOW.date(),
        "tenant_id": tenant,
        "metric_name": "online_accounts",
        "metric_value": 1,
    }


async def add_log(world: World, old: str | None, new: str, reason: str) -> str:
    """A log row for the online account, written after (greater UUIDv7 id than) all others."""
    log_id = uuid7()
    async with world.dbs.platform.begin() as conn:
        await conn.execute(
            insert(account_status_logs).values(
                id=log_id,
                account_id=world.online,
                old_status=old,
                new_status=new,
                change_reason=reason,
            )
        )
    return log_id


async def foreign_keys(conn: AsyncConnection, on: bool) -> None:
    if conn.dialect.name == "sqlite":
        await conn.exec_driver_sql(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    else:
        await conn.exec_driver_sql(f"SET FOREIGN_KEY_CHECKS={1 if on else 0}")


def failures(report: VerifyReport) -> dict[str, list[str]]:
    return {check.name: check.ids for check in report.failed()}


# --------------------------------------------------------------------------- clean


async def test_clean_world_passes_every_check(world: World) -> None:
    report = await verify(world.urls)
    assert report.ok, str(report)
    assert [c.name for c in report.checks] == list(check_names())
    assert all(c.violations == 0 and c.ids == [] for c in report.checks)
    text = str(report)
    assert "FAIL" not in text
    assert f"All {len(report.checks)} checks passed." in text


async def test_unmigrated_database_is_refused(db_urls: dict[str, str]) -> None:
    from accountd.errors import AccountdError

    with pytest.raises(AccountdError, match="accountd db upgrade"):
        await verify(db_urls)


# --------------------------------------------------------------------------- status log


async def test_status_changed_without_log_row(world: World) -> None:
    async with world.dbs.platform.begin() as conn:
        await conn.execute(
            update(wework_accounts)
            .where(wework_accounts.c.id == world.online)
            .values(status="offline")
        )
        await conn.execute(
            update(accountd_supervision)
            .where(accountd_supervision.c.account_id == world.online)
            .values(status="offline")
        )
    report = await verify(world.urls)
    assert not report.ok
    assert failures(report) == {"status_matches_last_log": [world.online]}
    line = next(ln for ln in str(report).splitlines() if "status_matches_last_log" in ln)
    assert line.startswith("FAIL") and world.online in line and "1 violation" in line


async def test_account_out_of_created_without_any_log_row(world: World) -> None:
    async with world.dbs.platform.begin() as conn:
        await conn.execute(
            update(wework_accounts)
            .where(wework_accounts.c.id == world.fresh)
            .values(status="online")
        )
    report = await verify(world.urls)
    assert failures(report) == {"status_matches_last_log": [world.fresh]}


async def test_broken_chain_names_the_row_after_the_gap(world: World) -> None:
    # The last row says online; this one claims to come from waiting_qr (and ends in online, so
    # the account's status still matches its last row: only the chain is broken).
    bad = await add_log(world, "waiting_qr", "online", "verified again")
    report = await verify(world.urls)
    assert failures(report) == {"log_chain": [bad]}


async def test_duplicated_log_row_is_a_duplicate_decision(world: World) -> None:
    dup = await add_log(world, "verifying", "online", "verified")
    report = await verify(world.urls)
    # The copy also breaks the chain: its old_status is not the previous row's new_status.
    assert failures(report) == {"duplicate_decisions": [dup], "log_chain": [dup]}


async def test_supervision_row_disagreeing_with_status(world: World) -> None:
    async with world.dbs.platform.begin() as conn:
        await conn.execute(
            update(accountd_supervision)
            .where(accountd_supervision.c.account_id == world.online)
            .values(status="recovering")
        )
    report = await verify(world.urls)
    assert failures(report) == {"supervision_matches_status": [world.online]}


async def test_supervision_row_of_a_missing_account(world: World) -> None:
    ghost = new_id()
    async with world.dbs.platform.connect() as conn:
        await foreign_keys(conn, on=False)
        try:
            await conn.execute(
                insert(accountd_supervision).values(
                    account_id=ghost, status="online", entered_at=NOW, updated_at=NOW
                )
            )
            await conn.commit()
        finally:
            await foreign_keys(conn, on=True)
    report = await verify(world.urls)
    assert failures(report) == {"supervision_matches_status": [ghost]}


# --------------------------------------------------------------------------- orphans


async def test_orphan_callback(world: World) -> None:
    row = callback_row(new_id())
    async with world.dbs.platform.begin() as conn:
        await conn.execute(insert(message_callbacks).values(row))
    report = await verify(world.urls)
    assert failures(report) == {"message_callbacks.message_record_id": [row["id"]]}


async def test_orphan_message_record_task_and_account(world: World) -> None:
    no_task, no_account = new_id(), new_id()
    async with world.dbs.platform.begin() as conn:
        await conn.execute(
            insert(message_records),
            [record_row(no_task, new_id(), world.online), record_row(no_account, world.task, "x")],
        )
    report = await verify(world.urls)
    assert failures(report) == {
        "message_records.task_id": [no_task],
        "message_records.account_id": [no_account],
    }


async def test_orphan_operation_log_user(world: World) -> None:
    log_id = new_id()
    async with world.dbs.core.begin() as conn:
        await conn.execute(
            insert(operation_logs).values(
                id=log_id,
                tenant_id=world.tenant,
                user_id=new_id(),
                operation_type="login",
                resource_type="user",
                status="failed",
            )
        )
    report = await verify(world.urls)
    assert failures(report) == {"operation_logs.user_id": [log_id]}


# --------------------------------------------------------------------------- cross-database


async def test_account_with_tenant_missing_from_core(world: World) -> None:
    stray = new_id()
    async with world.dbs.platform.begin() as conn:
        await conn.execute(
            insert(wework_accounts).values(
                id=stray, tenant_id=new_id(), account_name="stray", wework_guid="guid-stray"
            )
        )
    report = await verify(world.urls)
    assert failures(report) == {"wework_accounts.tenant_id": [stray]}


async def test_analytics_references_into_platform_and_core(world: World) -> None:
    metric, alert, stat = metric_row(new_id()), alert_row(new_id()), stat_row(new_id())
    async with world.dbs.analytics.begin() as conn:
        await conn.execute(insert(account_metrics).values(metric))
        await conn.execute(insert(system_alerts).values(alert))
        await conn.execute(insert(performance_stats).values(stat))
    report = await verify(world.urls)
    assert failures(report) == {
        "account_metrics.account_id": [metric["id"]],
        "system_alerts.tenant_id": [alert["id"]],
        "performance_stats.tenant_id": [stat["id"]],
    }


async def test_deleting_a_tenant_is_found_across_pages_and_counted_in_full(world: World) -> None:
    # Seven missing tenants (plus the real one) over pages of two distinct values each; the
    # count covers every offending row and the sample stops at the limit, smallest ids first
    # within each page.
    strays = sorted(new_id() for _ in range(7))
    async with world.dbs.platform.begin() as conn:
        await conn.execute(
            insert(message_templates),
            [
                {
                    "id": stray,
                    "tenant_id": new_id(),
                    "template_name": "t",
                    "template_type": "text",
                    "template_content": {},
                }
                for stray in strays
            ],
        )
    report = await verify(world.urls, limit=3, page_size=2)
    check = report.get("message_templates.tenant_id")
    assert check.violations == 7
    assert len(check.ids) == 3 and set(check.ids) <= set(strays)
    assert failures(report).keys() == {"message_templates.tenant_id"}
    assert "(and 4 more)" in str(report)
    # Deleting the world's tenant orphans everything that names it, in every database.
    async with world.dbs.core.begin() as conn:
        await conn.execute(delete(operation_logs).where(operation_logs.c.user_id == world.user))
        await conn.execute(delete(users))
        await conn.execute(delete(tenants))
    report = await verify(world.urls, page_size=2)
    assert set(failures(report)) == {
        "wework_accounts.tenant_id",
        "message_templates.tenant_id",
        "message_tasks.tenant_id",
        "file_resources.tenant_id",
        "system_alerts.tenant_id",
        "performance_stats.tenant_id",
    }
    assert sorted(report.get("wework_accounts.tenant_id").ids) == sorted(
        [world.online, world.fresh]
    )
    assert report.get("message_templates.tenant_id").violations == 8


# --------------------------------------------------------------------------- CLI


async def run_cli(world: World, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    config = tmp_path / "accountd.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n\n[databases]\n'
        + "".join(f'{key} = "{url}"\n' for key, url in world.urls.items()),
        encoding="utf-8",
    )
    # The developer's own ACCOUNTD_* settings must not redirect the child to other databases.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCOUNTD_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "accountd.cli",
        "db",
        "verify",
        "--config",
        str(config),
        *args,
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_exits_0_when_clean_and_1_naming_the_offender(
    world: World, tmp_path: Path
) -> None:
    status, out, err = await run_cli(world, tmp_path)
    assert (status, err) == (0, ""), out + err
    assert "All " in out and "FAIL" not in out

    row = callback_row(new_id())
    async with world.dbs.platform.begin() as conn:
        await conn.execute(insert(message_callbacks).values(row))
    status, out, err = await run_cli(world, tmp_path)
    assert status == 1, out + err
    fail_lines = [ln for ln in out.splitlines() if ln.startswith("FAIL")]
    assert len(fail_lines) == 1
    assert "message_callbacks.message_record_id" in fail_lines[0] and row["id"] in fail_lines[0]

    status, out, _ = await run_cli(world, tmp_path, "--json")
    assert status == 1
    data = json.loads(out)
    assert data["ok"] is False
    (failed,) = [c for c in data["checks"] if not c["ok"]]
    assert failed["name"] == "message_callbacks.message_record_id"
    assert failed["ids"] == [row["id"]] and failed["violations"] == 1


async def test_cli_usage_error_exits_2(world: World, tmp_path: Path) -> None:
    status, _, err = await run_cli(world, tmp_path, "--limit", "0")
    assert status == 2 and "--limit" in err
