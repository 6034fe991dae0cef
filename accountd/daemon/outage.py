"""Outage awareness: the daemon's own deafness must never be held against an account.

A heartbeat check or a state deadline that fires says "the worker did not report in time". That
is only true if the daemon was able to hear the worker. Three things make it deaf for a while:

* **A stall.** The process was stopped (SIGSTOP, a debugger, a frozen VM) or the event loop was
  starved. Heartbeats pile up in the kernel's socket buffers while every online account's
  deadline passes; on SIGCONT the deadline runner would otherwise fire them all before ingest
  reads a single byte. `OutageGuard.check_stall` measures the gap between the ticks of one owned
  task on the monotonic clock: a gap far beyond the tick interval is a stall.
* **A database outage.** Heartbeats still land in memory (ingest needs no database), but workers
  whose event requests hang behind a commit that cannot happen stop beating too, and heartbeats
  other services write to ``last_heartbeat_at`` cannot arrive. While the platform database is down
  the daemon cannot commit a decision anyway, so it defers them.
* **A restart** is covered by the start-up grace (``heartbeat.startup_grace``, applied when the
  supervisor restores deadlines), not here.

Each stall or outage becomes a *deaf window* ``[start, end]`` in the supervisor's clock. The rules
(`excuse_heartbeat`, `excuse_deadline`):

* an online account that was still alive when a window began is treated as if it had beaten at
  the window's end: its check moves to ``end + heartbeat.timeout``;
* a state deadline (a worker step) that fell at or after a window's start moves by the window's
  length: the state keeps the time it had left when the daemon went deaf;
* while the platform database is down, such checks are parked and looked at again shortly;
* an account that was already stale before the window began is not excused.

Sessions that really stopped beating still go offline, one timeout after the daemon could hear
again. `QuietLog` keeps an outage from flooding the log: one warning when something starts failing,
a summary at most every ``repeat`` seconds, one info line when it works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from accountd.daemon.clock import Clock
from accountd.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

# Deaf windows remembered (older ones no longer matter once a timeout has passed after them).
MAX_WINDOWS = 32


@dataclass(frozen=True, slots=True)
class Window:
    start: float
    end: float


class OutageGuard:
    """Knows when the daemon was deaf, and moves the checks that fell into those stretches.

    ``tick``: interval of the owned task. ``stall_after``: a tick gap longer than this is a
    stall (keep it well above ``tick`` and below ``heartbeat.timeout``). ``db_up``: reads the
    platform database's health without I/O (the metrics' ping results and the door's last
    commit); polled every tick. ``detect_lag``: how late a database outage may be noticed (the
    ping interval): its window starts that much before it was noticed. ``park``: how soon a check
    deferred by an ongoing outage is looked at again.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        tick: float = 0.5,
        stall_after: float = 2.0,
        db_up: Callable[[], bool | None] | None = None,
        detect_lag: float = 2.0,
        park: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if tick <= 0 or stall_after <= tick:
            raise ValueError("need 0 < tick < stall_after")
        self.clock = clock
        self.tick = tick
        self.stall_after = stall_after
        self.db_up = db_up
        self.detect_lag = detect_lag
        self.park = park
        self._monotonic = monotonic
        self._last_tick = monotonic()
        self.windows: deque[Window] = deque(maxlen=MAX_WINDOWS)
        self.db_down_since: float | None = None
        self.stalls = 0  # stalls seen (tests, logs)
        self.excused = 0  # checks moved because of a window or an ongoing outage
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        assert self._task is None
        self._last_tick = self._monotonic()
        self._task = asyncio.create_task(self._run(), name="accountd-outage-guard")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            # The real clock on purpose (never the injected one): a stall is real time lost.
            await asyncio.sleep(self.tick)
            self.check_stall()
            if self.db_up is not None:
                up = self.db_up()
                if up is False:
                    self.db_failed()
                elif up is True:
                    self.db_ok()

    # ---------------------------------------------------------------- observations

    def check_stall(self) -> Window | None:
        """Record a stall if the loop did not run for ``stall_after``; cheap, call it often.

        Called by the tick task and before every excuse, so that the deadline runner, which may
        wake before the tick task after a SIGCONT, already sees the stall.
        """
        mono = self._monotonic()
        gap = mono - self._last_tick
        self._last_tick = mono
        if gap <= self.stall_after:
            return None
        end = self.clock.now()
        window = Window(end - gap, end)
        self.windows.append(window)
        self.stalls += 1
        log.warning(
            "the daemon did not run for %.1fs (stopped or starved); heartbeat checks and worker "
            "deadlines that fell in that time are moved, not fired",
            gap,
        )
        return window

    def db_failed(self, now: float | None = None) -> None:
        """The platform database failed an operation or a ping: an outage, if not yet known."""
        if self.db_down_since is None:
            self.db_down_since = (self.clock.now() if now is None else now) - self.detect_lag
            log.warning(
                "platform database unavailable: decisions about missing heartbeats and worker "
                "deadlines are deferred until it is back"
            )

    def db_ok(self, now: float | None = None) -> None:
        if self.db_down_since is None:
            return
        end = self.clock.now() if now is None else now
        self.windows.append(Window(self.db_down_since, end))
        log.info(
            "platform database back after %.1fs; deferred checks resume after one heartbeat "
            "timeout",
            end - self.db_down_since,
        )
        self.db_down_since = None

    # ---------------------------------------------------------------- decisions

    def excuse_heartbeat(self, last: float, timeout: float, now: float) -> float | None:
        """When to check an online account again instead of firing ``heartbeat_lost``.

        ``last``: its last heartbeat (or when it went online). None: it is stale, fire.
        """
        self.check_stall()
        alive_until = last + timeout
        if self.db_down_since is not None and alive_until >= self.db_down_since:
            self.excused += 1
            return now + self.park
        later: float | None = None
        for w in self.windows:
            # Alive when the daemon went deaf: count the window's end as a heartbeat.
            if alive_until >= w.start and w.end + timeout > now:
                later = max(later or 0.0, w.end + timeout)
        if later is not None:
            self.excused += 1
        return later

    def excuse_deadline(self, due: float, now: float) -> float | None:
        """When a worker-step deadline (state ``timeout``) should fire instead, or None: now."""
        self.check_stall()
        if self.db_down_since is not None and due >= self.db_down_since:
            self.excused += 1
            return now + self.park
        moved = due
        for w in self.windows:  # oldest first: each window the state lived through extends it
            if moved >= w.start:
                moved += w.end - w.start
        if moved > now:
            self.excused += 1
            return moved
        return None


