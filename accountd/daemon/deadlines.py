"""Every account's next deadline in one heap, and the one task that fires them.

Instead of a timer per account (what ``transitions``' ``Timeout`` states would do), each account
has at most one pending deadline: a state deadline (``timeout``), the heartbeat check, or the
next action of the recovery policy. They all live in ONE binary heap of
``(when, seq, account_id, kind)``. Replacing or cancelling a deadline does not search the heap:
a dict maps each account to its *current* entry and any other entry for that account is stale
and skipped when it reaches the top (lazy invalidation). So:

* ``set``/``cancel``: O(log n) / O(1); ``pop_due``: O(k log n) for the k entries that are due
  (plus the stale ones that surface), independent of how many accounts are waiting;
* stale entries are compacted away (one O(n) ``heapify``) once they outnumber the live ones, which
  amortises to O(1) per ``set``.

Heartbeat checks should not be re-armed on every heartbeat (that would be 100k pushes per 15 s);
arm one at ``entered_at + heartbeat_timeout`` and, when it fires, re-arm it at
``last_heartbeat + heartbeat_timeout`` if a heartbeat arrived meanwhile.

`DeadlineRunner` is the single task that sleeps until the earliest deadline (woken early when an
earlier one is set), pops what is due in batches and hands each batch to an async callback.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
from collections.abc import Awaitable, Callable

from accountd.daemon.clock import Clock

_log = logging.getLogger(__name__)

# (when, seq, account_id, kind). `seq` breaks ties in insertion order and keeps the comparison
# from ever reaching the strings.
_Entry = tuple[float, int, str, str]

# Below this many heap entries compaction is not worth a thought.
_COMPACT_MIN = 1024

OnDue = Callable[[list[tuple[str, str]]], Awaitable[None]]


class DeadlineQueue:
    """At most one pending deadline per account, ordered by time. Not thread-safe."""

    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._live: dict[str, _Entry] = {}
        self._seq = itertools.count()
        #: Entries removed from the heap so far (live or stale): a cost counter for tests/metrics.
        self.heap_pops = 0
        #: How many times the heap was rebuilt without its stale entries.
        self.compactions = 0

    def __len__(self) -> int:
        """Number of live deadlines (one per account at most)."""
        return len(self._live)

    def __contains__(self, account_id: object) -> bool:
        return account_id in self._live

    def get(self, account_id: str) -> tuple[float, str] | None:
        """The pending ``(when, kind)`` of ``account_id``, if any."""
        entry = self._live.get(account_id)
        return None if entry is None else (entry[0], entry[3])

    def set(self, account_id: str, when: float, kind: str) -> None:
        """Schedule ``kind`` for ``account_id`` at ``when``, replacing what was pending."""
        if math.isnan(when):
            raise ValueError(f"deadline for {account_id!r} is NaN")
        entry: _Entry = (when, next(self._seq), account_id, kind)
        self._live[account_id] = entry
        heapq.heappush(self._heap, entry)
        self._maybe_compact()

    def cancel(self, account_id: str) -> bool:
        """Drop the pending deadline of ``account_id``; False when there was none."""
        if self._live.pop(account_id, None) is None:
            return False
        self._maybe_compact()
        return True

    def pop_due(self, now: float, limit: int = 1000) -> list[tuple[str, str]]:
        """Remove and return up to ``limit`` ``(account_id, kind)`` due at or before ``now``.

        Earliest first; ties in the order they were set.
        """
        out: list[tuple[str, str]] = []
        heap, live = self._heap, self._live
        while heap and len(out) < limit and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            self.heap_pops += 1
            account_id = entry[2]
            if live.get(account_id) is entry:
                del live[account_id]
                out.append((account_id, entry[3]))
        return out

    def next_due(self) -> float | None:
        """When the earliest live deadline is due, or None when nothing is pending."""
        heap, live = self._heap, self._live
        # Discard stale heads so the answer is the earliest *live* deadline.
        while heap and live.get(heap[0][2]) is not heap[0]:
            heapq.heappop(heap)
            self.heap_pops += 1
        return heap[0][0] if heap else None

    def _maybe_compact(self) -> None:
        if len(self._heap) > _COMPACT_MIN and len(self._heap) > 2 * len(self._live):
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)
            self.compactions += 1

    @property
    def heap_size(self) -> int:
        """Entries in the heap, stale ones included (for tests and metrics)."""
        return len(self._heap)


class DeadlineRunner:
    """One task that fires due deadlines through ``on_due``, in batches.

    ``on_due`` is the engine's; an exception from it is logged with its traceback and the batch
    is dropped (the runner is the boundary: one bad batch must not stop every future deadline).
    The engine re-arms what it still needs on its next decision.
    """

    def __init__(
        self,
        queue: DeadlineQueue,
        on_due: OnDue,
        *,
        clock: Clock,
        batch_size: int = 1000,
        small_batch_size: int = 100,
        catch_up_batch_size: int = 5000,
        admin_waiting: Callable[[], bool] = lambda: False,
    ) -> None:
        if not 1 <= small_batch_size <= batch_size <= catch_up_batch_size:
            raise ValueError("need 1 <= small_batch_size <= batch_size <= catch_up_batch_size")
        self.queue = queue
        self._on_due = on_due
        self._clock = clock
        self._batch_size = batch_size
        # While an admin request is in flight (`AdminLane`), batches shrink: same work, more
        # loop turns. After a restart every online account's heartbeat check comes due within
        # one heartbeat period, and stays bunched like that: at a million accounts a wave of
        # ~60,000 re-arms a second for a third of the time, 1,000 per turn holding the loop for
        # ~7 ms a turn; an accountctl request needing seven turns waited ~50 ms for it.
        self._small_batch_size = small_batch_size
        self._admin_waiting = admin_waiting
        # Behind (the last round was full): bigger rounds. A mass event puts 100,000 expiries
        # at one instant; each round costs one loop turn, and while the door commits the mass
        # a turn is tens of milliseconds, so 100 rounds of 1,000 kept the deadlines due after
        # them (other accounts' heartbeat checks) waiting for seconds.
        self._catch_up_batch_size = catch_up_batch_size
        self._behind = False
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        #: Batches handed to ``on_due`` so far.
        self.batches = 0
        self._busy = False

    # -- scheduling, for the engine ---------------------------------------------------------

    def set(self, account_id: str, when: float, kind: str) -> None:
        """Schedule (or reschedule) ``account_id``; wakes the runner if this is now the earliest."""
        current = self.queue.next_due()
        self.queue.set(account_id, when, kind)
        if current is None or when < current:
            self._wake.set()

    def cancel(self, account_id: str) -> bool:
        # No wake-up needed: waking at the time of a cancelled deadline finds nothing and sleeps.
        return self.queue.cancel(account_id)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def busy(self) -> bool:
        """True while a batch is in ``on_due`` (which may await the database): lets a test on a
        `FakeClock` tell "nothing due" from "due and still being handled"."""
        return self._busy

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("DeadlineRunner already started")
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="accountd-deadlines")

    async def stop(self, grace: float = 5.0) -> None:
        """Ask the task to finish its current batch and exit; cancel it after ``grace`` seconds.

        Bounded: returns within about ``2 * grace`` whatever ``on_due`` does.
        """
        task = self._task
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            _log.warning("deadline runner still busy after %.1fs; cancelling it", grace)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=grace)
            if not done:
                # It swallowed the cancellation; we still return: shutdown must be bounded.
                _log.error("deadline runner ignored cancellation; abandoning it")
                return
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.error("deadline runner had crashed", exc_info=exc)

    # -- the loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            # Cleared before reading the queue, with no await in between: a `set` that happens
            # while we are busy below leaves the flag raised and cuts the next wait short.
            self._wake.clear()
            now = self._clock.now()
            if self._admin_waiting():
                size = self._small_batch_size
            else:
                size = self._catch_up_batch_size if self._behind else self._batch_size
            due = self.queue.pop_due(now, size)
            self._behind = len(due) == size
            if due:
                self.batches += 1
                self._busy = True
                try:
                    await self._on_due(due)
                except Exception:  # the boundary: log once, keep the deadlines of others alive
                    _log.exception("on_due failed for a batch of %d deadlines", len(due))
                finally:
                    self._busy = False
                # Yield even when on_due never awaited, so a long backlog cannot starve the loop.
                await asyncio.sleep(0)
                continue
            nxt = self.queue.next_due()
            if nxt is None:
                await self._wake.wait()
            elif nxt > now:
                await self._sleep_or_wake(nxt - now)

    async def _sleep_or_wake(self, delay: float) -> None:
        sleeper = asyncio.create_task(self._clock.sleep(delay))
        waker = asyncio.create_task(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)


__all__ = ["DeadlineQueue", "DeadlineRunner", "OnDue"]
