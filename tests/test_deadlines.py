"""The deadline queue, the runner that fires it, and the fake clock both are tested with."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable

import pytest

from accountd.daemon.clock import FakeClock, SystemClock
from accountd.daemon.deadlines import DeadlineQueue, DeadlineRunner, HeartbeatChecks
from accountd.statemachine import State
from accountd.statemachine.account import Account

T0 = 1_700_000_000.0
Due = list[tuple[str, str]]


# -- the queue ----------------------------------------------------------------------------------


def test_queue_pops_earliest_first_and_ties_in_insertion_order() -> None:
    q = DeadlineQueue()
    q.set("c", T0 + 3, "timeout")
    q.set("a", T0 + 1, "timeout")
    q.set("b2", T0 + 2, "recover")
    q.set("b1", T0 + 2, "heartbeat")
    assert len(q) == 4 and q.next_due() == T0 + 1
    assert q.pop_due(T0 + 0.5) == []
    assert q.pop_due(T0 + 2) == [("a", "timeout"), ("b2", "recover"), ("b1", "heartbeat")]
    assert q.pop_due(T0 + 10) == [("c", "timeout")]
    assert len(q) == 0 and q.next_due() is None


def test_set_replaces_the_pending_deadline_of_an_account() -> None:
    q = DeadlineQueue()
    q.set("a", T0 + 10, "timeout")
    q.set("a", T0 + 50, "recover")  # later: the old entry must not fire
    assert len(q) == 1 and q.get("a") == (T0 + 50, "recover")
    assert q.pop_due(T0 + 20) == []
    assert q.next_due() == T0 + 50
    q.set("a", T0 + 5, "fail")  # earlier
    assert q.pop_due(T0 + 100) == [("a", "fail")]
    assert q.pop_due(T0 + 100) == []


def test_cancel_removes_the_deadline() -> None:
    q = DeadlineQueue()
    q.set("a", T0 + 1, "timeout")
    q.set("b", T0 + 2, "timeout")
    assert q.cancel("a") and not q.cancel("a") and not q.cancel("zzz")
    assert "a" not in q and "b" in q and q.get("a") is None
    assert q.next_due() == T0 + 2  # the stale head is skipped
    assert q.pop_due(T0 + 10) == [("b", "timeout")]


def test_pop_due_respects_the_limit() -> None:
    q = DeadlineQueue()
    for i in range(25):
        q.set(f"a{i:02d}", T0 + i, "timeout")
    batch = q.pop_due(T0 + 100, limit=10)
    assert [a for a, _ in batch] == [f"a{i:02d}" for i in range(10)]
    assert len(q) == 15


def test_pop_due_cost_is_proportional_to_what_expires_not_to_accounts() -> None:
    q = DeadlineQueue()
    for i in range(100_000):
        q.set(f"acc{i}", T0 + 3600 + i, "heartbeat")
    for i in range(10):
        q.set(f"soon{i}", T0 + i, "timeout")
    before = q.heap_pops
    due = q.pop_due(T0 + 60)
    assert len(due) == 10
    assert q.heap_pops - before == 10  # ten heap pops for ten due: the 100k are never touched
    assert len(q) == 100_000


def test_stale_entries_are_compacted_when_they_dominate() -> None:
    q = DeadlineQueue()
    n = 10_000
    for round_ in range(10):  # every account rescheduled ten times
        for i in range(n):
            q.set(f"acc{i}", T0 + 1000 + round_ + i, "heartbeat")
    assert len(q) == n
    assert q.compactions > 0
    assert q.heap_size <= 2 * n + 1
    # Only the latest deadline of each account fires.
    due = q.pop_due(T0 + 10**9, limit=10**6)
    assert len(due) == n and len({a for a, _ in due}) == n


def test_a_deadline_earlier_than_the_sorted_head_still_comes_first() -> None:
    q = DeadlineQueue()
    for i in range(1000):
        q.set(f"late{i}", T0 + 30 + i * 0.001, "heartbeat")  # one bucket, sorted on demand
    assert q.next_due() == T0 + 30  # that bucket is now the head
    q.set("now", T0, "recover")  # before the head's slice: its own small heap
    q.set("same-slice", T0 + 30.0005, "timeout")
    q.set("late5", T0 + 29, "timeout")  # replaces an entry held in the head
    assert q.next_due() == T0
    due = q.pop_due(T0 + 30.002, limit=5)
    assert due == [
        ("now", "recover"),
        ("late5", "timeout"),
        ("late0", "heartbeat"),
        ("same-slice", "timeout"),
        ("late1", "heartbeat"),
    ]
    assert len(q) == 997


def test_the_calendar_agrees_with_a_sorted_list_under_random_use() -> None:
    """Sets, re-sets, cancels, pops with limits and next_due across bucket boundaries, against
    the obvious model: every live deadline, sorted by (when, order set)."""
    rng = random.Random(7)
    q = DeadlineQueue()
    model: dict[str, tuple[float, int, str]] = {}
    seq = 0
    now = T0
    for _ in range(20_000):
        op = rng.random()
        account = f"a{rng.randrange(300)}"
        if op < 0.45:
            when = now + rng.choice([-1.0, 0.0, 0.01, 0.049, 0.05, 0.3, 2.0, 30.0]) * rng.random()
            q.set(account, when, f"k{seq % 3}")
            model[account] = (when, seq, f"k{seq % 3}")
            seq += 1
        elif op < 0.55:
            # As the runner re-arms a round: many at once, an account twice now and then.
            items = []
            for _ in range(rng.randrange(40)):
                a = f"a{rng.randrange(300)}"
                when = now + rng.choice([-0.1, 0.0, 0.02, 0.3, 30.0]) * rng.random()
                items.append((a, when, f"k{seq % 3}"))
                model[a] = (when, seq, f"k{seq % 3}")
                seq += 1
            assert q.set_many(items) == min((w for _, w, _ in items), default=math.inf)
        elif op < 0.65:
            assert q.cancel(account) == (model.pop(account, None) is not None)
        elif op < 0.9:
            now += rng.random() * 0.2
            limit = rng.choice([1, 3, 10, 1000])
            want = sorted((w, n, a, k) for a, (w, n, k) in model.items() if w <= now)[:limit]
            assert q.pop_due(now, limit) == [(a, k) for _, _, a, k in want]
            for _, _, a, _ in want:
                del model[a]
        else:
            assert q.next_due() == min((w for w, _, _ in model.values()), default=None)
        assert len(q) == len(model)


def test_nan_deadline_is_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        DeadlineQueue().set("a", math.nan, "timeout")
    q = DeadlineQueue()
    with pytest.raises(ValueError, match="NaN"):
        q.set_many([("a", T0, "timeout"), ("b", math.nan, "timeout")])
    # What came before the NaN is set, as with `set` one at a time, and still pops.
    assert len(q) == 1 and q.get("b") is None
    assert q.pop_due(T0 + 1) == [("a", "timeout")]
    assert len(q) == 0 and q.next_due() is None


# -- the fake clock -----------------------------------------------------------------------------


async def test_fake_clock_wakes_sleepers_in_deadline_order_at_their_times() -> None:
    clock = FakeClock(T0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now()))

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in [("c", 30), ("a", 10), ("b", 20)]]
    await clock.settle()
    assert clock.sleepers == 3 and clock.next_wake() == T0 + 10
    await clock.advance(25)
    assert woke == [("a", T0 + 10), ("b", T0 + 20)]
    assert clock.now() == T0 + 25
    await clock.advance(5)
    assert woke[-1] == ("c", T0 + 30)
    await asyncio.gather(*tasks)
    with pytest.raises(ValueError):
        await clock.advance(-1)


async def test_system_clock_is_wall_time() -> None:
    clock = SystemClock()
    assert abs(clock.now() - time.time()) < 1
    await clock.sleep(0)
    await clock.sleep(-5)  # negative means "now", not an error


# -- the runner ---------------------------------------------------------------------------------


class Recorder:
    """An on_due callback that records each batch with the (fake) time it was delivered."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[tuple[float, Due]] = []

    async def __call__(self, due: Due) -> None:
        self.calls.append((self.clock.now(), due))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
