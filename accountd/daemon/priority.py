"""Admin requests cut in line ahead of bulk ingest, with a bounded share of the loop.

Under a heartbeat flood the event loop is busy all the time: every turn holds a slice of some
heartbeat batch. An `accountctl show` needs six or seven turns (the request, a pool checkout,
three database round trips, the answer), so it waited seven slices plus whatever else was due
in each turn: 175 ms at p50, 640 ms at p99 with a million accounts (docs/benchmarks.md).

`AdminLane` is the small fix: the control socket marks its requests as in flight (`admit`), and
bulk work asks for the lane before each step (`bulk_step`). While an admin request is in
flight, that step waits until the request is answered, so the request's turns hold no bulk
work. Since the side loop (`accountd/daemon/side_loop.py`) serves the control socket and
/metrics from their own thread, `show`, `history` and scrapes no longer need the main loop's
turns at all; the lane is for the requests still handed to the main loop (status, list,
force, recover, pause, resume, reload), which `make_control_app` admits there.

Two bounds keep the daemon's main job safe, since a starved ingest means heartbeats the
daemon did not hear (and, left long enough, false `heartbeat_lost` decisions):

* a step never waits longer than `max_pause` for admin requests, however many there are;
* after it waited, bulk work earns a third of the time it gave away as uninterrupted time
  (`CREDIT_SHARE`): a script hammering the control socket with back-to-back requests gets at
  most three quarters of the loop, and ingest keeps at least a quarter (at a million accounts
  that is still ~75,000 heartbeats/s, more than a million workers beating every 15 s send).

Bulk work is everything that may wait a few milliseconds without harm: heartbeat batches, the
heartbeat flush and poll, the metrics refresh. Decisions (deadlines, the door) never wait here.

No I/O and no clock but the monotonic one (injectable for tests); one instance per daemon,
shared by the listeners it owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator

# Uninterrupted bulk time earned per second of giving way (see the module docstring).
CREDIT_SHARE = 1 / 3


class AdminLane:
    """Counts admin requests in flight and makes bulk steps give way to them, within bounds."""

    def __init__(
        self, *, max_pause: float = 0.1, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        if not max_pause > 0:
            raise ValueError("max_pause must be positive")
        self.max_pause = max_pause
        self._monotonic = monotonic
        self._admins = 0
        self._clear = asyncio.Event()
        self._clear.set()
        # Seconds of bulk work that may still run without giving way (earned by waiting).
        self._credit = 0.0
        self.admitted = 0  # admin requests ever admitted (tests, metrics)
        self.pauses = 0  # bulk steps that gave way

    @property
    def admins(self) -> int:
        """Admin requests in flight now."""
        return self._admins

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Mark one admin request in flight for the duration of the block."""
        self._admins += 1
        self.admitted += 1
        self._clear.clear()
        try:
            yield
        finally:
            self._admins -= 1
            if self._admins == 0:
                self._clear.set()

    @contextlib.asynccontextmanager
    async def bulk_step(self) -> AsyncIterator[None]:
        """Run one step of bulk work (a few milliseconds), after admin requests if any are in
        flight and the bulk work has no credit left."""
        if self._admins and self._credit <= 0:
            started = self._monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.max_pause):
                    await self._clear.wait()
            waited = self._monotonic() - started
            self.pauses += 1
            self._credit = waited * CREDIT_SHARE
        started = self._monotonic()
        try:
            yield
        finally:
            if self._credit > 0:
                self._credit -= self._monotonic() - started


__all__ = ["AdminLane"]
