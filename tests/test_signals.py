"""Signals on a real daemon process: SIGTERM drains, SIGHUP reloads what can change live.

`accountd run` runs as a subprocess against real databases (SQLite; MariaDB too when
``ACCOUNTD_TEST_MYSQL_URL`` is set), the worker simulator is a real HTTP server in the test
process, and the signals are real ``kill(2)``s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import insert, select

from accountd.adapters.db import Databases
from accountd.adapters.schema import wework_accounts
from accountd.adapters.verify import verify
from accountd.daemon.demo import _free_port
from accountd.daemon.simulator import WorkerSimulator
from tests.helpers import fast_simulator
from tests.test_e2e import logs, offline_count, seed_accounts, statuses, wait_for

# Fast timings so that a whole lifecycle takes a second or two.
BASE_CONFIG: dict[str, dict[str, Any]] = {
    "worker": {"timeout": 1},
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
    "recovery": {"base": 0.2, "cap": 1},
    "supervisor": {"poll_interval": 0.3, "shutdown_timeout": 10},
}


def render_toml(data: Mapping[str, Any]) -> str:
    """Our config is a top-level key or two and one level of tables: enough TOML for it."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    for name, table in data.items():
        if isinstance(table, Mapping):
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


@dataclass
class Rig:
    """One daemon process with its config, log, databases and simulated worker."""

    tmp: Path
    urls: dict[str, str]
    sim: WorkerSimulator
    worker_url: str
    port: int
    token: str
    dbs: Databases
    config_path: Path
    log_path: Path
    # tmp_path can be longer than a unix socket path may be (107 bytes): a short directory.
    socket_dir: Path
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def config(self, **sections: Mapping[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = {"state_dir": str(self.tmp)}
        base = {
            **{k: dict(v) for k, v in BASE_CONFIG.items()},
            "databases": dict(self.urls),
            "ingest": {"listen": f"127.0.0.1:{self.port}", "token": self.token},
            "metrics": {"listen": "127.0.0.1:0"},
            "control": {"socket": str(self.socket_dir / "control.sock")},
        }
        base["worker"]["url"] = self.worker_url
        for name, table in (*self.overrides.items(), *sections.items()):
            base.setdefault(name, {}).update(table)
        data.update(base)
        return data

    def write_config(self, **sections: Mapping[str, Any]) -> None:
        self.config_path.write_text(render_toml(self.config(**sections)))

    def spawn(
        self, env: Mapping[str, str] | None = None, prefix: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        """Start `accountd run`; `prefix` runs first and must exec the command after it."""
        clean = {k: v for k, v in os.environ.items() if not k.startswith("ACCOUNTD_")}
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            clean.pop(key, None)
        clean.update(env or {})
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    *prefix,
                    sys.executable,
                    "-m",
                    "accountd.cli",
                    "run",
                    "--config",
                    str(self.config_path),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=clean,
            )
        return self.proc

    def log(self) -> str:
        return self.log_path.read_text()

    async def wait_log(self, needle: str, count: int = 1, timeout: float = 30) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(needle) >= count:
                return
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            await asyncio.sleep(0.05)
        pytest.fail(f"no {needle!r} (x{count}) in the daemon's log:\n{self.log()[-4000:]}")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(sig)

    async def exit_status(self, timeout: float) -> int:
        """Wait (without blocking the loop the simulator runs on) for the process to end."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"daemon still running after {timeout}s:\n{self.log()[-4000:]}")
            await asyncio.sleep(0.05)
        return self.proc.returncode


@contextlib.asynccontextmanager
async def open_rig(urls: dict[str, str], tmp_path: Path) -> AsyncIterator[Rig]:
    """A simulated worker and database handles; the daemon is spawned by the test."""
    token = secrets.token_urlsafe(24)
    port = _free_port()
    sim = fast_simulator(
        ingest_url=f"http://127.0.0.1:{port}", token=token, seed=11, scan_latency_max=2.0
    )
    worker_url = await sim.start()
    dbs = Databases(urls)
    r = Rig(
        tmp=tmp_path,
        urls=urls,
        sim=sim,
        worker_url=worker_url,
        port=port,
        token=token,
        dbs=dbs,
        config_path=tmp_path / "accountd.toml",
        log_path=tmp_path / "daemon.log",
        socket_dir=Path(tempfile.mkdtemp(prefix="accountd-", dir="/tmp")),
    )
    try:
        yield r
    finally:
        shutil.rmtree(r.socket_dir, ignore_errors=True)
        if r.proc is not None and r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait(10)
        await sim.stop()
        await dbs.dispose()


@pytest.fixture
async def rig(migrated_urls: dict[str, str], tmp_path: Path) -> AsyncIterator[Rig]:
    async with open_rig(migrated_urls, tmp_path) as r:
        yield r


async def heartbeat_columns(dbs: Databases) -> dict[str, Any]:
    a = wework_accounts
    async with dbs.platform.connect() as conn:
        rows = await conn.execute(select(a.c.id, a.c.last_heartbeat_at))
        return {r[0]: r[1] for r in rows}


async def add_account(dbs: Databases) -> str:
    """One more ``created`` row, in the tenant of the accounts already there."""
    a = wework_accounts
    account_id = str(uuid.uuid4())
    async with dbs.platform.begin() as conn:
        tenant = (await conn.execute(select(a.c.tenant_id).limit(1))).scalar_one()
        await conn.execute(
            insert(a).values(
                id=account_id,
                tenant_id=tenant,
                account_name="late",
                wework_guid=f"late-{account_id[:8]}",
                wework_secret="s3cret",
                status="created",
            )
        )
    return account_id


async def healthz(port: int) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/healthz", timeout=aiohttp.ClientTimeout(2)) as resp,
    ):
        return resp.status


async def time_until_offline(rig: Rig, account_id: str, limit: float) -> float:
    """Stop `account_id`'s heartbeats; seconds until the daemon commits it ``offline``."""
    before = await offline_count(rig.dbs, account_id)
    assert rig.sim.drop(account_id)
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if await offline_count(rig.dbs, account_id) > before:
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    pytest.fail(
        f"{account_id} not taken offline {limit}s after its heartbeats stopped; daemon log tail:\n"
        + rig.log()[-8000:]
    )


# --------------------------------------------------------------------------- SIGTERM


async def test_sigterm_during_a_burst_drains_flushes_heartbeats_and_exits_0(rig: Rig) -> None:
    # Heartbeats reach the database only through the final flush: the periodic one never runs.
    rig.overrides = {"heartbeat": {"flush_interval": 3600, "persist_interval": 0.1}}
    rig.write_config()
    ids = await seed_accounts(rig.dbs, 300)
    rig.spawn()
    await rig.wait_log("ready:")

    async def burst_under_way() -> bool:
        return list((await statuses(rig.dbs)).values()).count("online") >= 30

    await wait_for(burst_under_way, 30, "the first accounts online", interval=0.02)
    # Online for a second by the time SIGTERM lands: their heartbeats are in memory only.
    settled = [a for a, s in (await statuses(rig.dbs)).items() if s == "online"]
    await asyncio.sleep(1.0)
    at_stop = await statuses(rig.dbs)
    assert set(at_stop.values()) != {"online"}, "no transition left in flight to interrupt"
    assert all(v is None for v in (await heartbeat_columns(rig.dbs)).values())

    started = time.monotonic()
    rig.signal(signal.SIGTERM)
    assert await rig.exit_status(30) == 0, rig.log()[-4000:]
    assert time.monotonic() - started < 20  # shutdown_timeout 10 + a few seconds per service
    assert "shutting down" in rig.log()

    # Nothing half-written: every status has its log row, supervision matches, chains hold.
    report = await verify(rig.urls)
    assert report.ok, report
    current, history = await statuses(rig.dbs), await logs(rig.dbs)
    for account_id in ids:
        rows = history.get(account_id, [])
        assert current[account_id] == (rows[-1][1] if rows else "created")
    # The heartbeats the daemon held in memory were flushed on the way out.
    beats = await heartbeat_columns(rig.dbs)
    assert [a for a in settled if beats[a] is None] == []


async def test_sigint_stops_cleanly_like_sigterm(rig: Rig) -> None:
    rig.write_config()
    await seed_accounts(rig.dbs, 5)
    rig.spawn()
    await rig.wait_log("ready:")
    rig.signal(signal.SIGINT)
    assert await rig.exit_status(20) == 0, rig.log()[-4000:]
    assert "interrupt: shutting down" in rig.log()


# --------------------------------------------------------------------------- SIGHUP


async def test_sighup_applies_a_new_heartbeat_timeout_live(rig: Rig) -> None:
    rig.write_config()
    ids = await seed_accounts(rig.dbs, 6)
    rig.spawn()
    await rig.wait_log("ready:")

    async def all_online() -> bool:
        return set((await statuses(rig.dbs)).values()) == {"online"}

    await wait_for(all_online, 30, "every account online")
    # The control: with the running timeout (1.5 s) a silent account leaves online quickly.
    assert await time_until_offline(rig, ids[0], 10) < 3.5

    rig.write_config(heartbeat={"timeout": 6})
    rig.signal(signal.SIGHUP)
    await rig.wait_log("reload: applied heartbeat.timeout")
    # Under the new timeout the same silence is tolerated for 6 s.
    assert 5.0 <= await time_until_offline(rig, ids[1], 15) < 9.0

    rig.signal(signal.SIGTERM)
    assert await rig.exit_status(30) == 0, rig.log()[-4000:]
    assert (await verify(rig.urls)).ok


async def test_sighup_reports_database_and_listen_changes_and_keeps_them(rig: Rig) -> None:
    rig.write_config()
    await seed_accounts(rig.dbs, 3)
    rig.spawn()
    await rig.wait_log("ready:")

    new_port = _free_port()
    password = "pw-" + secrets.token_hex(8)
    rig.write_config(
        databases={"platform": f"mysql+aiomysql://u:{password}@127.0.0.1:1/wework_platform"},
        ingest={"listen": f"127.0.0.1:{new_port}"},
        heartbeat={"timeout": 2.5},
    )
    rig.signal(signal.SIGHUP)
    await rig.wait_log("reload: applied heartbeat.timeout")
    text = rig.log()
    assert "reload: databases.platform: changed, needs a restart" in text
    assert "reload: ingest.listen: changed, needs a restart" in text
    assert password not in text

    # Kept, not half-applied: the old listener serves, the new port is not bound, and the daemon
    # still works on the old platform database (a new row is picked up and brought online).
    assert await healthz(rig.port) == 200
    with pytest.raises(aiohttp.ClientConnectionError):
        await healthz(new_port)
    late = await add_account(rig.dbs)

    async def late_online() -> bool:
        return (await statuses(rig.dbs))[late] == "online"

    await wait_for(late_online, 30, "an account created after the reload online")

    rig.signal(signal.SIGTERM)
    assert await rig.exit_status(30) == 0, rig.log()[-4000:]


async def test_sighup_with_a_broken_config_keeps_the_daemon_running(rig: Rig) -> None:
    rig.write_config()
    ids = await seed_accounts(rig.dbs, 3)
    rig.spawn()
    await rig.wait_log("ready:")

    rig.config_path.write_text("[heartbeat]\ntimeout = \n")  # not TOML
    rig.signal(signal.SIGHUP)
    await rig.wait_log("reload refused, keeping the running config")
    assert "invalid TOML" in rig.log()

    rig.write_config(heartbeat={"timeout": -1}, deadlines={"verifying": "soon"})
    rig.signal(signal.SIGHUP)
    await rig.wait_log("reload refused, keeping the running config", count=2)
    assert "heartbeat.timeout" in rig.log().split("reload refused")[-1]

    # Still running on the old config: accounts come online, the listener answers.
    assert rig.proc is not None and rig.proc.poll() is None
    assert await healthz(rig.port) == 200

    async def online() -> bool:
        current = await statuses(rig.dbs)
        return all(current[a] == "online" for a in ids)

    await wait_for(online, 30, "accounts online after two refused reloads")
    rig.signal(signal.SIGTERM)
    assert await rig.exit_status(30) == 0, rig.log()[-4000:]


async def test_sighup_with_an_unchanged_config_applies_nothing(rig: Rig) -> None:
    rig.write_config()
    rig.spawn()
    await rig.wait_log("ready:")
    rig.signal(signal.SIGHUP)
    await rig.wait_log("reload: applied nothing")
    assert "needs a restart" not in rig.log()
    rig.signal(signal.SIGTERM)
    assert await rig.exit_status(20) == 0, rig.log()[-4000:]


async def test_sighup_changes_no_account_state(rig: Rig) -> None:
    """A reload re-reads only the config: accounts and their states are left as they are."""
    rig.write_config()
    ids = await seed_accounts(rig.dbs, 4)
    rig.spawn()
    await rig.wait_log("ready:")

    async def all_online() -> bool:
        current = await statuses(rig.dbs)
        return all(current[a] == "online" for a in ids)

    await wait_for(all_online, 30, "every account online")
    before = await logs(rig.dbs)
    rig.write_config(recovery={"max_attempts": 3})
    rig.signal(signal.SIGHUP)
    await rig.wait_log("reload: applied recovery.max_attempts")
    await asyncio.sleep(1.0)
    assert await logs(rig.dbs) == before  # no transition caused by the reload itself
    rig.signal(signal.SIGTERM)
    assert await rig.exit_status(20) == 0, rig.log()[-4000:]
