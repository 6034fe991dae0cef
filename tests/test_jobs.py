"""Periodic jobs on a real APScheduler: one run at a time, one line per overrun, owned tasks."""

from __future__ import annotations

import asyncio
import logging

import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from accountd.daemon.jobs import PeriodicJobs

LOGGER = "test.jobs"


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


async def test_job_slower_than_its_interval_runs_alone_and_logs_one_line_per_overrun(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)  # APScheduler's own warnings included
    jobs = PeriodicJobs(logging.getLogger(LOGGER))
    scheduler = AsyncIOScheduler(timezone="UTC")
    running = 0
    most = 0
    runs = 0
    slow = asyncio.Event()

    async def flush() -> None:
        nonlocal running, most, runs
        running += 1
        most = max(most, running)
        runs += 1
        try:
            if runs == 1:
                await slow.wait()  # the first run overruns, like a flush at a million accounts
        finally:
            running -= 1

    jobs.add(scheduler, flush, 0.05)
    scheduler.start()
    try:
        for _ in range(200):  # the first run starts within a tick
            if runs:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.4)  # several ticks find it still running
        assert runs == 1 and jobs.running == 1
        slow.set()
        for _ in range(200):  # and once it is done, the job runs again
            if runs >= 3:
                break
            await asyncio.sleep(0.01)
    finally:
        await jobs.stop(scheduler)
    assert runs >= 3
    assert most == 1
    assert _messages(caplog, logging.WARNING) == []
    [overrun] = [m for m in _messages(caplog, logging.INFO) if "longer than" in m]
    assert overrun.startswith("job flush ran ")
    assert "longer than its 0.05s interval" in overrun
    skipped = int(overrun.rsplit("(", 1)[1].split()[0])
    assert skipped >= 2


async def test_failing_job_logs_once_and_keeps_its_schedule(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    jobs = PeriodicJobs(logging.getLogger(LOGGER))
    calls = 0

    async def poll_heartbeats() -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise OSError("connection refused")
        if calls == 4:
            raise RuntimeError("a bug")

    job = jobs.wrap(poll_heartbeats, 1.0)
    for _ in range(5):
        await job()
    assert calls == 5
    assert _messages(caplog, logging.WARNING) == [
        "job poll_heartbeats failing: OSError: connection refused"
    ]
    [bug] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert bug.getMessage() == "job poll_heartbeats failed" and bug.exc_info is not None
    infos = _messages(caplog, logging.INFO)
    assert any(m.startswith("job poll_heartbeats works again") for m in infos)
    assert jobs.running == 0


async def test_stop_lets_a_running_job_finish_within_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    jobs = PeriodicJobs(logging.getLogger(LOGGER))
    scheduler = AsyncIOScheduler(timezone="UTC")
    started = asyncio.Event()
    finished: list[bool] = []

    async def flush() -> None:
        started.set()
        await asyncio.sleep(0.3)  # a flush halfway through when shutdown begins
        finished.append(True)

    jobs.add(scheduler, flush, 0.05)
    scheduler.start()
    await asyncio.wait_for(started.wait(), 5)
    await jobs.stop(scheduler, grace=5.0)
    assert finished == [True]
    assert not scheduler.running and jobs.running == 0
    assert _messages(caplog, logging.WARNING) == []
    assert not any("cancelled" in m for m in _messages(caplog, logging.INFO))


async def test_stop_cancels_a_job_still_running_after_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    jobs = PeriodicJobs(logging.getLogger(LOGGER))
    scheduler = AsyncIOScheduler(timezone="UTC")
    started = asyncio.Event()

    async def renew() -> None:
        started.set()
        await asyncio.sleep(3600)

    jobs.add(scheduler, renew, 0.05)
    scheduler.start()
    await asyncio.wait_for(started.wait(), 5)
    await jobs.stop(scheduler, grace=0.1)
    assert not scheduler.running and jobs.running == 0
    assert _messages(caplog, logging.WARNING) == [
        "job renew still running 0.1s into shutdown; cancelling"
    ]
    assert "job renew cancelled at shutdown" in _messages(caplog, logging.INFO)