async def runner(clock: FakeClock) -> AsyncIterator[tuple[DeadlineRunner, Recorder]]:
    rec = Recorder(clock)
    r = DeadlineRunner(DeadlineQueue(), rec, clock=clock, batch_size=1000)
    await r.start()
    await clock.settle()
    try:
        yield r, rec
    finally:
        await r.stop(grace=1.0)
        assert not r.running


async def test_runner_fires_each_deadline_at_its_time(
    runner: tuple[DeadlineRunner, Recorder], clock: FakeClock
) -> None:
    r, rec = runner
    r.set("a", T0 + 10, "timeout")
    r.set("b", T0 + 20, "recover")
    await clock.settle()
    await clock.advance(9.9)
    assert rec.calls == []
    await clock.advance(0.1)
    assert rec.calls == [(T0 + 10, [("a", "timeout")])]
    await clock.advance(100)
    assert rec.calls[1] == (T0 + 20, [("b", "recover")])
    assert len(r.queue) == 0


async def test_runner_wakes_early_when_an_earlier_deadline_is_set(
    runner: tuple[DeadlineRunner, Recorder], clock: FakeClock
) -> None:
    r, rec = runner
    r.set("late", T0 + 100, "timeout")
    await clock.settle()
    assert clock.next_wake() == T0 + 100
    r.set("early", T0 + 5, "timeout")
    await clock.settle()
    assert clock.next_wake() == T0 + 5 and clock.sleepers == 1  # the old sleep was dropped
    await clock.advance(5)
    assert rec.calls == [(T0 + 5, [("early", "timeout")])]
    await clock.advance(95)
    assert rec.calls[-1] == (T0 + 100, [("late", "timeout")])


