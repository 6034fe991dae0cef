"""A supervisor stopped mid-backoff and mid-deadline, and a new one loaded from the same database:
it resumes exactly where the first stopped (counters, next action, entry time), and its
deadlines fire at the original times instead of starting over."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from accountd.daemon.policy import PolicyConfig
from accountd.daemon.protocol import ItemResult
from accountd.daemon.supervisor import RECOVER, TIMEOUT
from accountd.statemachine import State, Trigger
from tests.test_engine import Rig, close_to, events, from_db_time, open_rig, run_until


@pytest.fixture
async def rig(migrated_urls: dict[str, str]) -> AsyncIterator[Rig]:
    async with open_rig(migrated_urls) as r:
        yield r


async def test_restart_resumes_backoff_and_deadlines_where_they_were(rig: Rig) -> None:
    cfg = PolicyConfig(heartbeat_timeout=45, base=10, cap=300, flap_count=50, start_rate=1000)
    t0 = rig.clock.now()
    (backing_off,) = await rig.insert([State.online], tenant="a", heartbeat=t0)
    (waiting,) = await rig.insert([State.initializing], tenant="b")
    first = rig.supervisor(cfg, startup_grace=0, seed=11)
    await first.load()
    await first.start()

    # waiting: a QR shown at t0+50; its 120 s deadline runs from then.
    await run_until(first, rig.clock, t0 + 50)
    assert await events(first, rig.clock, [(waiting, "qr_ready", {"qr_code": "Q"})]) == [
        ItemResult.APPLIED
    ]
    qr_shown = rig.clock.now()
    # backing_off: heartbeat lost at t0+45, attempt 1 recovers and times out after 60 s: it is
    # now offline with attempts=2 and its next recover some seconds ahead.
    acc = first.accounts[backing_off]
    for _ in range(100):
        if acc.status is State.offline and acc.attempts == 2:
            break
        assert acc.next_action_at is not None
        await run_until(first, rig.clock, acc.next_action_at)
    assert (acc.status, acc.attempts, acc.next_action) == (State.offline, 2, RECOVER)
    recover_at, entered = acc.next_action_at, acc.entered_at
    assert recover_at is not None
    assert recover_at > rig.clock.now() + 0.5, "seed: the next recover must lie ahead"
    assert rig.clock.now() < qr_shown + 120
    qr_entered = first.accounts[waiting].entered_at
    await rig.stop(first)

    logs_before = await rig.log_counts()
    second = rig.supervisor(cfg, startup_grace=0, seed=99)
    await second.load()
    again, qr_again = second.accounts[backing_off], second.accounts[waiting]
    assert (again.status, again.attempts, again.next_action) == (State.offline, 2, RECOVER)
    assert close_to(again.next_action_at, recover_at)
    assert close_to(again.entered_at, entered)
    assert again.offline_history == acc.offline_history or all(
        close_to(a, b) for a, b in zip(again.offline_history, acc.offline_history, strict=True)
    )
    assert (qr_again.status, qr_again.next_action) == (State.waiting_qr, TIMEOUT)
    assert close_to(qr_again.entered_at, qr_entered)
    assert close_to(qr_again.next_action_at, qr_shown + 120)
    pending = second.deadlines.get(backing_off)
    assert pending is not None and close_to(pending[0], recover_at) and pending[1] == RECOVER
    row = await rig.supervision(backing_off)
    assert close_to(from_db_time(row["next_action_at"]), recover_at)
    assert await rig.log_counts() == logs_before  # loading decides nothing and logs nothing

    moved_before = len(rig.moves)
    await second.start()
    await run_until(second, rig.clock, recover_at - 0.01)
    assert len(rig.moves) == moved_before
    await run_until(second, rig.clock, qr_shown + 120)
    new = rig.moves[moved_before:]
    recovered = next(m for m in new if m.account_id == backing_off)
    assert (recovered.trigger, recovered.new) == (Trigger.recover, State.recovering)
    assert close_to(recovered.at, recover_at)
    assert recovered.attempts == 2  # the counter went on from where it was, not from zero
    timed_out = [m for m in new if m.account_id == waiting]
    assert [(m.trigger, m.old) for m in timed_out] == [(Trigger.timeout, State.waiting_qr)]
    assert close_to(timed_out[0].at, qr_shown + 120)
    logs = await rig.logs(backing_off)
    assert logs[-1]["change_reason"].startswith("recover: attempt 2/8 after backoff")
