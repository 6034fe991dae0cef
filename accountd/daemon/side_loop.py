"""A second event loop, on its own thread, for the listeners that must answer while ingest is busy.

Under a heartbeat flood the main loop never idles: every turn holds a heartbeat slice, a
deadline batch, a flush statement. Anything served by that loop waits for turns before its
handler even runs (an `accountctl show` waited two turns to be parsed, then one per database
round trip), and no priority inside the loop can shorten the turns before a request is read.
So the control socket and the metrics listener run here instead: this loop is idle almost
always, wakes on its own sockets, and needs only the GIL, not a turn of the main loop.

What decides its latency is how soon the busy main thread hands over the GIL. CPython makes a
running thread give it up after `sys.getswitchinterval()` (5 ms by default) when another thread
asks; a request that wakes this loop four or five times (accept, read, two database answers,
write) waited ~35 ms for it at p50. With 1 ms it waited ~6 ms (docs/benchmarks.md, "Control
latency"); with 0.25 ms `accountctl show` under a flood at a million accounts took 8.5-9.3 ms
at p50 against 12.0-12.9 ms with 1 ms, ingest as fast (2026-12-04). A forced switch costs a
few µs, and only happens while this thread waits for the GIL, which is while it serves
something. It is lowered for as long as the side loop runs: lowering it only while a request
is in flight here cost the request a first wait of up to 5 ms and measured worse (show under a
flood at 1M: p50 24–33 ms against 17–21 ms). On MariaDB no other thread wants the GIL when the
side loop is idle, so the low interval costs nothing then; on SQLite, aiosqlite's worker
thread trades the GIL with the main thread more often.

The hand-over still fails when the main thread is off the CPU: it holds the GIL while the
kernel runs something else (on a saturated 2-core machine: MariaDB, the clients), and a thread
waiting for the GIL waits until the main thread is scheduled again, at each of the several
wake-ups of a request. So a database read here is also held up by the main thread's turn on
the CPU (`show` under a flood at a million accounts: its handler took p99 43.0 ms while the
same read as plain SQL, from another process, took 21.5 ms). `MainLoopHold` removes that for
`show` and `history`: while one runs, the main thread waits on an event, blocked and without the
GIL, for at most `HOLD_LONGEST` and, over time, a `HOLD_SHARE` of the wall clock, so a script
hammering the socket cannot stop ingest (docs/benchmarks.md, 2026-12-05).

Rules for code running on this loop (see `accountd/daemon/control.py` and `metrics.py`):

* no object of the main loop is awaited or touched here (futures, events, locks, engines);
  work that needs the main loop goes there with `on_main` and its result comes back;
* reads of the daemon's in-memory state take what one C call can copy (``dict.get``,
  ``list(d.items())``), or hold `Supervisor.view_lock` for an account's several fields.

One owner: the daemon enters it in its `AsyncExitStack`; everything started on it is stopped on
it before the loop stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# GIL hand-over time for as long as the side loop runs (module docstring).
SWITCH_INTERVAL = 0.00025
# How long `stop` waits for the thread once its loop was told to stop.
JOIN_TIMEOUT = 5.0
# `MainLoopHold`: one hold lasts at most this long (a read stuck on the database lets the main
# loop go on after it), and holds take at most this share of the wall clock over time.
HOLD_LONGEST = 0.05
HOLD_SHARE = 0.25


class SideLoop:
    """An event loop running on a daemon-owned thread; `run` executes coroutines on it."""

    def __init__(self, name: str = "accountd-side") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._previous_interval: float | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("side loop not started")
        return self._loop

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("side loop already started")
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            try:
                loop.run_forever()
            finally:
                asyncio.set_event_loop(None)

        thread = threading.Thread(target=main, name=self.name, daemon=True)
        thread.start()
        # The thread is up within microseconds; waiting in a worker thread keeps the rule
        # that the main loop never blocks.
        await asyncio.to_thread(started.wait)
        self._loop, self._thread = loop, thread
        self._previous_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._previous_interval, SWITCH_INTERVAL))

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the side loop and wait for it here (cancelling this cancels it)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def call(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """`run` of ``fn()``: for `AsyncExitStack.push_async_callback` (the coroutine is made
        when the callback runs, not when it is registered)."""
        return await self.run(fn())

    async def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            await self.run(_cancel_the_rest())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join, JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("side loop: thread did not stop within %gs", JOIN_TIMEOUT)
            else:
                loop.close()
            self._loop = self._thread = None
            if self._previous_interval is not None:
                sys.setswitchinterval(self._previous_interval)
                self._previous_interval = None


class MainLoopHold:
    """Holds the main loop while a request runs on the side loop (module docstring).

    ``with hold():`` on the side loop puts a callback on the main loop that blocks its thread
    (waiting on an event, without the GIL) until the block ends, or for at most ``longest``
    seconds. The holds draw on a credit that grows by ``share`` seconds per second up to
    ``longest``; with none left, a request runs without one. The main loop reaches the
    callback after the callbacks ahead of it, a few ms under load; if the request ended first,
    the callback returns at once.
    """

    def __init__(
        self,
        main_loop: asyncio.AbstractEventLoop,
        *,
        longest: float = HOLD_LONGEST,
        share: float = HOLD_SHARE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loop = main_loop
        self._longest = longest
        self._share = share
        self._clock = clock
        # Both threads change the credit: the side loop's when a hold is asked for, the main
        # loop's when it has waited.
        self._lock = threading.Lock()
        self._credit = longest
        self._credited_at = clock()
        self.holds = 0  # holds the main loop ran (it may have waited 0 s in them)
        self.held_seconds = 0.0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        done = threading.Event()
        with self._lock:
            now = self._clock()
            elapsed = now - self._credited_at
            self._credit = min(self._longest, self._credit + elapsed * self._share)
            self._credited_at = now
            credit = self._credit
        # Never the loop this runs on: it would wait for itself.
        if credit > 0 and self._loop is not _running_loop():
            # A closed main loop (shutting down) has nothing to hold.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._hold, done, credit)
        try:
            yield
        finally:
            done.set()

    def _hold(self, done: threading.Event, credit: float) -> None:
        """On the main loop: wait for the request to end, at most ``credit`` seconds."""
        started = self._clock()
        done.wait(credit)
        waited = self._clock() - started
        with self._lock:
            self._credit -= waited
            self.holds += 1
            self.held_seconds += waited


async def on_main(loop: asyncio.AbstractEventLoop | None, work: Awaitable[T]) -> T:
    """Await ``work`` on ``loop`` (the main loop) from whichever loop runs this.

    ``loop`` None or the running loop: awaited in place (tests serve everything on one loop).
    Cancelling the caller cancels the work on the main loop.
    """
    if loop is None or loop is asyncio.get_running_loop():
        return await work

    async def wrapped() -> T:
        return await work

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(wrapped(), loop))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _cancel_the_rest() -> None:
    """Cancel whatever is still running on the side loop (a stuck request, a timer)."""
    me = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not me]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


__all__ = ["HOLD_LONGEST", "HOLD_SHARE", "SWITCH_INTERVAL", "MainLoopHold", "SideLoop", "on_main"]