async def test_deadlines_set_from_inside_on_due_fire_without_a_wake_up(clock: FakeClock) -> None:
    """`on_due` sets deadlines (a recovery put off by the rate limit, say): the runner does not
    need waking for those, it looks at the queue again after the batch."""
    r: DeadlineRunner
    fired: list[tuple[float, Due]] = []

    async def on_due(due: Due) -> None:
        fired.append((clock.now(), due))
        if due == [("a", "timeout")]:
            r.set("again", clock.now(), "heartbeat")  # due at once
            r.set("later", clock.now() + 3, "heartbeat")

    r = DeadlineRunner(DeadlineQueue(), on_due, clock=clock)
    await r.start()
    try:
        r.set("a", T0 + 10, "timeout")
        await clock.advance(10)
        assert fired == [(T0 + 10, [("a", "timeout")]), (T0 + 10, [("again", "heartbeat")])]
        assert clock.next_wake() == T0 + 13
        await clock.advance(3)
        assert fired[-1] == (T0 + 13, [("later", "heartbeat")])
    finally:
        await r.stop(grace=1.0)


async def test_runner_does_not_fire_cancelled_or_replaced_deadlines(
    runner: tuple[DeadlineRunner, Recorder], clock: FakeClock
) -> None:
    r, rec = runner
    r.set("a", T0 + 10, "timeout")
    r.set("b", T0 + 10, "timeout")
    r.set("c", T0 + 10, "timeout")
    assert r.cancel("a")
    r.set("b", T0 + 30, "recover")
    await clock.advance(10)
    assert rec.calls == [(T0 + 10, [("c", "timeout")])]
    await clock.advance(20)
    assert rec.calls[-1] == (T0 + 30, [("b", "recover")])


async def test_runner_delivers_a_backlog_in_batches(clock: FakeClock) -> None:
    rec = Recorder(clock)
    r = DeadlineRunner(DeadlineQueue(), rec, clock=clock, batch_size=1000, catch_up_batch_size=1000)
    for i in range(2500):
        r.set(f"acc{i}", T0 + 1 + i / 1000, "timeout")
    clock.set(T0 + 10)  # e.g. a restart after downtime: everything is already overdue
    await r.start()
    try:
        await clock.settle()
    finally:
        await r.stop(grace=1.0)
    assert [len(due) for _, due in rec.calls] == [1000, 1000, 500]
    assert r.batches == 3


async def test_runner_behind_takes_bigger_rounds_until_it_caught_up(clock: FakeClock) -> None:
    # A mass event: fewer loop turns to get through it, so later deadlines are not held up.
    rec = Recorder(clock)
    r = DeadlineRunner(DeadlineQueue(), rec, clock=clock, batch_size=100, catch_up_batch_size=400)
    for i in range(1000):
        r.set(f"acc{i}", T0 + 1 + i / 1000, "timeout")
    clock.set(T0 + 10)
    await r.start()
    try:
        await clock.settle()
        assert [len(due) for _, due in rec.calls] == [100, 400, 400, 100]
        # Caught up: the next lone deadline comes in an ordinary round again.
        r.set("late", T0 + 20, "timeout")
        await clock.advance(15)
    finally:
        await r.stop(grace=1.0)
    assert rec.calls[-1][1] == [("late", "timeout")]


