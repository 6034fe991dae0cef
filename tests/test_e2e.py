"""End to end over real HTTP: the daemon, its ingest listener and the worker simulator on loopback.

Accounts are inserted as ``created`` rows the way other platform services do it; the daemon picks
them up, asks the simulated worker to open sessions, the simulator pushes events and heartbeats
to the daemon's ingest over HTTP, and the daemon commits every transition. Then some sessions
stop beating, and the daemon must take them offline, recover them and bring them back online.
Finally every account's log rows must form a legal path ending in its current status.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from accountd.adapters.db import Databases
from accountd.adapters.schema import account_status_logs, tenants, wework_accounts
from accountd.daemon.app import Daemon
from accountd.daemon.demo import _free_port
from accountd.daemon.simulator import WorkerSimulator
from accountd.settings import Settings
from accountd.statemachine import State, Trigger, all_pairs, is_legal, next_state
from tests.helpers import fast_simulator, stop_stack
from tests.helpers import start_daemon as start


def legal_edges() -> set[tuple[str, str]]:
    edges = set()
    for state, trigger in all_pairs():
        if trigger is Trigger.force or not is_legal(state, trigger):
            continue
        edges.add((str(state), str(next_state(state, trigger))))
    return edges


def fast_settings(
    state_dir: Path, urls: dict[str, str], port: int, worker: str, token: str
) -> Settings:
    return Settings.model_validate(
        {
            "state_dir": state_dir,
            "databases": urls,
            "ingest": {"listen": f"127.0.0.1:{port}", "token": token},
            "metrics": {"listen": "127.0.0.1:0"},
            "worker": {"url": worker, "timeout": 2},
            "heartbeat": {
                "timeout": 1.5,
                "persist_interval": 0.5,
                "flush_interval": 0.2,
                "db_poll_interval": 0.5,
                "startup_grace": 1.5,
            },
            "deadlines": {
                "initializing": 5,
                "waiting_qr": 5,
                "waiting_confirm": 5,
                "verifying": 5,
                "recovering": 5,
            },
            "recovery": {"base": 0.2, "cap": 1, "max_attempts": 8, "reset_after": 30},
            "supervisor": {"poll_interval": 0.3},
        }
    )


async def seed_accounts(dbs: Databases, n: int) -> list[str]:
    tenant = str(uuid.uuid4())
    async with dbs.core.begin() as conn:
        await conn.execute(insert(tenants).values(id=tenant, tenant_name="T", tenant_code="t"))
    ids = [str(uuid.uuid4()) for _ in range(n)]
    async with dbs.platform.begin() as conn:
        await conn.execute(
            insert(wework_accounts),
            [
                {
                    "id": i,
                    "tenant_id": tenant,
                    "account_name": f"e2e-{k}",
                    "wework_guid": f"e2e-guid-{k}-{i[:8]}",
                    "wework_secret": "s3cret-never-logged",
                    "status": "created",
                }
                for k, i in enumerate(ids)
            ],
        )
    return ids


async def statuses(dbs: Databases) -> dict[str, str]:
    async with dbs.platform.connect() as conn:
        rows = await conn.execute(select(wework_accounts.c.id, wework_accounts.c.status))
        return {r[0]: r[1] for r in rows}


async def logs(dbs: Databases) -> dict[str, list[tuple[str | None, str, str | None]]]:
    lg = account_status_logs
    out: dict[str, list[tuple[str | None, str, str | None]]] = {}
    async with dbs.platform.connect() as conn:
        rows = await conn.execute(
            select(lg.c.account_id, lg.c.old_status, lg.c.new_status, lg.c.change_reason).order_by(
                lg.c.account_id, lg.c.id
            )
        )
        for account_id, old, new, reason in rows:
            out.setdefault(account_id, []).append((old, new, reason))
    return out


async def offline_count(dbs: Databases, account_id: str) -> int:
    """How many times `account_id` was committed ``online`` → ``offline``.

    Tests that wait for a lost session watch this, not the status column: the simulator answers
    the recovery's resume at once, so offline, recovering and online again can all happen
    between two looks at the status on a loaded machine.
    """
    rows = (await logs(dbs)).get(account_id, [])
    return sum(1 for old, new, _ in rows if (old, new) == ("online", "offline"))


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
async def stack(migrated_urls: dict[str, str], tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    token = secrets.token_urlsafe(24)
    port = _free_port()
    sim = fast_simulator(ingest_url=f"http://127.0.0.1:{port}", token=token, seed=7)
    worker = await sim.start()
    dbs = Databases(migrated_urls)
    settings = fast_settings(tmp_path, migrated_urls, port, worker, token)
    daemon = Daemon(settings)
    ctx: dict[str, Any] = {"sim": sim, "dbs": dbs, "daemon": daemon, "settings": settings}
    try:
        yield ctx
    finally:
        await stop_stack(ctx)


async def test_accounts_reach_online_then_recover_after_heartbeats_stop(
    stack: dict[str, Any],
) -> None:
    dbs: Databases = stack["dbs"]
    sim: WorkerSimulator = stack["sim"]
    daemon: Daemon = stack["daemon"]
    ids = await seed_accounts(dbs, 20)
    task = stack["task"] = await start(daemon)

    async def all_online() -> bool:
        return set((await statuses(dbs)).values()) == {"online"}

    await wait_for(all_online, 30, "every account online")

    dropped = ids[:3]
    for account_id in dropped:
        assert sim.drop(account_id)

    async def recovered() -> bool:
        history = await logs(dbs)
        current = await statuses(dbs)
        for account_id in dropped:
            path = [(o, n) for o, n, _ in history.get(account_id, [])]
            if ("online", "offline") not in path or ("recovering", "online") not in path:
                return False
            if current[account_id] != "online":
                return False
        return True

    await wait_for(recovered, 30, "dropped sessions offline, recovered and online again")

    daemon.request_stop()
    assert await asyncio.wait_for(task, 30) == 0

    history = await logs(dbs)
    current = await statuses(dbs)
    edges = legal_edges()
    for account_id in ids:
        rows = history[account_id]
        assert rows[0][0] == "created"
        for (_, prev_new, _), (old, _, _) in itertools.pairwise(rows):
            assert old == prev_new, f"{account_id}: chain broken at {old}"
        for old, new, reason in rows:
            assert (old, new) in edges, f"{account_id}: {old}->{new} is not a legal edge"
            assert reason and reason.split(":")[0] in {t.value for t in Trigger}
        assert current[account_id] == rows[-1][1]
    for account_id in dropped:
        reasons = [r for _, _, r in history[account_id]]
        assert any(
            (r or "").startswith("heartbeat_lost: no heartbeat within 1.5s") for r in reasons
        )
    assert State.online.value == "online"
