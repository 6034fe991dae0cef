"""The one door: every status change of every account passes through `Door`.

Worker events, deadlines, heartbeat loss, recovery and admin forces all call `Door.fire`. The door
queues the request; ONE task (the committer) takes the queue in batches, validates each change
against the transition table and the in-memory state, asks the planner for the row/log/supervision
values, commits the whole batch through `AccountRepository.apply_transitions` (compare-and-set +
log row + supervision row per account, one transaction), and only after the commit lets the
planner update memory, deadlines and metrics. A lost compare-and-set reloads the row and the
change is decided again against what the database says.

Because only the committer task changes state, there are no races inside the process: two changes
to one account never share a batch, and each is validated against the state the previous one left.
Mass changes (a worker host dies and 10,000 accounts lose heartbeats) become a few large
set-based transactions instead of 10,000 small ones.

Throughput at scale (docs/benchmarks.md) comes from these:

* **Pipelining.** Up to ``pipeline`` batches are in flight at once, each in its own transaction
  on its own connection, so one batch's Python work overlaps another's server work. An account
  is in at most one in-flight batch (the committer skips accounts that are busy), so per-account
  order is kept. SQLite has one writer, so it gets ``pipeline=1``.
* **Adaptive batches.** A backlog of bulk changes alone is taken ``max_batch`` at a time:
  fewer, larger statements and commits. With normal changes waiting, batches keep their usual
  size, so they commit soon. (The supervisor gives SQLite no larger batches: with one writer,
  a normal change also waits for the whole batch in flight.)
* **Two lanes.** Changes fired as part of a mass event (``bulk=True``) wait in their own lane;
  every batch takes the normal lane first and fills up from the bulk lane. A mass event then
  runs at full speed without delaying anyone else's change by more than about one batch.
* **An express batch.** With ``express`` (MariaDB/MySQL), a normal change does not even wait
  for that batch: while batches holding a mass event's changes are being committed, the
  normal lane's changes go in a batch of their own, not filled from the bulk lane, on one more
  connection if every slot is taken; at most one such batch is in flight. At a million
  accounts on a 2-core machine, waiting for a slot and then committing a full batch had been
  up to 0.43 s of another account's detection delay during a 100,000-account mass event
  (docs/benchmarks.md).

A batch of at least ``journal_min`` changes writes its supervision rows as one journal row (see
`accountd.adapters.repository`): the multi-row upsert of those rows had cost the database more
than the status update and the log rows together. `Door.fold_journal` folds the journal into
``accountd_supervision`` later. While the journal may hold a row not yet folded, every write of
supervision state through the door goes to the journal too, so a fold never puts an older row
over a newer one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy.exc import DBAPIError, OperationalError

from accountd.adapters.repository import (
    AccountRepository,
    AccountRow,
    Applied,
    ConcurrentWrite,
    Conflict,
    TransitionRequest,
)
from accountd.daemon.protocol import ItemResult
from accountd.errors import IllegalTransition, Overloaded
from accountd.statemachine import State, Trigger, next_state
from accountd.statemachine.account import Account

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often a change whose compare-and-set keeps losing is re-decided before we give up on it.
MAX_CONFLICT_RETRIES = 3


@dataclass(slots=True)
class Change:
    """One requested status change."""

    account_id: str
    trigger: Trigger
    cause: str  # why, in words: goes into change_reason after the trigger name
    target: State | None = None  # the destination of an admin `force`
    data: Mapping[str, Any] | None = None  # event payload (qr_code, error, ...)
    operator_id: str | None = None
    # Apply only while the account is still in this state / at this version: a deadline set when
    # the account entered `waiting_qr` must not fire after it has moved on.
    expect_state: State | None = None
    expect_version: int | None = None
    future: asyncio.Future[ItemResult] | None = None
    retries: int = 0


@dataclass(slots=True)
class _Exclusive:
    """A job the committer runs alone (see `Door.exclusive`)."""

    fn: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any]

    async def run(self) -> None:
        try:
            result = await self.fn()
        except Exception as exc:  # handed to the caller, who decides what it means
            if not self.future.done():
                self.future.set_exception(exc)
        else:
            if not self.future.done():
                self.future.set_result(result)


@dataclass(slots=True)
class Planned:
    """What the planner decided for a legal change."""

    request: TransitionRequest
    new_state: State
    context: Any = None  # passed back to `after_commit` (e.g. the next action to schedule)


@dataclass(slots=True)
class Redirect:
    """The planner turns the change into another trigger (e.g. a 4th QR refresh becomes `fail`)."""

    trigger: Trigger
    cause: str
    data: Mapping[str, Any] | None = None


@dataclass(slots=True)
class Repeat:
    """The planner recognises the change as a repeat of one already committed (a worker
    resending a batch whose answer it never got): answered `duplicate`, nothing written."""


class Planner(Protocol):
    """Implemented by the supervisor: the policy decisions around a transition."""

    def plan(
        self, acc: Account, change: Change, new_state: State, now: float
    ) -> Planned | Redirect | Repeat: ...

    def after_commit(self, acc: Account, change: Change, planned: Planned, now: float) -> None: ...

    def refresh(self, acc: Account | None, account_id: str, row: AccountRow | None) -> None: ...

    def lookup(self, account_id: str) -> Account | None: ...

    def now(self) -> float: ...


@dataclass(slots=True)
class DoorStats:
    committed: int = 0
    conflicts: int = 0
    illegal: int = 0
    batches: int = 0
    db_errors: int = 0
    last_batch_seconds: float = 0.0
    queue_peak: int = 0
    commit_latency: deque[float] = field(default_factory=lambda: deque(maxlen=1024))


class Door:
    """The single writer of account status, supervision state and status log rows."""

    def __init__(
        self,
        repo: AccountRepository,
        planner: Planner,
        *,
        batch_size: int = 500,
        max_batch: int | None = None,
        pipeline: int = 1,
        express: bool = False,
        max_pending: int = 200_000,
        journal_min: int = 200,
    ) -> None:
        if batch_size < 1 or pipeline < 1:
            raise ValueError("batch_size and pipeline must be positive")
        self.repo = repo
        self.planner = planner
        self.batch_size = batch_size
        # A backlog in the bulk lane alone is taken in bigger bites (fewer, larger statements).
        self.max_batch = max(batch_size, max_batch if max_batch is not None else 2 * batch_size)
        self.pipeline = pipeline
        self.express = express
        self.max_pending = max_pending
        self.journal_min = journal_min
        # Journal rows that may be in the table (written, or written with an unknown outcome),
        # journal writes in flight, and journal writes ever started: `fold_journal` may call
        # the journal empty only if no write was in flight or began while it looked.
        self.journal_rows = 0
        self._journal_writing = 0
        self._journal_started = 0
        self._queue: deque[Change | _Exclusive] = deque()
        self._bulk: deque[Change] = deque()
        # Batches being committed, and the accounts in them (at most one batch per account).
        self._inflight: set[asyncio.Task[None]] = set()
        self._busy: set[str] = set()
        self._bulk_batches = 0
        self._express_in_flight = False
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.stats = DoorStats()
        self.db_healthy = True
        self._delay = 0.2  # backoff after a failed commit
        # Timing hook (database, operation, seconds) for accountd_db_latency_seconds.
        self.on_db_time: Callable[[str, str, float], None] | None = None

    # -- the door ------------------------------------------------------------------------

    def fire(self, change: Change, *, bulk: bool = False) -> asyncio.Future[ItemResult]:
        """Queue a change; the future resolves once it is committed (or refused).

        ``bulk``: one of many changes of a mass event; it waits in the bulk lane, behind every
        change fired without the flag, so a mass event cannot starve other accounts. A later
        normal change may therefore overtake it, so it must be guarded (``expect_state`` or
        ``expect_version``): once anything else changed the account, it no longer applies.
        """
        change.future = asyncio.get_running_loop().create_future()
        self._enqueue(change, bulk)
        return change.future

    def fire_unanswered(self, change: Change) -> None:
        """`fire` with ``bulk=True`` for a change whose outcome nobody waits for: a mass
        event's heartbeat losses. No future, no callback: at 100,000 changes those were a
        visible share of the event loop's time (and of its garbage collections)."""
        self._enqueue(change, True)

    def _enqueue(self, change: Change, bulk: bool) -> None:
        if bulk and change.expect_state is None and change.expect_version is None:
            raise ValueError("a bulk change needs expect_state or expect_version")
        if self._stopping:
            raise Overloaded(5.0, "accountd is shutting down")
        pending = self.pending
        if pending + self.held >= self.max_pending:
            raise Overloaded(1.0, f"{pending + self.held} changes already pending")
        if bulk:
            self._bulk.append(change)
        else:
            self._queue.append(change)
        if pending >= self.stats.queue_peak:
            self.stats.queue_peak = pending + 1
        self._idle.clear()
        self._wakeup.set()

    def fire_many(
        self, changes: Sequence[Change], *, bulk: bool = False
    ) -> list[asyncio.Future[ItemResult]]:
        if self._stopping:
            raise Overloaded(5.0, "accountd is shutting down")
        if self.pending + self.held + len(changes) > self.max_pending:
            raise Overloaded(1.0, f"{self.pending + self.held} changes already pending")
        return [self.fire(c, bulk=bulk) for c in changes]

    async def exclusive(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` in the committer task, between batches, and return its result.

        For writes of supervision state that are not transitions (an admin's pause): they go
        through the same single writer, so no batch planned with the old value can commit after
        them and undo them.
        """
        if self._stopping:
            raise Overloaded(5.0, "accountd is shutting down")
        item: _Exclusive = _Exclusive(fn, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._idle.clear()
        self._wakeup.set()
        return cast(T, await item.future)

    @property
    def journal_active(self) -> bool:
        """Whether the journal may hold a row not folded yet (then supervision goes there)."""
        return self.journal_rows > 0 or self._journal_writing > 0

    @contextlib.asynccontextmanager
    async def _journal_write(self) -> AsyncIterator[None]:
        self._journal_writing += 1
        self._journal_started += 1
        try:
            yield
        finally:
            # Counted whatever the outcome: a commit whose answer was lost may have landed.
            # Counting one too many only keeps the journal in use until the next fold.
            self._journal_writing -= 1
            self.journal_rows += 1

    async def save_supervision(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write supervision state that is not a transition (from an `exclusive` function)."""
        if not self.journal_active:
            await self.repo.save_supervision(rows)
            return
        async with self._journal_write():
            await self.repo.save_supervision(rows, journal=True)

    async def fold_journal(self, limit: int = 10) -> int:
        """Fold up to ``limit`` journal rows into accountd_supervision; the rows folded.

        Runs beside the committer (a fold touches only accounts whose newest supervision state
        is in the journal, which the committer no longer writes directly). Called by the
        heartbeat flush job, at start-up and at shutdown, never by two tasks at once.
        """
        quiet = self._journal_writing == 0
        started = self._journal_started
        folded, _ = await self.repo.fold_journal(limit)
        self.journal_rows = max(0, self.journal_rows - folded)
        undisturbed = quiet and self._journal_writing == 0 and self._journal_started == started
        if folded == 0 and undisturbed:
            # Nothing was being written while it looked and the table was empty: every journal
            # row counted (including those of lost answers) is accounted for.
            self.journal_rows = 0
        return folded

    @property
    def pending(self) -> int:
        """Changes waiting for a batch (not counting those being committed)."""
        return len(self._queue) + len(self._bulk)

    @property
    def bulk_pending(self) -> int:
        """Changes of mass events waiting in the bulk lane."""
        return len(self._bulk)

    @property
    def bulk_in_flight(self) -> int:
        """Batches being committed that hold changes of the bulk lane."""
        return self._bulk_batches

    @property
    def held(self) -> int:
        """Changes in batches being committed (or retried while the database is down): they
        count against ``max_pending`` too, so the bound holds memory during an outage."""
        return len(self._busy)

    @property
    def in_flight(self) -> int:
        """Batches being committed right now."""
        return len(self._inflight)

    async def wait_idle(self) -> None:
        """Until every queued change has been committed or refused."""
        await self._idle.wait()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        assert self._task is None
        self._task = asyncio.create_task(self._run(), name="accountd-door")

    async def drain(self, grace: float) -> bool:
        """Stop taking changes and wait (bounded) until the queued ones are committed."""
        self._stopping = True
        self._wakeup.set()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
            return True
        except TimeoutError:
            log.warning("door: %d changes still pending at shutdown", self.pending)
            return False

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # Whatever is left is refused, never silently dropped.
        for lane in (self._queue, self._bulk):
            while lane:
                item = lane.popleft()
                if item.future is not None and not item.future.done():
                    item.future.set_exception(Overloaded(5.0, "accountd stopped"))

    # -- the committer -------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                self._wakeup.clear()
                head = self._queue[0] if self._queue else None
                if isinstance(head, _Exclusive):
                    # Runs alone: after every batch in flight has committed, before the next.
                    if not self._inflight:
                        self._queue.popleft()
                        await head.run()
                        continue
                else:
                    if self._express_open():
                        batch, _ = self._take_batch(fill=False)
                        if batch:
                            self._start(batch, False, express=True)
                            continue
                    if len(self._inflight) < self.pipeline and self._worth_a_batch():
                        batch, bulk = self._take_batch()
                        if batch:
                            self._start(batch, bulk)
                            continue
                if not self._inflight and not self._queue and not self._bulk:
                    self._idle.set()
                # New changes, and every batch that finishes, set the event.
                await self._wakeup.wait()
        finally:
            for task in self._inflight:
                task.cancel()
            for task in list(self._inflight):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _worth_a_batch(self) -> bool:
        """Start another batch now? Normal changes: at once. A mass event's changes arrive a
        round at a time; while a batch is in flight, wait until a full batch has gathered
        (or that batch finishes) rather than commit many small ones."""
        if self._queue:
            return True
        return bool(self._bulk) and (not self._inflight or len(self._bulk) >= self.batch_size)

    def _express_open(self) -> bool:
        """Start an express batch now? Normal changes wait, a mass event's changes are being
        committed, and no express batch is in flight. Taken even when a slot is free: that
        slot then gets a full batch of the bulk lane rather than one cut to the usual size."""
        return (
            self.express
            and bool(self._queue)
            and self._bulk_batches > 0
            and not self._express_in_flight
        )

    def _start(self, batch: list[Change], bulk: bool, *, express: bool = False) -> None:
        self._busy.update(c.account_id for c in batch)
        self._express_in_flight |= express
        task = asyncio.create_task(
            self._commit_batch(batch, bulk, express), name="accountd-door-batch"
        )
        self._inflight.add(task)
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wakeup.set()

    async def _commit_batch(self, batch: list[Change], bulk: bool, express: bool = False) -> None:
        """One batch, in its own task: commit it, or put it back and back off."""
        self._bulk_batches += bulk
        try:
            await self._commit(batch)
        except (OperationalError, DBAPIError, OSError) as exc:
            # The database is down or refused the batch. Nothing of the batch was applied
            # (one transaction); back off, then put it back at the front. Its accounts stay
            # busy meanwhile, so no later change of theirs can overtake it.
            self.db_healthy = False
            self.stats.db_errors += 1
            # Capped at 2 s: after an outage the first commit lands within ~2 s of the return.
            delay, self._delay = self._delay, min(self._delay * 2, 2.0)
            log.warning("door: commit failed, retrying in %.1fs: %s", delay, _short(exc))
            try:
                await asyncio.sleep(delay)
            finally:
                self._requeue_front(batch)
        except asyncio.CancelledError:
            self._requeue_front(batch)  # `stop` refuses them
            raise
        except Exception as exc:  # boundary: a bug must not leave callers waiting forever
            log.exception("door: batch of %d failed", len(batch))
            for change in batch:
                if change.future is not None and not change.future.done():
                    change.future.set_exception(exc)
        finally:
            self._busy.difference_update(c.account_id for c in batch)
            self._bulk_batches -= bulk
            if express:
                self._express_in_flight = False

    def _requeue_front(self, batch: list[Change]) -> None:
        waiting = [c for c in batch if c.future is None or not c.future.done()]
        self._queue.extendleft(reversed(waiting))

    def _take_batch(self, *, fill: bool = True) -> tuple[list[Change], bool]:
        """The next batch: the normal lane first, then (``fill``) the bulk lane; one change per
        account. Also whether it holds changes of the bulk lane.

        Changes of accounts already in the batch or in a batch being committed stay where they
        are and wait their turn.
        """
        # Normal changes waiting: a batch of the usual size, so that it commits soon.
        limit = self.max_batch if not self._queue and len(self._bulk) > self.batch_size else 0
        limit = limit or self.batch_size
        batch: list[Change] = []
        seen = self._busy.copy()
        exclusive_ahead = False
        from_bulk = False
        for lane in (self._queue, self._bulk) if fill else (self._queue,):
            deferred: list[Change | _Exclusive] = []
            # Bounded: a lane full of one busy account's changes must not cost a full scan.
            budget = 4 * limit
            while lane and len(batch) < limit and budget > 0:
                budget -= 1
                item = lane[0]
                if isinstance(item, _Exclusive):
                    exclusive_ahead = True
                    break  # runs alone, after this batch
                lane.popleft()
                if item.account_id in seen:
                    deferred.append(item)
                else:
                    seen.add(item.account_id)
                    batch.append(item)
                    from_bulk = from_bulk or lane is self._bulk
            lane.extendleft(reversed(deferred))  # type: ignore[arg-type]
            if exclusive_ahead:
                break
        return batch, from_bulk

    async def _commit(self, batch: list[Change]) -> None:
        now = self.planner.now()
        planned: list[tuple[Account, Change, Planned]] = []
        for change in batch:
            decided = self._decide(change, now)
            if decided is not None:
                planned.append(decided)
        if not planned:
            return
        started = time.perf_counter()
        requests = [p.request for _, _, p in planned]
        try:
            if (self.journal_min and len(planned) >= self.journal_min) or self.journal_active:
                async with self._journal_write():
                    outcomes = await self.repo.apply_transitions(requests, journal=True)
            else:
                outcomes = await self.repo.apply_transitions(requests)
            # Healthy only once something really committed: a batch refused in memory
            # (illegal, stale) proves nothing about the database.
            self._delay = 0.2
            self.db_healthy = True
        except ConcurrentWrite as exc:
            # Only possible without row locks (SQLite with an outside writer): retry one by one
            # so a single contested row cannot hold the batch hostage.
            log.info("door: %s; re-deciding the batch one by one", exc)
            for _, change, _ in planned:
                change.retries += 1
                self._requeue_or_fail(change, ItemResult.CONFLICT)
            return
        elapsed = time.perf_counter() - started
        self.stats.batches += 1
        self.stats.last_batch_seconds = elapsed
        self.stats.commit_latency.append(elapsed)
        if self.on_db_time is not None:
            self.on_db_time("platform", "transition", elapsed)
        conflicts: list[tuple[Account, Change, Conflict]] = []
        for (acc, change, p), outcome in zip(planned, outcomes, strict=True):
            if isinstance(outcome, Applied):
                self.stats.committed += 1
                try:
                    self.planner.after_commit(acc, change, p, now)
                except Exception:  # boundary: the commit stands; a bug here must not stop the door
                    log.exception("door: after-commit hook failed for %s", acc.id)
                _resolve(change, ItemResult.APPLIED)
            else:
                conflicts.append((acc, change, outcome))
        if conflicts:
            await self._handle_conflicts(conflicts)

    def _decide(self, change: Change, now: float) -> tuple[Account, Change, Planned] | None:
        for _ in range(4):  # a redirect may chain once or twice (qr_ready → fail), never loop
            acc = self.planner.lookup(change.account_id)
            if acc is None:
                _resolve(change, ItemResult.UNKNOWN_ACCOUNT)
                return None
            state = acc.status
            if (change.expect_state is not None and change.expect_state != state) or (
                change.expect_version is not None and change.expect_version != acc.version
            ):
                # A deadline or decision made for an earlier state: the account moved on.
                _resolve(change, ItemResult.CONFLICT)
                return None
            try:
                new_state = next_state(state, change.trigger, change.target)
            except IllegalTransition:
                self.stats.illegal += 1
                _resolve(change, ItemResult.ILLEGAL)
                return None
            result = self.planner.plan(acc, change, new_state, now)
            if isinstance(result, Repeat):
                _resolve(change, ItemResult.DUPLICATE)
                return None
            if isinstance(result, Redirect):
                change.trigger = result.trigger
                change.cause = result.cause
                change.data = result.data
                change.target = None
                continue
            return acc, change, result
        _resolve(change, ItemResult.ILLEGAL)
        return None

    async def _handle_conflicts(self, conflicts: list[tuple[Account, Change, Conflict]]) -> None:
        self.stats.conflicts += len(conflicts)
        rows = await self.repo.get_accounts([c.account_id for _, _, c in conflicts])
        for acc, change, conflict in conflicts:
            row = rows.get(conflict.account_id)
            log.info(
                "door: compare-and-set lost for %s (expected %s, found %s); re-deciding",
                conflict.account_id,
                conflict.expected,
                conflict.found,
            )
            self.planner.refresh(acc, conflict.account_id, row)
            change.retries += 1
            if row is None:
                _resolve(change, ItemResult.UNKNOWN_ACCOUNT)
            else:
                self._requeue_or_fail(change, ItemResult.CONFLICT)

    def _requeue_or_fail(self, change: Change, result: ItemResult) -> None:
        if change.retries > MAX_CONFLICT_RETRIES:
            _resolve(change, result)
        else:
            # Decisions tied to a state/version are re-validated against the reloaded row.
            self._queue.append(change)


def _resolve(change: Change, result: ItemResult) -> None:
    if change.future is not None and not change.future.done():
        change.future.set_result(result)


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return f"{type(orig).__name__}: {str(orig).splitlines()[0] if str(orig) else ''}"