async def test_runner_takes_small_batches_while_an_admin_request_waits(clock: FakeClock) -> None:
    # Same work, more loop turns: an accountctl request in flight waits for one small batch.
    rec = Recorder(clock)
    admin = [True]
    r = DeadlineRunner(
        DeadlineQueue(), rec, clock=clock, batch_size=1000, admin_waiting=lambda: admin[0]
    )
    for i in range(2500):
        r.set(f"acc{i}", T0 + 1 + i / 1000, "timeout")
    clock.set(T0 + 10)
    await r.start()
    try:
        await clock.settle()
    finally:
        await r.stop(grace=1.0)
    assert [len(due) for _, due in rec.calls] == [100] * 25
    admin[0] = False
    with pytest.raises(ValueError):
        DeadlineRunner(DeadlineQueue(), rec, clock=clock, batch_size=10, small_batch_size=11)
    with pytest.raises(ValueError):
        DeadlineRunner(DeadlineQueue(), rec, clock=clock, batch_size=10, catch_up_batch_size=9)


async def test_runner_logs_a_failing_batch_and_keeps_going(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Due] = []

    async def on_due(due: Due) -> None:
        seen.append(due)
        if due[0][0] == "bad":
            raise RuntimeError("engine blew up")

    r = DeadlineRunner(DeadlineQueue(), on_due, clock=clock)
    r.set("bad", T0 + 1, "timeout")
    r.set("good", T0 + 2, "timeout")
    await r.start()
    try:
        with caplog.at_level(logging.ERROR, logger="accountd.daemon.deadlines"):
            await clock.advance(5)
    finally:
        await r.stop(grace=1.0)
    assert seen == [[("bad", "timeout")], [("good", "timeout")]]
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None


async def test_stop_is_bounded_even_when_on_due_hangs(clock: FakeClock) -> None:
    entered = asyncio.Event()

    async def on_due(_due: Due) -> None:
        entered.set()
        await asyncio.Event().wait()  # never returns on its own

    r = DeadlineRunner(DeadlineQueue(), on_due, clock=clock)
    r.set("a", T0, "timeout")
    await r.start()
    await asyncio.wait_for(entered.wait(), timeout=5)
    started = time.monotonic()
    await r.stop(grace=0.05)
    assert time.monotonic() - started < 1.0
    assert not r.running


async def test_stop_of_an_idle_runner_is_prompt_and_start_twice_is_refused(
    clock: FakeClock,
) -> None:
    r = DeadlineRunner(DeadlineQueue(), Recorder(clock), clock=clock)
    await r.stop()  # never started: nothing to do
    await r.start()
    with pytest.raises(RuntimeError):
        await r.start()
    await clock.settle()
    started = time.monotonic()
    await r.stop(grace=5.0)
    assert time.monotonic() - started < 0.5
    assert not r.running and clock.sleepers == 0


@pytest.mark.parametrize("bad", [0, -1])
def test_runner_rejects_a_useless_batch_size(bad: int, clock: FakeClock) -> None:
    make: Callable[[], DeadlineRunner] = lambda: DeadlineRunner(  # noqa: E731
        DeadlineQueue(), Recorder(clock), clock=clock, batch_size=bad
    )
    with pytest.raises(ValueError):
        make()


# -- heartbeat checks ----------------------------------------------------------------------------


class Registry(dict[str, Account]):
    """Online accounts by id, as the supervisor's registry holds them."""

    def online(self, name: str, *, entered: float = T0 - 100, beat: float | None = None) -> Account:
        acc = Account(
            id=name,
            tenant_id="t",
            wework_guid=name,
            status=State.online,
            entered_at=entered,
            last_heartbeat=beat,
        )
        self[name] = acc
        return acc


def test_a_check_re_arms_an_account_that_beat_and_hands_back_one_that_did_not() -> None:
    reg = Registry()
    checks = HeartbeatChecks(45.0)
    beating, silent, never = (
        reg.online("beating"),
        reg.online("silent"),
        reg.online("never", entered=T0),
    )
    for acc in (beating, silent, never):
        checks.set(acc, T0 + 45)
    beating.last_heartbeat = T0 + 30
    silent.last_heartbeat = T0 - 1  # its last beat was before the check was armed
    assert checks.next_due() == T0 + 45
    assert checks.sweep(T0 + 44.9) == ([], 0)
    expired, taken = checks.sweep(T0 + 45)
    assert taken == 3 and expired == [silent, never]  # one instant: in the order set
    assert silent.heartbeat_check is None and never.heartbeat_check is None
    assert beating.heartbeat_check == T0 + 75 and checks.next_due() == T0 + 75
    assert checks.sweep(T0 + 75) == ([beating], 1)
    assert checks.next_due() is None and len(checks) == 0


