"""Crash and restart: SIGKILL the daemon process mid-run and start it again.

The daemon runs as a real process (`accountd run`) against real databases; the worker simulator
is a real HTTP server in the test process. Accounts are caught mid-recovery when the daemon is
killed; the restarted daemon must resume exactly where the first one was (same attempt counter,
same deadline), leave no account stuck, and write no decision twice.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from accountd.adapters.db import Databases
from accountd.adapters.schema import accountd_supervision
from accountd.daemon.demo import _free_port
from accountd.daemon.lease import Lease, LeaseHeld
from tests.helpers import fast_simulator, write_config
from tests.test_e2e import legal_edges, logs, seed_accounts, statuses, wait_for


def spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCOUNTD_")}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "accountd.cli", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


async def wait_ready(log: Path, proc: subprocess.Popen[bytes], count: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"daemon exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if log.read_text().count("ready:") >= count:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"daemon not ready:\n{log.read_text()[-3000:]}")


async def supervision(dbs: Databases, ids: list[str]) -> dict[str, tuple[Any, ...]]:
    s = accountd_supervision
    async with dbs.platform.connect() as conn:
        rows = await conn.execute(
            select(
                s.c.account_id, s.c.status, s.c.attempts, s.c.entered_at, s.c.next_action_at
            ).where(s.c.account_id.in_(ids))
        )
        return {r[0]: tuple(r[1:]) for r in rows}


async def test_sigkill_mid_recovery_then_restart_resumes_exactly(
    migrated_urls: dict[str, str], tmp_path: Path
) -> None:
    token = secrets.token_urlsafe(24)
    port = _free_port()
    sim = fast_simulator(ingest_url=f"http://127.0.0.1:{port}", token=token, seed=3)
    worker = await sim.start()
    dbs = Databases(migrated_urls)
    config = write_config(tmp_path / "accountd.toml", migrated_urls, port, worker, token)
    log = tmp_path / "daemon.log"
    proc = spawn(config, log)
    try:
        ids = await seed_accounts(dbs, 30)
        await wait_ready(log, proc, 1)

        async def all_online() -> bool:
            return set((await statuses(dbs)).values()) == {"online"}

        await wait_for(all_online, 30, "every account online")

        # Resumes now fail (worker 5xx): dropped accounts will sit in `recovering` until its
        # 6 s deadline, which is where we kill the daemon.
        sim.update_rates({"p_5xx": 1.0})
        victims = ids[:5]
        for account_id in victims:
            sim.drop(account_id)

        async def recovering() -> bool:
            current = await statuses(dbs)
            return all(current[a] == "recovering" for a in victims)

        await wait_for(recovering, 20, "dropped accounts in recovering")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        before = await supervision(dbs, victims)
        assert all(row[0] == "recovering" and row[1] == 1 for row in before.values()), before

        proc = spawn(config, log)  # the lease of the killed process must not block this
        await wait_ready(log, proc, 2)
        after = await supervision(dbs, victims)
        assert after == before, "restart recomputed supervision state instead of restoring it"

        sim.update_rates({"p_5xx": 0.0})

        async def back_online() -> bool:
            current = await statuses(dbs)
            return all(current[a] == "online" for a in ids)

        await wait_for(back_online, 40, "every account online again after the restart")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        await sim.stop()

    history = await logs(dbs)
    current = await statuses(dbs)
    edges = legal_edges()
    for account_id in ids:
        rows = history[account_id]
        for (_, prev_new, _), (old, _, _) in itertools.pairwise(rows):
            assert old == prev_new, f"{account_id}: chain broken"
        for a, b in itertools.pairwise(rows):
            assert a != b, f"{account_id}: decision logged twice: {a}"
        assert all((o, n) in edges for o, n, _ in rows)
        assert current[account_id] == rows[-1][1]
    for account_id in victims:
        reasons = [r or "" for _, _, r in history[account_id]]
        # The attempt counter continued across the crash: the second recovery is attempt 2.
        assert any("attempt 2/" in r for r in reasons), reasons
    await dbs.dispose()


async def test_second_daemon_on_the_same_database_is_refused(migrated_urls: dict[str, str]) -> None:
    dbs = Databases(migrated_urls)
    try:
        first = Lease(dbs.platform, holder="host-a:1:aaaa")
        second = Lease(dbs.platform, holder="host-b:2:bbbb")
        assert await first.acquire() == 1
        with pytest.raises(LeaseHeld, match="host-a:1:aaaa"):
            await second.acquire()
        await first.release()
        assert await second.acquire() == 2  # the fencing epoch moves on
    finally:
        await dbs.dispose()
