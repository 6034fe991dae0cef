"""The clock the daemon reads and sleeps on, injected so tests can drive time.

Time is wall-clock epoch seconds (``time.time()``), not monotonic: deadlines and entry times are
persisted and must mean the same thing after a restart. The places that must survive a clock
step (token buckets, durations) clamp negative differences to zero.

`FakeClock` is for tests: time moves only when a test calls `FakeClock.advance`, and sleepers
wake in deadline order (ties in the order they went to sleep), each seeing ``now()`` equal to
its own wake time, so a test reads like a timeline.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    """What time is it, and wait a while."""

    def now(self) -> float:
        """Epoch seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return after ``seconds`` (at once when ``seconds <= 0``, after yielding)."""
        ...


class SystemClock:
    """The real clock: ``time.time`` and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


# How many times `FakeClock.settle` yields to the event loop. A woken task usually needs a few
# hops (its own wake-up, then whatever it awaits that is already done); this is comfortably more
# than the chains in our tests while keeping a test step cheap.
_SETTLE_ROUNDS = 50


class FakeClock:
    """A manual clock for tests. Not thread-safe; use it from the event loop's thread."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        # A cancelled sleeper simply leaves its (done) future in the heap; advance() skips it.
        await fut

    @property
    def sleepers(self) -> int:
        """How many coroutines are asleep on this clock right now."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    def next_wake(self) -> float | None:
        """The earliest time a sleeper will wake, if any."""
        for when, _, fut in sorted(self._sleepers):
            if not fut.done():
                return when
        return None

    async def settle(self) -> None:
        """Let every task that can run without time passing run."""
        for _ in range(_SETTLE_ROUNDS):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking sleepers one deadline at a time."""
        if seconds < 0:
            raise ValueError("time does not go backwards on a FakeClock")
        target = self._now + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, fut = heapq.heappop(self._sleepers)
            if fut.done():
                continue
            self._now = max(self._now, when)
            fut.set_result(None)
            # Woken code may go back to sleep before `target`; the loop picks that up too.
            await self.settle()
        self._now = target
        await self.settle()

    def set(self, now: float) -> None:
        """Jump to ``now`` without waking anyone (e.g. to simulate a wall-clock step)."""
        self._now = now


__all__ = ["Clock", "FakeClock", "SystemClock"]