def test_set_replaces_and_discard_or_leaving_online_drops_a_pending_check() -> None:
    reg = Registry()
    checks = HeartbeatChecks(10.0)
    a, b, c = reg.online("a"), reg.online("b"), reg.online("c")
    checks.set(a, T0 + 5)
    checks.set(a, T0 + 50)  # later: the first pair is stale
    checks.set(b, T0 + 6)
    HeartbeatChecks.discard(b)
    checks.set(c, T0 + 7)
    c.status = State.offline  # left online without a discard: skipped all the same
    assert checks.next_due() == T0 + 7  # c's status is not looked at until it comes due
    assert checks.taken == 2  # the stale pairs ahead of it were dropped on the way
    assert checks.sweep(T0 + 20) == ([], 1)
    assert checks.next_due() == T0 + 50
    checks.set(a, T0 + 1)  # earlier than anything held
    assert checks.sweep(T0 + 60) == ([a], 2)  # the T0 + 50 pair was stale by then
    with pytest.raises(ValueError, match="NaN"):
        checks.set(a, math.nan)


def test_a_check_set_at_or_before_the_sorted_head_comes_first_and_limits_hold() -> None:
    reg = Registry()
    checks = HeartbeatChecks(45.0)
    late = [reg.online(f"late{i}") for i in range(1000)]
    for i, acc in enumerate(late):
        checks.set(acc, T0 + 30 + i * 0.001)  # one bucket, sorted when its time comes
    assert checks.next_due() == T0 + 30  # that bucket is now the head
    now_acc, same_slice = reg.online("now"), reg.online("same-slice")
    checks.set(now_acc, T0)
    checks.set(same_slice, T0 + 30.0005)
    checks.set(late[5], T0 + 29)  # replaces a pair held in the head
    expired, taken = checks.sweep(T0 + 30.002, limit=5)
    assert taken == 5
    assert expired == [now_acc, late[5], late[0], same_slice, late[1]]
    assert checks.sweep(T0 + 30.002, limit=1000)[0] == [late[2]]


def test_heartbeat_checks_agree_with_a_model_under_random_use() -> None:
    """Sets, beats, discards, state changes and sweeps with limits across bucket boundaries,
    against the obvious model: each account's pending check time, taken in time order."""
    rng = random.Random(11)
    timeout = 1.0
    reg = Registry()
    checks = HeartbeatChecks(timeout)
    accounts = [reg.online(f"a{i}", entered=T0) for i in range(200)]
    model: dict[str, float] = {}
    now = T0
    for _ in range(20_000):
        op = rng.random()
        acc = rng.choice(accounts)
        if op < 0.3:
            if acc.status is State.online:
                when = now + rng.choice([-0.5, 0.0, 0.01, 0.049, 0.05, 0.3, 2.0]) * rng.random()
                checks.set(acc, when)
                model[acc.id] = when
        elif op < 0.5:
            acc.last_heartbeat = now  # ingest: no call into the checks at all
        elif op < 0.55:
            HeartbeatChecks.discard(acc)
            model.pop(acc.id, None)
        elif op < 0.6:
            acc.status = State.offline if acc.status is State.online else State.online
            model.pop(acc.id, None)
            HeartbeatChecks.discard(acc)
            acc.entered_at = now
        elif op < 0.9:
            now += rng.random() * 0.2
            limit = rng.choice([1, 3, 10, 1000])
            by_id = {a.id: a for a in accounts}
            due = sorted((w, i) for i, w in model.items() if w <= now)
            want_expired: dict[str, float] = {}
            # The model takes live checks only; the real thing may also take stale pairs
            # (counted in `taken`), so it is compared once everything due has been taken.
            for w, i in due:
                a = by_id[i]
                last = max(a.last_heartbeat or 0.0, a.entered_at)
                if last + timeout > now:
                    model[i] = last + timeout
                else:
                    del model[i]
                    want_expired[i] = w
            got: list[Account] = []
            while True:
                expired, taken = checks.sweep(now, limit)
                got += expired
                if taken < limit:
                    break
            # The same accounts, in time order (ties: in the order set, which the model
            # does not keep).
            assert sorted(a.id for a in got) == sorted(want_expired)
            times = [want_expired[a.id] for a in got]
            assert times == sorted(times)
        else:
            assert checks.next_due() == min(model.values(), default=None)
        live = {a.id: a.heartbeat_check for a in accounts if a.heartbeat_check is not None}
        assert live == model


