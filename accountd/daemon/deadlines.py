"""Every account's next deadline, and the one task that fires them.

Instead of a timer per account (what ``transitions``' ``Timeout`` states would do), each account
has at most one pending deadline: a state deadline (``timeout``), the heartbeat check, or the
next action of the recovery policy. The heartbeat checks of online accounts live in
`HeartbeatChecks` (below); every other deadline lives in ONE queue of ``(when, seq, account_id,
kind)`` entries. Replacing or cancelling a deadline does not search the queue: a dict maps each
account to its *current* entry, and any other entry for that account is stale and skipped when
its time comes (lazy invalidation).

The queue is a *calendar*: entries are appended, unsorted, to the bucket of their
`RESOLUTION`-long slice of time, and a small heap holds the keys of the buckets. Only the
earliest bucket (the head) is sorted, when its time comes, and consumed in order; a deadline set
at or before the head's slice goes to a small heap of its own, merged as the head is consumed.
So:

* ``set``: O(1) (a dict lookup and an append), ``cancel``: O(1);
* ``pop_due``: O(k) for the k entries that are due plus one sort per bucket, independent of how
  many accounts are waiting;
* stale entries are compacted away (one O(n) rebuild) once they outnumber the live ones, which
  amortises to O(1) per ``set``.

It was a binary heap until a million accounts: with every online account's heartbeat check
coming due about once per timeout, the heap popped and pushed ~25,000 entries a second, each
``heappop`` some forty tuple comparisons across a 1M-entry list that no cache holds. py-spy put
a fifth of the event loop in that one line (docs/benchmarks.md).

Heartbeat checks are not re-armed on every heartbeat (that would be 100k pushes per 15 s): one
is armed at ``entered_at + heartbeat_timeout`` and, when it comes due, re-armed at
``last_heartbeat + heartbeat_timeout`` if a heartbeat arrived meanwhile. Nearly every check is
re-armed, so `HeartbeatChecks` holds each check as a time and the `Account` in the same kind of
calendar and does the check itself: on the common path no sequence number, no dict of live
entries, no pair handed out.

`DeadlineRunner` is the single task that sleeps until the earliest deadline or check (woken
early when an earlier one is set), takes what is due in batches and hands each batch to the
engine's callbacks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Iterable

from accountd.daemon.clock import Clock
from accountd.statemachine import State
from accountd.statemachine.account import Account

_log = logging.getLogger(__name__)

# (when, seq, account_id, kind). `seq` breaks ties in insertion order and keeps the comparison
# from ever reaching the strings.
_Entry = tuple[float, int, str, str]

# Below this many entries compaction is not worth a thought.
_COMPACT_MIN = 1024
# The head's key while there is no head: every bucket comes after it.
_NO_KEY = -(2**62)
# What a consumed slot of the head holds (never read again).
_TAKEN: _Entry = (math.inf, -1, "", "")

OnDue = Callable[[list[tuple[str, str]]], Awaitable[None]]
OnExpired = Callable[[list[Account]], None]

# (when, seq, account): a heartbeat check taken out of `HeartbeatChecks` (the rare paths);
# `seq` orders checks due at one instant without ever comparing accounts.
_Check = tuple[float, int, Account]


class DeadlineQueue:
    """At most one pending deadline per account, ordered by time. Not thread-safe."""

    # Seconds of time per bucket. Small enough that the head bucket, sorted when its time
    # comes, holds a few thousand entries at a million accounts; it does not round deadlines.
    RESOLUTION = 0.05

    def __init__(self) -> None:
        self._live: dict[str, _Entry] = {}
        self._buckets: dict[int, list[_Entry]] = {}
        self._keys: list[int] = []  # heap of the keys of `_buckets`
        # The earliest bucket, sorted, consumed from `_pos`; every bucket's key is greater
        # than `_head_key`.
        self._head: list[_Entry] = []
        self._head_key = _NO_KEY
        self._pos = 0
        # Entries set at or before the head's slice (a retry due now, say), in a heap of
        # their own: inserting them into a head of a million (after a restart every check
        # comes due at the end of the grace) would move the whole list each time.
        self._early: list[_Entry] = []
        self._size = 0  # entries held, stale ones included
        self._seq = itertools.count()
        #: Entries taken off the queue so far (live or stale): a cost counter for tests/metrics.
        self.heap_pops = 0
        #: How many times the queue was rebuilt without its stale entries.
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
        self._put(entry)
        if self._size > 2 * len(self._live) and self._size > _COMPACT_MIN:
            self._compact()

    def set_many(self, items: Iterable[tuple[str, float, str]]) -> float:
        """`set` for each ``(account_id, when, kind)``, in order; returns the earliest ``when``
        (inf for none). One call for many, `_put` inlined: the daemon re-armed its heartbeat
        checks this way before `HeartbeatChecks` (`bench.deadline_queue` still replays it)."""
        live, buckets, keys, seq = self._live, self._buckets, self._keys, self._seq
        resolution, head_key = self.RESOLUTION, self._head_key
        earliest = math.inf
        added = 0
        try:
            for account_id, when, kind in items:
                if when != when:  # NaN, without a call per item
                    raise ValueError(f"deadline for {account_id!r} is NaN")
                entry: _Entry = (when, next(seq), account_id, kind)
                live[account_id] = entry
                added += 1
                if when < earliest:
                    earliest = when
                key = int(when // resolution)
                if key <= head_key:
                    heapq.heappush(self._early, entry)
                    continue
                bucket = buckets.get(key)
                if bucket is None:
                    buckets[key] = [entry]
                    heapq.heappush(keys, key)
                else:
                    bucket.append(entry)
        finally:
            # Those set before a NaN stay set, as with `set` one by one; the count stays true.
            self._size += added
        if self._size > 2 * len(live) and self._size > _COMPACT_MIN:
            self._compact()
        return earliest

    def _put(self, entry: _Entry) -> None:
        self._size += 1
        key = int(entry[0] // self.RESOLUTION)
        if key <= self._head_key:
            heapq.heappush(self._early, entry)
            return
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [entry]
            heapq.heappush(self._keys, key)
        else:
            bucket.append(entry)

    def cancel(self, account_id: str) -> bool:
        """Drop the pending deadline of ``account_id``; False when there was none."""
        if self._live.pop(account_id, None) is None:
            return False
        if self._size > 2 * len(self._live) and self._size > _COMPACT_MIN:
            self._compact()
        return True

    def _next_head(self) -> bool:
        """Make the earliest bucket the head (sorted); False when there is none."""
        if not self._keys:
            return False
        self._head_key = heapq.heappop(self._keys)
        self._head = self._buckets.pop(self._head_key)
        # (when, seq, …): seq is unique, so the strings are never compared. Entries arrive
        # mostly in order (a burst set at one instant is already sorted), which timsort
        # takes in one pass.
        self._head.sort()
        self._pos = 0
        return True

    def _first(self) -> _Entry | None:
        """The earliest entry held (live or stale), without taking it."""
        head, early = self._head, self._early
        while self._pos == len(head):
            if not self._next_head():
                return early[0] if early else None
            head = self._head
        entry = head[self._pos]
        return early[0] if early and early[0] < entry else entry

    def _drop_first(self, entry: _Entry) -> None:
        """Take `entry`, which `_first` just returned, off the queue."""
        if self._early and self._early[0] is entry:
            heapq.heappop(self._early)
        else:
            # Let the entry go now, not with the whole head: after a restart the head holds a
            # million checks due at the end of the grace, and their re-armed successors are
            # allocated while it is consumed (150 MB more at the peak, measured).
            self._head[self._pos] = _TAKEN
            self._pos += 1
        self._size -= 1
        self.heap_pops += 1

    def pop_due(self, now: float, limit: int = 1000) -> list[tuple[str, str]]:
        """Remove and return up to ``limit`` ``(account_id, kind)`` due at or before ``now``.

        Earliest first; ties in the order they were set.
        """
        out: list[tuple[str, str]] = []
        live = self._live
        while len(out) < limit:
            head, pos = self._head, self._pos
            if not self._early and pos < len(head):
                # The common case, in a tight loop: the sorted head, nothing set early to
                # merge. Taken slots are released at once, as in `_drop_first`.
                end = min(len(head), pos + limit - len(out))
                i = pos
                while i < end:
                    entry = head[i]
                    if entry[0] > now:
                        break
                    head[i] = _TAKEN
                    i += 1
                    account_id = entry[2]
                    if live.get(account_id) is entry:
                        del live[account_id]
                        out.append((account_id, entry[3]))
                self._pos = i
                self._size -= i - pos
                self.heap_pops += i - pos
                if i < end:
                    break  # the next entry is not due
                continue
            # A head whose slice begins after `now` is not sorted before its time comes.
            if self._pos == len(self._head) and not (
                self._early or (self._keys and self._keys[0] * self.RESOLUTION <= now)
            ):
                break
            first = self._first()
            if first is None or first[0] > now:
                break
            self._drop_first(first)
            account_id = first[2]
            if live.get(account_id) is first:
                del live[account_id]
                out.append((account_id, first[3]))
        return out

    def next_due(self) -> float | None:
        """When the earliest live deadline is due, or None when nothing is pending."""
        live = self._live
        while (entry := self._first()) is not None:
            if live.get(entry[2]) is entry:
                return entry[0]
            self._drop_first(entry)  # stale: the answer is the earliest *live* deadline
        return None

    def _compact(self) -> None:
        """Rebuild from the live entries alone, once stale ones outnumber them."""
        entries = list(self._live.values())
        self._buckets, self._keys, self._early = {}, [], []
        self._head, self._pos, self._head_key = [], 0, _NO_KEY
        self._size = 0
        for entry in entries:
            self._put(entry)
        self.compactions += 1

    @property
    def heap_size(self) -> int:
        """Entries held, stale ones included (for tests and metrics)."""
        return self._size


class HeartbeatChecks:
    """Every online account's heartbeat check: when it comes due, re-armed in place if the
    account beat since, else handed back as expired. Not thread-safe.

    The same calendar as `DeadlineQueue` (buckets of `RESOLUTION`, the earliest sorted when
    its time comes, a small heap for checks set at or before it), holding each check as a time
    and the account instead of ``(when, seq, id, kind)`` entries plus a dict of live ones.
    At a million accounts beating every 15 s with a 45 s timeout, ~25,000 checks come due a
    second and nearly all are re-armed: in the general queue each cost a pop, an ``(id, kind)``
    pair, the account's lookup, a new 4-tuple, a sequence number and two dict writes, and
    py-spy put the deadline runner at a quarter of the event loop during a mass event. Here a
    check is the lookup, a read of the account and two appends (`bench.deadline_queue`).

    A check is live while the account's ``heartbeat_check`` slot holds the very float of the
    check (an identity test); setting or discarding a check replaces or clears the slot, and
    the old one is skipped when its time comes. Stale checks need no compaction: each is
    consumed within one timeout of being set.

    A bucket is two parallel lists, times and accounts, not a list of ``(when, account)``
    pairs: a re-arm then allocates nothing the garbage collector tracks (a float is not
    tracked; a tuple is, until a collection looks at it). Re-arms free what they replace, so
    in the steady state no collection is triggered for minutes, and the first one then walked
    every pair made since: a full collection after 30 s of re-arms at a million accounts took
    159-160 ms with pairs, 49 ms with the lists (`bench.deadline_queue`, one machine).

    The lists hold the `Account` objects themselves, not their ids: looking an id up in the
    million-entry registry was the slowest line of the sweep (a cache miss or two before the
    account's own), 6 % of the event loop during a mass event (py-spy, 2026-12-04). An account
    deleted meanwhile is skipped like any stale check: `Supervisor.forget` discards its check.
    """

    RESOLUTION = DeadlineQueue.RESOLUTION

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout  # seconds of silence that make a heartbeat expired
        self._buckets: dict[int, tuple[list[float], list[Account]]] = {}
        self._keys: list[int] = []  # heap of the keys of `_buckets`
        # The earliest bucket, sorted by time, consumed from `_pos`.
        self._head_when: list[float] = []
        self._head_accs: list[Account] = []
        self._head_key = _NO_KEY
        self._pos = 0
        self._early: list[_Check] = []  # a heap: set at or before the head's slice
        self._seq = itertools.count()  # for `_early` only
        self._size = 0  # checks held, stale ones included
        #: Checks that came due so far (re-armed, expired or stale): a cost counter for tests.
        self.taken = 0

    def __len__(self) -> int:
        """Checks held, stale ones included (live ones are at most one per online account)."""
        return self._size

    def set(self, acc: Account, when: float) -> None:
        """Check ``acc``'s heartbeat at ``when``, replacing its pending check."""
        if math.isnan(when):
            raise ValueError(f"heartbeat check for {acc.id!r} is NaN")
        acc.heartbeat_check = when
        self._size += 1
        key = int(when // self.RESOLUTION)
        if key <= self._head_key:
            heapq.heappush(self._early, (when, next(self._seq), acc))
            return
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = ([when], [acc])
            heapq.heappush(self._keys, key)
        else:
            bucket[0].append(when)
            bucket[1].append(acc)

    @staticmethod
    def discard(acc: Account) -> None:
        """No more checks for ``acc`` (it left ``online`` or was deleted)."""
        acc.heartbeat_check = None

    def _first(self) -> _Check | None:
        """The earliest check held (live or stale), without taking it."""
        while self._pos == len(self._head_when):
            if not self._keys:
                return self._early[0] if self._early else None
            self._head_key = heapq.heappop(self._keys)
            times, accs = self._buckets.pop(self._head_key)
            # Sorted by time alone (ties stay in the order set), through the indices: the
            # sorted lists are the only objects made.
            order = sorted(range(len(times)), key=times.__getitem__)
            self._head_when = [times[i] for i in order]
            self._head_accs = [accs[i] for i in order]
            self._pos = 0
        entry = (self._head_when[self._pos], -1, self._head_accs[self._pos])
        early = self._early
        return early[0] if early and early[0][0] < entry[0] else entry

    def _drop_first(self) -> None:
        early = self._early
        pos = self._pos
        if early and (pos == len(self._head_when) or early[0][0] < self._head_when[pos]):
            heapq.heappop(early)
        else:
            self._head_when[pos] = math.inf  # let the float go now, not with the whole head
            self._pos = pos + 1
        self._size -= 1
        self.taken += 1

    @staticmethod
    def _live(check: _Check) -> Account | None:
        acc = check[2]
        return acc if acc.heartbeat_check is check[0] else None

    def next_due(self) -> float | None:
        """When the earliest live check is due, or None when there is none."""
        while (first := self._first()) is not None:
            if self._live(first) is not None:
                return first[0]
            self._drop_first()
        return None

    def sweep(self, now: float, limit: int = 1000) -> tuple[list[Account], int]:
        """Take up to ``limit`` checks due at or before ``now``, earliest first: an account
        that beat within ``timeout`` is re-checked at its last beat + ``timeout``; the others
        are returned (expired), their check cleared. Also returns how many checks were taken.
        """
        expired: list[Account] = []
        timeout = self.timeout
        online = State.online
        inf = math.inf
        taken = 0
        while taken < limit:
            first = self._first()
            if first is None or first[0] > now:
                break
            if self._early:
                # Set early (rare): one at a time, merged with the head in time order.
                self._drop_first()
                taken += 1
                self._check(first, now, expired)
                continue
            # The common case in a tight loop: the sorted head, nothing set early.
            times, accs, pos = self._head_when, self._head_accs, self._pos
            buckets, resolution, head_key = self._buckets, self.RESOLUTION, self._head_key
            end = min(len(times), pos + limit - taken)
            i = pos
            while i < end:
                when = times[i]
                if when > now:
                    break
                times[i] = inf
                acc = accs[i]
                i += 1
                if acc.heartbeat_check is not when or acc.status is not online:
                    continue  # replaced or discarded (left online, deleted) since
                last = acc.last_heartbeat
                if last is None or last < acc.entered_at:
                    last = acc.entered_at
                due = last + timeout
                if due <= now:
                    acc.heartbeat_check = None
                    expired.append(acc)
                    continue
                # `set`, inlined: this line runs ~25,000 times a second at a million accounts.
                key = int(due // resolution)
                bucket = buckets.get(key) if key > head_key else None
                if bucket is None:
                    self.set(acc, due)  # a new bucket, or one at or before the head's slice
                    continue
                acc.heartbeat_check = due
                bucket[0].append(due)
                bucket[1].append(acc)
                self._size += 1
            self._pos = i
            self._size -= i - pos
            self.taken += i - pos
            taken += i - pos
            if i < end:
                break  # the next check is not due
        return expired, taken

    def _check(self, check: _Check, now: float, expired: list[Account]) -> None:
        acc = self._live(check)
        if acc is None or acc.status is not State.online:
            return
        last = acc.last_heartbeat
        if last is None or last < acc.entered_at:
            last = acc.entered_at
        if last + self.timeout > now:
            self.set(acc, last + self.timeout)
        else:
            acc.heartbeat_check = None
            expired.append(acc)


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
        checks: HeartbeatChecks | None = None,
        on_expired: OnExpired = lambda expired: None,
    ) -> None:
        if not 1 <= small_batch_size <= batch_size <= catch_up_batch_size:
            raise ValueError("need 1 <= small_batch_size <= batch_size <= catch_up_batch_size")
        self.queue = queue
        self._on_due = on_due
        # Heartbeat checks come due beside the queue's deadlines, in the same rounds; the
        # accounts whose check found no heartbeat go to ``on_expired`` (synchronous: it only
        # sorts them into the engine's re-check queues).
        self.checks = checks if checks is not None else HeartbeatChecks(math.inf)
        self._on_expired = on_expired
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
        # When the runner looks at the queue next on its own: -inf while it works through it,
        # the time it sleeps until, inf while it waits for a wake-up. `set` compares against
        # this instead of asking the queue for its earliest deadline every time: the engine
        # sets deadlines from inside ``on_due`` and ``on_expired``, where no wake-up is needed.
        self._until = math.inf

    # -- scheduling, for the engine ---------------------------------------------------------

    def set(self, account_id: str, when: float, kind: str) -> None:
        """Schedule (or reschedule) ``account_id``; wakes the runner if it is due before the
        runner would look again."""
        self.queue.set(account_id, when, kind)
        if when < self._until:
            self._wake.set()

    def check(self, acc: Account, when: float) -> None:
        """Check ``acc``'s heartbeat at ``when`` (`HeartbeatChecks.set`); wakes the runner if
        that is before it would look again."""
        self.checks.set(acc, when)
        if when < self._until:
            self._wake.set()

    def next_due(self) -> float | None:
        """The earliest deadline or heartbeat check still pending, or None."""
        a, b = self.queue.next_due(), self.checks.next_due()
        return a if b is None else b if a is None else min(a, b)

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
            self._until = -math.inf
            now = self._clock.now()
            if self._admin_waiting():
                size = self._small_batch_size
            else:
                size = self._catch_up_batch_size if self._behind else self._batch_size
            due = self.queue.pop_due(now, size)
            expired, taken = self.checks.sweep(now, size)
            self._behind = len(due) == size or taken == size
            if due or expired:
                self.batches += 1
                self._busy = True
                try:
                    if expired:
                        self._expire(expired, now)
                    if due:
                        await self._on_due(due)
                except Exception:  # the boundary: log once, keep the deadlines of others alive
                    _log.exception("on_due failed for a batch of %d deadlines", len(due))
                finally:
                    self._busy = False
            if due or taken:
                # Yield even when on_due never awaited, so a long backlog cannot starve the loop.
                await asyncio.sleep(0)
                continue
            nxt = self.next_due()
            if nxt is None:
                self._until = math.inf
                await self._wake.wait()
            elif nxt > now:
                self._until = nxt
                await self._sleep_or_wake(nxt - now)
        self._until = math.inf

    def _expire(self, expired: list[Account], now: float) -> None:
        try:
            self._on_expired(expired)
        except Exception:
            # Their checks were cleared when they came due: looked at again in a second rather
            # than never (an account left online however long it stays silent).
            _log.exception("on_expired failed for %d heartbeat checks", len(expired))
            for acc in expired:
                if acc.heartbeat_check is None:
                    self.checks.set(acc, now + 1.0)

    async def _sleep_or_wake(self, delay: float) -> None:
        sleeper = asyncio.create_task(self._clock.sleep(delay))
        waker = asyncio.create_task(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)


__all__ = ["DeadlineQueue", "DeadlineRunner", "HeartbeatChecks", "OnDue", "OnExpired"]