class QuietLog:
    """Log a failing operation once, summarise repeats, and say once when it works again."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        repeat: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.repeat = repeat
        self._monotonic = monotonic
        # name → (first failure, last line logged, failures since that line)
        self._failing: dict[str, tuple[float, float, int]] = {}

    def failed(self, name: str, exc: BaseException) -> None:
        now = self._monotonic()
        state = self._failing.get(name)
        if state is None:
            self._failing[name] = (now, now, 0)
            self.logger.warning("%s failing: %s", name, short_error(exc))
            return
        first, last, count = state
        if now - last >= self.repeat:
            self.logger.warning(
                "%s still failing after %.0fs (%d more failures): %s",
                name,
                now - first,
                count + 1,
                short_error(exc),
            )
            self._failing[name] = (first, now, 0)
        else:
            self._failing[name] = (first, last, count + 1)

    def succeeded(self, name: str) -> None:
        state = self._failing.pop(name, None)
        if state is not None:
            self.logger.info("%s works again after %.1fs", name, self._monotonic() - state[0])

    @property
    def failing(self) -> list[str]:
        return sorted(self._failing)


def short_error(exc: BaseException) -> str:
    """One line about a database error, without the SQL and parameters SQLAlchemy appends."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).splitlines()[0] if str(orig) else ""
    return f"{type(orig).__name__}: {text}"[:300] if text else type(orig).__name__


async def wait_for_databases(
    check: Callable[[], Awaitable[None]],
    *,
    give_up_after: float,
    stop: asyncio.Event | None = None,
    base: float = 0.5,
    cap: float = 10.0,
) -> None:
    """Run ``check`` until it passes, backing off; give up after ``give_up_after`` seconds.

    For start-up: a database that is not there yet (the server is still starting, the network
    is not up) is waited for with one line per attempt, not a traceback; after ``give_up_after``
    seconds (0: one attempt) the last error is raised and the daemon exits non-zero. ``stop``
    (SIGTERM) ends the wait early with the same error.
    """
    started = time.monotonic()
    delay = base
    attempt = 0
    while True:
        attempt += 1
        try:
            await check()
            if attempt > 1:
                log.info("databases reachable after %d attempts", attempt)
            return
        except DatabaseUnavailable as exc:
            elapsed = time.monotonic() - started
            left = give_up_after - elapsed
            if left <= 0 or (stop is not None and stop.is_set()):
                raise DatabaseUnavailable(
                    exc.database,
                    f"{exc.detail} (gave up after {elapsed:.0f}s and {attempt} attempts; "
                    "[databases] startup_timeout)",
                ) from exc
            wait = min(delay, left)
            log.warning(
                "database %s unreachable at start-up: %s; retrying in %.1fs (giving up in %.0fs)",
                exc.database,
                exc.detail,
                wait,
                left,
            )
            if stop is None:
                await asyncio.sleep(wait)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await stop.wait()
            delay = min(delay * 2, cap)
