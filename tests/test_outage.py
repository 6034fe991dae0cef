"""Our own outages: a restart, a database outage under load, a database down at start-up.

`accountd run` is a real process, the worker simulator a real HTTP server in the test process.
The database outage is real: the daemon reaches MariaDB through a loopback TCP forwarder that the
test cuts (every forwarded connection closed, new ones refused) and restores. The machine's
MariaDB itself is never stopped. The CI variant cuts for ``ACCOUNTD_OUTAGE_SECONDS`` (8 s by
default); ``ACCOUNTD_SOAK=1`` makes it 60 s (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy.engine import make_url

from accountd.adapters.verify import verify
from accountd.daemon.demo import _free_port
from tests.test_e2e import logs, offline_count, seed_accounts, statuses, wait_for
from tests.test_notify import Inbox
from tests.test_outbox import Forwarder
from tests.test_signals import Rig, open_rig

OUTAGE = float(
    os.environ.get("ACCOUNTD_OUTAGE_SECONDS", "60" if os.environ.get("ACCOUNTD_SOAK") else "8")
)


@pytest.fixture
async def rig(migrated_urls: dict[str, str], tmp_path: Path) -> AsyncIterator[Rig]:
    async with open_rig(migrated_urls, tmp_path) as r:
        yield r


async def all_online(rig: Rig, ids: list[str], timeout: float = 30) -> None:
    async def check() -> bool:
        st = await statuses(rig.dbs)
        return all(st[i] == "online" for i in ids)

    await wait_for(check, timeout, "every account online")


def heartbeat_losses(rows: dict[str, list[tuple[str | None, str, str | None]]]) -> set[str]:
    return {a for a, rs in rows.items() if any("heartbeat_lost" in (r[2] or "") for r in rs)}


# ---------------------------------------------------------------------------------- restart


async def test_restart_after_longer_than_the_timeout_marks_no_account_offline(rig: Rig) -> None:
    ids = await seed_accounts(rig.dbs, 12)
    rig.write_config(heartbeat={"startup_grace": 3})
    rig.spawn()
    await rig.wait_log("ready:")
    await all_online(rig, ids)
    rig.signal(signal.SIGTERM)
    assert await rig.exit_status(20) == 0
    # Down for well over the heartbeat timeout (1.5 s); the simulator keeps trying to beat.
    # One session really dies meanwhile.
    dead = ids[0]
    dropped_before = await offline_count(rig.dbs, dead)
    assert rig.sim.drop(dead)
    await asyncio.sleep(4)
    rig.spawn()
    await rig.wait_log("ready:", count=2)
    started = time.monotonic()

    async def dead_offline() -> bool:
        return await offline_count(rig.dbs, dead) > dropped_before

    await wait_for(dead_offline, 15, f"{dead} offline after the start-up grace")
    took = time.monotonic() - started
    await asyncio.sleep(2)
    lost = heartbeat_losses(await logs(rig.dbs))
    assert lost == {dead}, f"false alarms after a restart: {sorted(lost - {dead})}"
    assert took >= 2.0, f"{dead} went offline {took:.2f}s after the restart: no grace"
    print(f"\nrestart after 4s down: 11 kept online, the dead one offline {took:.1f}s after ready")
    rig.signal(signal.SIGTERM)
    assert await rig.exit_status(20) == 0


# -------------------------------------------------------------------- database down at start


async def test_database_down_at_start_up_retries_then_exits_non_zero(rig: Rig) -> None:
    closed = _free_port()  # nothing listens there
    urls = {k: f"mysql+aiomysql://root@127.0.0.1:{closed}/nowhere_{k}" for k in rig.urls}
    rig.write_config(databases={**urls, "startup_timeout": 2, "connect_timeout": 1})
    started = time.monotonic()
    rig.spawn()
    code = await rig.exit_status(20)
    took = time.monotonic() - started
    out = rig.log()
    assert code == 1, out
    assert "Traceback" not in out
    assert out.count("unreachable at start-up") >= 2, out  # retried
    assert "retrying in" in out
    last = [line for line in out.splitlines() if "gave up after" in line]
    assert len(last) == 1 and "startup_timeout" in last[0], out
    assert 2 <= took < 15, took
    print(f"\nstart-up with the database down: exit {code} after {took:.1f}s; {last[0][-160:]}")


# ------------------------------------------------------------------ database outage, loaded


async def http_status(http: aiohttp.ClientSession, url: str) -> int:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def metric(http: aiohttp.ClientSession, port: int, line_start: str) -> float | None:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def post(
    http: aiohttp.ClientSession,
    rig: Rig,
    path: str,
    body: Mapping[str, object],
    timeout: float = OUTAGE + 30,
) -> tuple[int, str | None]:
    async with http.post(
        f"http://127.0.0.1:{rig.port}{path}",
        json=body,
        headers={"Authorization": f"Bearer {rig.token}"},
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as resp:
        await resp.read()
        return resp.status, resp.headers.get("Retry-After")


async def test_database_outage_under_load(rig: Rig, tmp_path: Path) -> None:
    if not make_url(rig.urls["platform"]).drivername.startswith("mysql"):
        pytest.skip("needs a database server to lose: runs on MariaDB (ACCOUNTD_TEST_MYSQL_URL)")
    fwd = Forwarder(make_url(rig.urls["platform"]).host or "127.0.0.1", 3306)
    await fwd.open()
    through = {
        k: make_url(u).set(host="127.0.0.1", port=fwd.port).render_as_string(hide_password=False)
        for k, u in rig.urls.items()
    }
    metrics_port = _free_port()
    ids = await seed_accounts(rig.dbs, 40)
    config: dict[str, dict[str, Any]] = {
        "databases": {**through, "connect_timeout": 1, "pool_timeout": 2},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}", "ping_interval": 0.5},
        # Everyone is dropped on purpose here: no mass-offline cool-down holding recovery.
        "recovery": {"base": 0.2, "cap": 1, "mass_offline_cooldown": 0},
        # Longer than usual here: the simulated worker sends events and heartbeats from one loop,
        # so its heartbeats wait behind an event request the daemon holds (up to its 10 s client
        # timeout); the guard's grace is one timeout after the door has caught up.
        "heartbeat": {"startup_grace": 5, "timeout": 4},
    }
    # Bring everyone online with the default bound (40 starts at once would not fit in 12: the
    # daemon's own decisions are refused by a full door too), then restart with the small one.
    rig.write_config(**config)
    rig.spawn()
    await rig.wait_log("ready:")
    await all_online(rig, ids)
    rig.signal(signal.SIGTERM)
    assert await rig.exit_status(20) == 0
    rig.write_config(
        **config,
        supervisor={"max_pending_changes": 12, "poll_interval": 0.3, "shutdown_timeout": 10},
    )
    box = Inbox(str(tmp_path / "notify.sock"))
    http = aiohttp.ClientSession()
    hung: list[asyncio.Task[tuple[int, str | None]]] = []
    try:
        rig.spawn(env={"NOTIFY_SOCKET": box.address})
        await rig.wait_log("ready:", count=2)
        await all_online(rig, ids)
        assert rig.proc is not None
        pid = rig.proc.pid
        ready = f"http://127.0.0.1:{metrics_port}/readyz"
        assert await http_status(http, ready) == 200
        kicked = ids[:3]
        rss_before = rss_kib(pid)
        log_before = len(rig.log().splitlines())
        lost_before = heartbeat_losses(await logs(rig.dbs))

        # ------------------------------------------------------------------ cut
        await fwd.close()
        cut = time.monotonic()
        for account_id in kicked:  # real transitions in flight: the sessions are kicked
            assert rig.sim.logout(account_id)

        async def not_ready() -> bool:
            return await http_status(http, ready) == 503

        await wait_for(not_ready, 5, "/readyz 503 after the cut")
        flipped = time.monotonic() - cut
        assert await metric(http, metrics_port, 'accountd_db_up{database="platform"}') == 0.0
        # Heartbeats need no database: taken at once.
        status, _ = await post(
            http, rig, "/v1/heartbeats", {"heartbeats": [{"account_id": ids[5], "at": _now()}]}, 5
        )
        assert status == 200
        # Events queue in the door up to max_pending_changes (12), then 503 + Retry-After.
        # Groups of 5 distinct accounts, each kicked once: every buffered one must apply once
        # after the restore, every refused one never.
        refused: tuple[int, str | None] | None = None
        buffered: list[str] = []
        groups = [ids[k : k + 5] for k in range(3, 38, 5)]
        for group in groups:
            batch = {
                "events": [
                    {"account_id": i, "event": "logged_out", "data": {}, "at": _now()}
                    for i in group
                ]
            }
            task = asyncio.create_task(post(http, rig, "/v1/events", batch))
            done, _pending = await asyncio.wait({task}, timeout=0.5)
            if done:
                refused = task.result()
                never = group
                break
            hung.append(task)
            buffered += group
        assert refused is not None and refused[0] == 503 and refused[1], rig.log()[-3000:]
        assert buffered, "the buffer took nothing before refusing"
        rss_peak = rss_before
        while time.monotonic() - cut < OUTAGE:
            rss_peak = max(rss_peak, rss_kib(pid))
            await asyncio.sleep(0.5)
        assert rig.proc.poll() is None, "the daemon died during the outage"
        degraded = [m for m in box.having("STATUS") if m.fields["STATUS"].startswith("degraded")]
        assert degraded, [m.fields for m in box.messages]
        outage_lines = rig.log().splitlines()[log_before:]

        # -------------------------------------------------------------- restore
        await fwd.open()
        restored = time.monotonic()

        async def is_ready() -> bool:
            return await http_status(http, ready) == 200

        await wait_for(is_ready, 15, "/readyz 200 after the restore", interval=0.05)
        ready_after = time.monotonic() - restored

        async def kicked_committed() -> bool:
            rows = await logs(rig.dbs)
            return all(
                any("logged_out" in (r[2] or "") for r in rows[a]) for a in [*kicked, *buffered]
            )

        await wait_for(kicked_committed, 15, "the queued transitions committed", interval=0.05)
        commit_after = time.monotonic() - restored
        for task in hung:
            status, _ = await task
            assert status == 200
        await all_online(rig, ids, timeout=30)
        await asyncio.sleep(2)

        rows = await logs(rig.dbs)
        lost = heartbeat_losses(rows) - lost_before
        assert lost == set(), f"false alarms after a database outage: {sorted(lost)}"
        for a in [*kicked, *buffered]:  # applied exactly once, none lost
            assert sum("logged_out" in (r[2] or "") for r in rows[a]) == 1, rows[a]
        for a in never:  # refused with 503: never applied
            assert not any("logged_out" in (r[2] or "") for r in rows[a]), rows[a]
        report = await verify(rig.urls)
        assert report.ok, report
        print(
            f"\ndatabase outage {OUTAGE:g}s: /readyz 503 {flipped:.1f}s after the cut; "
            f"{len(buffered)} kicks buffered, then 503 Retry-After {refused[1]}; "
            f"RSS {rss_before // 1024} -> peak {rss_peak // 1024} MiB; "
            f"{len(outage_lines)} log lines during the outage; after the restore: "
            f"first commit {commit_after:.2f}s, /readyz 200 {ready_after:.2f}s; "
            f"0 heartbeat_lost; db verify ok"
        )
        assert len(outage_lines) < 60, "\n".join(outage_lines[-80:])
        assert rss_peak - rss_before < 64 * 1024
        assert commit_after < 5 and ready_after < 5
        assert any(not m.fields["STATUS"].startswith("degraded") for m in box.having("STATUS"))
        rig.signal(signal.SIGTERM)
        assert await rig.exit_status(30) == 0
    finally:
        for task in hung:
            task.cancel()
        await asyncio.gather(*hung, return_exceptions=True)
        await http.close()
        box.close()
        await fwd.close()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
