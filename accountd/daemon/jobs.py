"""The daemon's periodic jobs: scheduled by APScheduler, owned and watched here.

`PeriodicJobs` wraps every job (the heartbeat flush, the pick-up of new rows, the lease
renewal, the monitoring jobs): it keeps each run's task so shutdown can wait for it, logs a job
failing on the database once and then now and then (`QuietLog`), and decides what happens when
a run is still going at the next tick.

That last case is normal at scale. The flush ticks every second and, at a million accounts,
one flush writes for 40 s or more; APScheduler's own rule (``max_instances=1``) skipped each
of those ticks with a WARNING, about 250 in an eight-minute benchmark run and next to nothing
else, so a real warning drowned in them (docs/benchmarks.md). Here the tick reaches the
wrapper instead (``max_instances=2``: one run, one tick that sees it), which returns at once,
and the run that overran says so in one line at the end: how long it took and how many ticks
it covered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.exc import DBAPIError, OperationalError

from accountd.daemon.outage import QuietLog
from accountd.errors import AccountdError, DatabaseUnavailable

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]


class PeriodicJobs:
    """Adds jobs to a scheduler, runs at most one of each at a time, awaits them at shutdown."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self._log = logger
        # Jobs failing on a database log once, then a summary now and then, not a traceback each.
        self._errors = QuietLog(logger)
        self._runs: dict[str, _Run] = {}  # job name → its run in progress

    def add(self, scheduler: AsyncIOScheduler, fn: Job, seconds: float) -> None:
        """Run ``fn`` every ``seconds`` (the job is named after the function)."""
        scheduler.add_job(
            self.wrap(fn, seconds),
            "interval",
            seconds=seconds,
            id=fn.__name__,
            name=fn.__name__,
            # Two: the run, and a tick that finds it still going and returns at once (module
            # docstring). At one, APScheduler logs a WARNING for every such tick.
            max_instances=2,
            coalesce=True,
            misfire_grace_time=max(1, int(seconds)),
        )

    @property
    def running(self) -> int:
        """Runs in progress."""
        return len(self._runs)

    def wrap(self, fn: Job, seconds: float) -> Job:
        """``fn`` as a job: owned, its errors logged, never run twice at once."""
        name = fn.__name__

        async def job() -> None:
            run = self._runs.get(name)
            if run is not None:
                run.skipped += 1  # the previous run is still going: skip this tick
                return
            run = self._runs[name] = _Run(asyncio.current_task())
            started = time.monotonic()
            try:
                await fn()
            except (DatabaseUnavailable, OperationalError, DBAPIError, OSError) as exc:
                # A database outage fails every job every few seconds: one line when it starts,
                # a summary now and then, one when it works again (no traceback per run).
                self._errors.failed(f"job {name}", exc)
            except AccountdError as exc:
                self._log.warning("job %s: %s", name, exc)
            except asyncio.CancelledError:
                # Only our shutdown cancels a job (after its grace); the job's work is picked
                # up again at the next start (e.g. heartbeats are flushed by the final flush).
                self._log.info("job %s cancelled at shutdown", name)
            except Exception:  # boundary: a failing job is logged; the next run tries again
                self._log.exception("job %s failed", name)
            else:
                self._errors.succeeded(f"job {name}")
            finally:
                del self._runs[name]
                if run.skipped:
                    self._log.info(
                        "job %s ran %.1fs, longer than its %gs interval (%d ticks skipped)",
                        name,
                        time.monotonic() - started,
                        seconds,
                        run.skipped,
                    )

        job.__name__ = name
        return job

    async def stop(self, scheduler: AsyncIOScheduler, grace: float = 5.0) -> None:
        """Start no more runs, give the running ones ``grace`` seconds, then cancel the rest.

        Paused first: APScheduler's ``shutdown`` cancels every run still going at once (its
        asyncio executor cannot wait), which would give a flush halfway through no grace.
        """
        scheduler.pause()
        running = self._tasks()
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                self._log.warning(
                    "job %s still running %gs into shutdown; cancelling", running[task], grace
                )
        scheduler.shutdown(wait=False)  # cancels what is still running
        # AsyncIOScheduler runs `shutdown` on the loop's next turn (call_soon_threadsafe).
        await asyncio.sleep(0)
        if left := self._tasks():
            # Bounded: a cancelled run only logs on its way out (the job's wrapper).
            await asyncio.wait(left, timeout=1.0)

    def _tasks(self) -> dict[asyncio.Task[Any], str]:
        """The tasks of the runs in progress, and their jobs' names."""
        return {run.task: name for name, run in self._runs.items() if run.task is not None}


@dataclass(slots=True)
class _Run:
    """A job's run in progress, and the ticks that found it still going."""

    task: asyncio.Task[Any] | None
    skipped: int = 0