def test_a_deleted_account_is_skipped_and_re_arms_leave_nothing_for_the_collector() -> None:
    reg = Registry()
    kept, deleted = reg.online("kept"), reg.online("deleted")
    checks = HeartbeatChecks(45.0)
    for i in range(1000):
        checks.set(reg.online(f"a{i}", beat=T0), T0 + 30 + i / 1000)
    checks.set(kept, T0 + 10)
    checks.set(deleted, T0 + 10)
    # `Supervisor.forget`: out of the registry, its check discarded. The check still holds the
    # object, which is all it looks at.
    del reg["deleted"]
    HeartbeatChecks.discard(deleted)
    assert checks.sweep(T0 + 10) == ([kept], 2)
    # A million checks re-armed every 30-45 s: a re-arm that made a tracked object (a tuple)
    # would leave a million of them for the next collection to walk.
    gc.collect()
    gc.disable()
    try:
        young = len(gc.get_objects(generation=0))
        assert checks.sweep(T0 + 31) == ([], 1000)  # each beat at T0: re-armed at T0 + 45
        made = len(gc.get_objects(generation=0)) - young
    finally:
        gc.enable()
    assert made < 20  # the new bucket and the sorted head, not one per check
    assert checks.next_due() == T0 + 45 and len(checks) == 1000


def test_a_sweep_costs_what_comes_due_not_what_is_watched() -> None:
    reg = Registry()
    checks = HeartbeatChecks(45.0)
    accounts = [reg.online(f"a{i}", beat=T0) for i in range(10_000)]
    for i, acc in enumerate(accounts):
        checks.set(acc, T0 + 1 + 44 * i / len(accounts))
    checks.sweep(T0 + 2)
    assert checks.taken <= 300  # ~227 due in that second, not 10,000


async def test_runner_hands_expired_checks_over_and_wakes_for_an_earlier_one(
    clock: FakeClock,
) -> None:
    rec = Recorder(clock)
    expired: list[tuple[float, list[str]]] = []
    reg = Registry()
    r = DeadlineRunner(
        DeadlineQueue(),
        rec,
        clock=clock,
        checks=HeartbeatChecks(45.0),
        on_expired=lambda accs: expired.append((clock.now(), [a.id for a in accs])),
    )
    beating, silent = reg.online("beating", beat=T0), reg.online("silent", beat=T0 - 50)
    await r.start()
    try:
        r.check(beating, T0 + 45)
        r.set("other", T0 + 20, "timeout")
        await clock.advance(0)
        assert clock.next_wake() == T0 + 20 and r.next_due() == T0 + 20
        r.check(silent, T0 + 10)  # earlier than the runner's sleep: it wakes
        await clock.advance(0)
        assert clock.next_wake() == T0 + 10
        await clock.advance(10)
        assert expired == [(T0 + 10, ["silent"])]
        beating.last_heartbeat = T0 + 30
        await clock.advance(35)
        assert rec.calls == [(T0 + 20, [("other", "timeout")])]
        assert expired == [(T0 + 10, ["silent"])]  # beating was re-armed, not handed over
        assert r.next_due() == T0 + 75 and clock.next_wake() == T0 + 75
    finally:
        await r.stop(grace=1.0)


async def test_a_failing_on_expired_is_logged_and_its_accounts_checked_again(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[float] = []

    def on_expired(_accs: list[Account]) -> None:
        calls.append(clock.now())
        if len(calls) == 1:
            raise RuntimeError("engine blew up")

    reg = Registry()
    r = DeadlineRunner(
        DeadlineQueue(),
        Recorder(clock),
        clock=clock,
        checks=HeartbeatChecks(45.0),
        on_expired=on_expired,
    )
    acc = reg.online("a", beat=T0 - 100)
    r.check(acc, T0 + 1)
    await r.start()
    try:
        with caplog.at_level(logging.ERROR, logger="accountd.daemon.deadlines"):
            await clock.advance(5)
    finally:
        await r.stop(grace=1.0)
    assert calls == [T0 + 1, T0 + 2]  # not lost: handed over again a second later
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and "on_expired" in errors[0].getMessage()
