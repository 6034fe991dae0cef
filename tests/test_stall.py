"""Stalls: a daemon that was stopped (SIGSTOP) must not blame the accounts for its own deafness.

First `accountd.daemon.outage` on its own, with a fake clock and a fake monotonic clock (the
windows, what is excused and what is not, the quiet log, the start-up wait); then `accountd run`
as a real process, stopped with SIGSTOP for longer than the heartbeat timeout while the worker
simulator keeps beating, and continued: no account goes offline, except a session that really
stopped beating, which still does one timeout after the daemon could hear again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from accountd.daemon.clock import FakeClock
from accountd.daemon.outage import OutageGuard, QuietLog, Window, wait_for_databases
from accountd.errors import DatabaseUnavailable
from tests.test_e2e import logs, offline_count, seed_accounts, statuses, wait_for
from tests.test_signals import Rig, open_rig

T0 = 1_700_000_000.0
TIMEOUT = 10.0


class Mono:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def guard(clock: FakeClock, mono: Mono, **kw: object) -> OutageGuard:
    return OutageGuard(clock, tick=0.5, stall_after=2.0, monotonic=mono, detect_lag=1.0, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- the guard on its own


def test_no_stall_means_no_excuse() -> None:
    clock, mono = FakeClock(T0), Mono()
    g = guard(clock, mono)
    mono.t += 0.5
    clock.set(T0 + 20)
    assert g.excuse_heartbeat(T0, TIMEOUT, T0 + 20) is None
    assert g.excuse_deadline(T0 + 15, T0 + 20) is None
    assert g.stalls == 0


def test_heartbeat_check_inside_a_stall_moves_to_one_timeout_after_it() -> None:
    clock, mono = FakeClock(T0), Mono()
    g = guard(clock, mono)
    # Last beat at T0 + 5; the process is stopped from T0 + 8 for 30 s.
    clock.set(T0 + 8)
    g.check_stall()
    mono.t += 30
    clock.set(T0 + 38)
    later = g.excuse_heartbeat(T0 + 5, TIMEOUT, T0 + 38)
    assert later == pytest.approx(T0 + 38 + TIMEOUT)
    assert g.stalls == 1
    assert list(g.windows) == [Window(pytest.approx(T0 + 8), T0 + 38)]  # type: ignore[arg-type]
    # Still no beat one timeout after the stall: now it is the account's fault.
    mono.t += TIMEOUT
    clock.set(T0 + 38 + TIMEOUT)
    assert g.excuse_heartbeat(T0 + 5, TIMEOUT, T0 + 38 + TIMEOUT) is None


def test_account_already_stale_before_the_stall_is_not_excused() -> None:
    clock, mono = FakeClock(T0), Mono()
    g = guard(clock, mono)
    clock.set(T0 + 30)
    g.check_stall()
    mono.t += 20
    clock.set(T0 + 50)
    # Last beat at T0: stale since T0 + 10, twenty seconds before the daemon stopped.
    assert g.excuse_heartbeat(T0, TIMEOUT, T0 + 50) is None


def test_worker_deadline_inside_a_stall_keeps_the_time_it_had_left() -> None:
    clock, mono = FakeClock(T0), Mono()
    g = guard(clock, mono)
    clock.set(T0 + 10)
    g.check_stall()
    mono.t += 30
    clock.set(T0 + 40)
    # Due at T0 + 25 (15 s left when the stall began at T0 + 10): now due at T0 + 55.
    assert g.excuse_deadline(T0 + 25, T0 + 40) == pytest.approx(T0 + 55)
    # Due before the stall began: not the daemon's fault.
    assert g.excuse_deadline(T0 + 9, T0 + 40) is None


def test_database_outage_parks_checks_then_grants_one_timeout_after_it() -> None:
    clock, mono = FakeClock(T0), Mono()
    g = guard(clock, mono, park=1.0)
    g.db_failed(T0 + 10)  # noticed at T0 + 10, so counted from T0 + 9 (detect_lag)
    assert g.db_down_since == T0 + 9
    # Alive at the start of the outage (beat at T0 + 1, alive until T0 + 11): parked.
    assert g.excuse_heartbeat(T0 + 1, TIMEOUT, T0 + 20) == T0 + 21
    assert g.excuse_deadline(T0 + 12, T0 + 20) == T0 + 21
    # Stale before it began (alive until T0 + 5): fires, the door queues it.
    assert g.excuse_heartbeat(T0 - 5, TIMEOUT, T0 + 20) is None
    g.db_ok(T0 + 30)
    assert g.db_down_since is None
    assert g.excuse_heartbeat(T0 + 1, TIMEOUT, T0 + 31) == T0 + 30 + TIMEOUT
    assert g.excuse_deadline(T0 + 12, T0 + 31) == T0 + 12 + 21


async def test_the_owned_task_polls_database_health() -> None:
    clock = FakeClock(T0)
    up = {"platform": True}
    g = OutageGuard(clock, tick=0.02, stall_after=1.0, db_up=lambda: up["platform"])
    await g.start()
    try:
        up["platform"] = False
        await asyncio.sleep(0.1)
        assert g.db_down_since is not None
        up["platform"] = True
        await asyncio.sleep(0.1)
        assert g.db_down_since is None and len(g.windows) == 1
    finally:
        await g.stop()


def test_quiet_log_says_once_summarises_and_says_when_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mono = Mono()
    quiet = QuietLog(logging.getLogger("test.quiet"), repeat=60, monotonic=mono)
    caplog.set_level(logging.INFO, "test.quiet")
    for _ in range(100):  # a job every second for 100 s
        quiet.failed("job flush", OSError("connection refused"))
        mono.t += 1
    quiet.succeeded("job flush")
    quiet.succeeded("job flush")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0] == "job flush failing: OSError: connection refused"
    assert lines[1].startswith("job flush still failing after 60s (60 more failures)")
    assert lines[2].startswith("job flush works again after 100")
    assert quiet.failing == []


async def test_start_up_wait_backs_off_then_gives_up_naming_the_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[float] = []

    async def down() -> None:
        calls.append(time.monotonic())
        raise DatabaseUnavailable("platform", "127.0.0.1:1: connection refused")

    caplog.set_level(logging.WARNING, "accountd.daemon.outage")
    with pytest.raises(DatabaseUnavailable, match=r"gave up after .*startup_timeout"):
        await wait_for_databases(down, give_up_after=0.7, base=0.1)
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert len(calls) >= 3 and gaps[1] > gaps[0] * 1.5  # backing off
    assert all("retrying in" in r.getMessage() for r in caplog.records)


async def test_start_up_wait_returns_once_the_database_answers() -> None:
    left = [2]

    async def flaky() -> None:
        if left[0]:
            left[0] -= 1
            raise DatabaseUnavailable("core", "not yet")

    await wait_for_databases(flaky, give_up_after=5, base=0.01)
    assert left == [0]


# ----------------------------------------------------------------- SIGSTOP on a real process

STOP_SECONDS = 4.0  # > heartbeat.timeout (1.5 s) by far


@pytest.fixture
async def rig(migrated_urls: dict[str, str], tmp_path: Path) -> AsyncIterator[Rig]:
    async with open_rig(migrated_urls, tmp_path) as r:
        yield r


async def all_online(rig: Rig, ids: list[str]) -> None:
    async def check() -> bool:
        st = await statuses(rig.dbs)
        return all(st[i] == "online" for i in ids)

    await wait_for(check, 30, "every account online")


async def test_sigstop_longer_than_the_timeout_marks_no_account_offline(rig: Rig) -> None:
    ids = await seed_accounts(rig.dbs, 12)
    rig.write_config(heartbeat={"stall_after": 1.0})
    rig.spawn()
    await rig.wait_log("ready:")
    await all_online(rig, ids)
    dead = ids[0]
    before = await logs(rig.dbs)

    assert rig.proc is not None
    rig.signal(signal.SIGSTOP)
    # While the daemon is stopped one session really dies; the others keep beating (their
    # requests wait in the kernel's socket buffers).
    await asyncio.sleep(0.5)
    dropped_before = await offline_count(rig.dbs, dead)
    assert rig.sim.drop(dead)
    await asyncio.sleep(STOP_SECONDS - 0.5)
    rig.proc.send_signal(signal.SIGCONT)
    continued = time.monotonic()

    async def dead_offline() -> bool:
        return await offline_count(rig.dbs, dead) > dropped_before

    await wait_for(dead_offline, 15, f"{dead} offline after the stall")
    took = time.monotonic() - continued
    await asyncio.sleep(2.0)  # more than a timeout: any false alarm would have fired by now

    after = await logs(rig.dbs)
    lost = {
        a: rows[len(before.get(a, [])) :]
        for a, rows in after.items()
        if any("heartbeat_lost" in (r[2] or "") for r in rows[len(before.get(a, [])) :])
    }
    assert set(lost) == {dead}, f"false alarms after SIGSTOP: {sorted(set(lost) - {dead})}"
    st = await statuses(rig.dbs)
    assert [a for a in ids[1:] if st[a] != "online"] == []
    # The dead session was given one timeout after the stall, not fired at once on SIGCONT.
    assert took >= 1.0, f"{dead} went offline {took:.2f}s after SIGCONT: no grace"
    assert "the daemon did not run for" in rig.log()
    print(
        f"\nSIGSTOP {STOP_SECONDS:g}s: 11 accounts kept online, "
        f"the dead one offline {took:.1f}s after SIGCONT"
    )
    rig.signal(signal.SIGTERM)
    assert await rig.exit_status(20) == 0
