"""The throughput machinery of the one door, on real databases (SQLite, and MariaDB when set).

What made mass events fast must not cost a guarantee: driver-level multi-row statements keep
every value a bound parameter and write the same rows SQLAlchemy did; the bulk lane lets a
mass event through without starving anyone else; two batches in flight keep each account's
changes in order; the heartbeat re-check reads back only fresh rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from accountd.adapters import migrate
from accountd.adapters.batch_sql import Binds, update_status
from accountd.adapters.repository import Applied, TransitionRequest, to_db_time
from accountd.adapters.schema import accountd_supervision, wework_accounts
from accountd.daemon.door import Change
from accountd.daemon.policy import PolicyConfig
from accountd.daemon.protocol import ItemResult
from accountd.daemon.supervisor import MASS_EVENT, MASS_SLICE, Supervisor
from accountd.statemachine import State, Trigger
from tests.conftest import sqlite_urls
from tests.test_engine import Rig, open_rig, settle

QUIET = PolicyConfig(heartbeat_timeout=600, base=600, cap=600)


@pytest.fixture
async def rig(migrated_urls: dict[str, str]) -> AsyncIterator[Rig]:
    async with open_rig(migrated_urls) as r:
        yield r


def test_equal_values_share_one_parameter_but_types_stay_apart() -> None:
    b = Binds("mysql")
    marks = [b("online"), b("online"), b(None), b(None), b(1), b(True), b(1.0), b(0), b(False)]
    assert marks[0] == marks[1] == "%(p0)s"
    assert marks[2] == marks[3]
    assert len(set(marks[4:])) == 5  # 1, True, 1.0, 0, False: five parameters
    assert b.params["p0"] == "online" and len(b.params) == 7
    assert Binds("sqlite")("x") == ":p0"


def test_update_status_admits_only_whitelisted_columns() -> None:
    b = Binds("mysql")
    sql = update_status(b, ["a", "b"], "online", "offline", [("error_message", "x")])
    assert "id IN (%(p" in sql and "'" not in sql  # placeholders only, no literal values
    try:
        update_status(Binds("mysql"), ["a"], "online", "offline", [("status = 'x', id", 1)])
    except ValueError as exc:
        assert "not settable" in str(exc)
    else:
        raise AssertionError("an arbitrary column name must be refused")


async def test_sqlite_reads_the_grouped_compare_and_sets_ids_by_primary_key(
    tmp_path: Path,
) -> None:
    """Without statistics SQLite took ``status = ?`` for the better term and scanned idx_status
    (every account in that status) for any batch of five or more; `status_term` keeps it on the
    primary key."""
    await migrate.upgrade(sqlite_urls(tmp_path))
    with contextlib.closing(sqlite3.connect(tmp_path / "platform.db")) as conn:
        for n in (1, 5, 500):
            b = Binds("sqlite")
            ids = [f"id-{i}" for i in range(n)]
            sql = update_status(b, ids, "online", "offline", [("error_message", "x")])
            plan = " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", b.params))
            assert "(id=?)" in plan and "idx_status" not in plan, (n, plan)


async def test_hostile_text_and_supervision_values_round_trip_through_the_batch(
    rig: Rig,
) -> None:
    ids = await rig.insert([State.online] * 3)
    hostile = "x'); DROP TABLE account_status_logs; -- %s %(p0)s :p0 ? \\ \u2603"
    when = dt.datetime(2031, 5, 6, 7, 8, 9, 123456)
    requests = [
        TransitionRequest(
            account_id,
            "online",
            "error",
            f"fail: {hostile}",
            error_details=hostile,
            fields={"error_message": hostile},
            supervision={
                "entered_at": when,
                "attempts": 3,
                "qr_refreshes": 1,
                "next_action": "recover",
                "next_action_at": when + dt.timedelta(seconds=k),
                "online_since": None,
                "offline_history": [1.5, 2.25],
                "paused": k == 1,
                "paused_reason": hostile if k == 1 else None,
            },
        )
        for k, account_id in enumerate(ids)
    ]
    outcomes = await rig.repo.apply_transitions(requests)
    assert all(isinstance(o, Applied) for o in outcomes)
    for k, account_id in enumerate(ids):
        (log,) = await rig.logs(account_id)
        assert (log["old_status"], log["new_status"]) == ("online", "error")
        assert log["change_reason"] == f"fail: {hostile}"
        assert log["error_details"] == hostile
        row = (await rig.rows([account_id]))[account_id]
        assert row["status"] == "error" and row["error_message"] == hostile
        sup = await rig.supervision(account_id)
        assert sup["status"] == "error" and sup["last_log_id"] == log["id"]
        assert sup["entered_at"] == when
        assert sup["next_action_at"] == when + dt.timedelta(seconds=k)
        assert (sup["attempts"], sup["qr_refreshes"], sup["next_action"]) == (3, 1, "recover")
        history = sup["offline_history"]
        assert (json.loads(history) if isinstance(history, str) else history) == [1.5, 2.25]
        assert bool(sup["paused"]) is (k == 1)
        assert sup["paused_reason"] == (hostile if k == 1 else None)
        assert sup["online_since"] is None


async def test_fresh_heartbeats_reads_back_only_rows_at_or_after_the_cutoff(rig: Rig) -> None:
    now = float(int(rig.clock.now()))
    old, fresh, never = await rig.insert([State.online] * 3, heartbeat=now - 100)
    async with rig.dbs.platform.begin() as conn:
        a = wework_accounts
        await conn.execute(
            update(a).where(a.c.id == fresh).values(last_heartbeat_at=to_db_time(now))
        )
        await conn.execute(update(a).where(a.c.id == never).values(last_heartbeat_at=None))
    found = await rig.repo.fresh_heartbeats([old, fresh, never, "missing"], now - 45)
    assert found == {fresh: now}


async def test_a_bulk_backlog_does_not_hold_up_a_change_fired_after_it(rig: Rig) -> None:
    n = 3000
    bulk_ids = await rig.insert([State.online] * n, heartbeat=rig.clock.now())
    (other,) = await rig.insert([State.online], heartbeat=rig.clock.now())
    sup = rig.supervisor(QUIET, startup_grace=600, batch_size=500)
    await sup.load()
    order: list[str] = []
    sup.listeners.append(lambda ev: order.append(ev.account.id))
    await sup.start()
    bulk = [Change(i, Trigger.heartbeat_lost, "test", expect_state=State.online) for i in bulk_ids]
    futures = sup.door.fire_many(bulk, bulk=True)
    late = sup.door.fire(Change(other, Trigger.logged_out, "fired after the mass"))
    assert await asyncio.wait_for(late, 60) is ItemResult.APPLIED
    await asyncio.wait_for(asyncio.gather(*futures), 120)
    await settle(sup, rig.clock)
    # The normal lane is served first: in the first batch, not after 3,000 bulk changes.
    assert order.index(other) < 500, order.index(other)
    assert sup.counts[State.offline] == n + 1
    if sup.repo.dialect == "mysql":
        # The backlog was taken in bigger bites than the usual batch.
        assert sup.door.stats.batches < n // 500 + 1, sup.door.stats
    else:
        # One writer: the usual size, so that a change behind a batch waits for 500, not more.
        assert sup.door.stats.batches >= (n + 1) / 500, sup.door.stats


async def mass_with_held_batches(
    rig: Rig,
    sup: Supervisor,
    bulk_ids: Sequence[str],
    hold: Callable[[list[str]], Awaitable[None]],
) -> tuple[list[list[str]], list[asyncio.Future[ItemResult]]]:
    """Fire ``bulk_ids``' heartbeat losses as a mass event, every batch awaiting ``hold`` (its
    account ids) before it commits; returns the batches as they start (once the first has) and
    the mass event's futures."""
    batches: list[list[str]] = []
    apply = rig.repo.apply_transitions

    async def held(requests: Sequence[TransitionRequest], *, journal: bool = False) -> list[Any]:
        ids = [r.account_id for r in requests]
        batches.append(ids)
        await hold(ids)
        return await apply(requests, journal=journal)

    rig.repo.apply_transitions = held  # type: ignore[method-assign]
    bulk = [Change(i, Trigger.heartbeat_lost, "test", expect_state=State.online) for i in bulk_ids]
    futures = sup.door.fire_many(bulk, bulk=True)
    while not batches:
        await asyncio.sleep(0.001)
    return batches, futures


async def test_a_change_fired_during_a_mass_event_commits_in_an_express_batch(rig: Rig) -> None:
    """With every slot held by a mass event's batch (held here until released), a normal change
    commits at once in a batch of its own, not filled from the bulk lane; one such batch at a
    time. (Without ``express``, the next test.)"""
    bulk_ids = await rig.insert([State.online] * 1000, heartbeat=rig.clock.now())
    first, second, third = await rig.insert([State.online] * 3, heartbeat=rig.clock.now())
    sup = rig.supervisor(QUIET, startup_grace=600, batch_size=200)
    assert sup.door.express is (sup.repo.dialect == "mysql")
    sup.door.pipeline, sup.door.express = 1, True  # one slot, so one held batch fills it
    await sup.load()
    await sup.start()
    release = asyncio.Event()
    hold_second = asyncio.Event()

    async def hold(ids: list[str]) -> None:
        if ids == [second]:
            await hold_second.wait()
        elif first not in ids and third not in ids:
            await release.wait()

    batches, futures = await mass_with_held_batches(rig, sup, bulk_ids, hold)
    late = sup.door.fire(Change(first, Trigger.logged_out, "fired during the mass"))
    assert await asyncio.wait_for(late, 30) is ItemResult.APPLIED
    assert batches[1] == [first] and len(batches) == 2  # express, not filled from the bulk lane
    # One express batch at a time: the next waits while one is in flight.
    blocked = sup.door.fire(Change(second, Trigger.logged_out, "held express batch"))
    while len(batches) < 3:
        await asyncio.sleep(0.001)
    waiting = sup.door.fire(Change(third, Trigger.logged_out, "behind the express batch"))
    for _ in range(50):
        await asyncio.sleep(0.002)
    assert not waiting.done() and len(batches) == 3
    hold_second.set()
    assert await asyncio.wait_for(blocked, 30) is ItemResult.APPLIED
    assert await asyncio.wait_for(waiting, 30) is ItemResult.APPLIED
    assert [third] in batches
    release.set()
    await asyncio.wait_for(asyncio.gather(*futures), 120)
    await settle(sup, rig.clock)
    assert sup.counts[State.offline] == len(bulk_ids) + 3
    assert all(len(b) == 1 for b in batches if set(b) & {first, second, third})


async def test_without_express_a_change_waits_for_the_mass_events_batch(rig: Rig) -> None:
    """SQLite's one writer: a change fired during a mass event waits for the batch in flight,
    then goes first in the next one."""
    bulk_ids = await rig.insert([State.online] * 1000, heartbeat=rig.clock.now())
    (other,) = await rig.insert([State.online], heartbeat=rig.clock.now())
    sup = rig.supervisor(QUIET, startup_grace=600, batch_size=200)
    sup.door.pipeline, sup.door.express = 1, False
    await sup.load()
    await sup.start()
    release = asyncio.Event()

    async def hold(_ids: list[str]) -> None:
        await release.wait()

    batches, futures = await mass_with_held_batches(rig, sup, bulk_ids, hold)
    late = sup.door.fire(Change(other, Trigger.logged_out, "fired during the mass"))
    for _ in range(50):
        await asyncio.sleep(0.002)
    assert not late.done() and len(batches) == 1
    release.set()
    assert await asyncio.wait_for(late, 30) is ItemResult.APPLIED
    await asyncio.wait_for(asyncio.gather(*futures), 120)
    assert batches[1][0] == other and len(batches[1]) == 200  # first in the next batch


async def test_unanswered_bulk_changes_commit_and_leave_the_door_idle(rig: Rig) -> None:
    """A mass event's heartbeat losses carry no future (nobody waits for them): they must
    still all commit, once each, and a stale one (the account moved on) is dropped."""
    n = 1200
    ids = await rig.insert([State.online] * n, heartbeat=rig.clock.now())
    sup = rig.supervisor(QUIET, startup_grace=600, batch_size=200)
    await sup.load()
    await sup.start()
    moved = sup.door.fire(Change(ids[0], Trigger.logged_out, "before the mass"))
    assert await asyncio.wait_for(moved, 60) is ItemResult.APPLIED
    for account_id in ids:
        change = Change(account_id, Trigger.heartbeat_lost, "test", expect_state=State.online)
        sup.door.fire_unanswered(change)
    await asyncio.wait_for(sup.door.wait_idle(), 120)
    await settle(sup, rig.clock)
    assert (sup.counts[State.offline], sup.door.pending, sup.door.held) == (n, 0, 0)
    assert [m["new_status"] for m in await rig.logs(ids[0])] == ["offline"]
    assert [m["new_status"] for m in await rig.logs(ids[1])] == ["offline"]


def test_bulk_changes_must_be_guarded() -> None:
    async def check() -> None:
        from accountd.daemon.door import Door

        door = Door(None, None)  # type: ignore[arg-type]  # never started: fire only queues
        try:
            door.fire(Change("a", Trigger.heartbeat_lost, "x"), bulk=True)
        except ValueError as exc:
            assert "expect_state" in str(exc)
        else:
            raise AssertionError("an unguarded bulk change must be refused")
        with pytest.raises(ValueError, match="expect_state"):
            door.fire_unanswered(Change("a", Trigger.heartbeat_lost, "x"))

    asyncio.run(check())


async def test_two_batches_in_flight_keep_each_accounts_changes_in_order(rig: Rig) -> None:
    n = 1200
    ids = await rig.insert([State.verifying] * n)
    sup = rig.supervisor(QUIET, startup_grace=600, batch_size=200)
    sup.door.pipeline = 2  # also on SQLite, where the second writer waits for the lock
    await sup.load()
    await sup.start()
    changes = []
    for account_id in ids:
        changes.append(Change(account_id, Trigger.verified, "first"))
        changes.append(Change(account_id, Trigger.logged_out, "second"))
    results = await asyncio.wait_for(asyncio.gather(*sup.door.fire_many(changes)), 120)
    assert set(results) == {ItemResult.APPLIED}
    await settle(sup, rig.clock)
    assert sup.counts[State.offline] == n
    for account_id in ids[:: n // 20]:
        chain = [(m["old_status"], m["new_status"]) for m in await rig.logs(account_id)]
        assert chain == [("verifying", "online"), ("online", "offline")]
    # Batches of 200 write their supervision rows to the journal; folded, in order:
    assert await sup.fold_journal() > 0
    s = accountd_supervision
    async with rig.dbs.platform.connect() as conn:
        statuses = {r[0] for r in await conn.execute(select(s.c.status))}
    assert statuses == {"offline"}


async def test_only_deadlines_crowded_into_one_instant_count_as_a_mass_event(rig: Rig) -> None:
    t0 = rig.clock.now()
    crowd = await rig.insert([State.online] * (MASS_EVENT + 10), heartbeat=t0)
    clump = await rig.insert([State.online] * (MASS_EVENT - 1), heartbeat=t0)
    spread = await rig.insert([State.online] * 40, heartbeat=t0)
    sup = rig.supervisor(QUIET, startup_grace=600)
    await sup.load()
    for k, account_id in enumerate(spread):
        # 40 deadlines over 2 s: a lagging runner may hand them over in one round.
        sup.accounts[account_id].last_heartbeat = t0 + 0.05 * k + 0.5
    for account_id in crowd:
        sup.accounts[account_id].last_heartbeat = t0 + 0.01
    for account_id in clump:
        # Fewer than a mass event in one slice of their own: one batch of the normal lane.
        sup.accounts[account_id].last_heartbeat = t0 + 0.01 + MASS_SLICE
    sup._queue_stale([sup.accounts[i] for i in crowd + clump + spread])
    assert [a.id for a in sup._stale_mass[0]] == crowd
    assert [a.id for a in sup._stale_small[0]] == clump + spread


async def test_a_mass_event_is_under_way_while_its_batches_commit(rig: Rig) -> None:
    """The heartbeat flush, the journal fold and the poll hold back while `mass_under_way`:
    that must stay true while the bulk lane is empty but its last batches are committing."""
    ids = await rig.insert([State.online] * 40)
    sup = rig.supervisor(QUIET, startup_grace=600)
    await sup.load()
    await sup.start()
    seen: list[tuple[int, bool]] = []
    rig.repo.between_statements = lambda: seen.append((sup.door.bulk_in_flight, sup.mass_under_way))
    normal = sup.door.fire_many(
        [Change(a, Trigger.logged_out, "test", expect_state=State.online) for a in ids[:20]]
    )
    assert set(await asyncio.gather(*normal)) == {ItemResult.APPLIED}
    assert seen and set(seen) == {(0, False)}
    seen.clear()
    bulk = sup.door.fire_many(
        [Change(a, Trigger.logged_out, "test", expect_state=State.online) for a in ids[20:]],
        bulk=True,
    )
    assert set(await asyncio.gather(*bulk)) == {ItemResult.APPLIED}
    assert seen and set(seen) == {(1, True)}  # the lane was empty by then: taken whole
    assert (sup.door.bulk_in_flight, sup.mass_under_way) == (0, False)


async def test_a_mass_event_is_under_way_while_its_round_is_re_checked(rig: Rig) -> None:
    t0 = rig.clock.now()
    crowd = await rig.insert([State.online] * (MASS_EVENT + 10), heartbeat=t0 - 3600)
    sup = rig.supervisor(QUIET, startup_grace=600)
    await sup.load()
    seen: list[bool] = []
    read = rig.repo.fresh_heartbeats

    async def recorded(ids: Sequence[str], since: float) -> dict[str, float]:
        seen.append(sup.mass_under_way)  # the round left _stale_mass; nothing is in the door
        return await read(ids, since)

    rig.repo.fresh_heartbeats = recorded  # type: ignore[method-assign]
    for account_id in crowd:
        acc = sup.accounts[account_id]
        acc.last_heartbeat = acc.entered_at = t0 - 3600
    sup._queue_stale([sup.accounts[i] for i in crowd])
    await sup.start()
    await settle(sup, rig.clock)
    assert seen == [True]
    assert sup.counts[State.offline] == len(crowd)
    assert not sup.mass_under_way


async def test_a_mass_events_re_check_does_not_hold_up_a_small_rounds(rig: Rig) -> None:
    """The database re-check of a mass event's round (held here until released) and a small
    round that comes due meanwhile run in tasks of their own: the small round's accounts go
    offline while the mass event's round is still being re-checked."""
    t0 = rig.clock.now()
    crowd = await rig.insert([State.online] * (MASS_EVENT + 10), heartbeat=t0 - 3600)
    few = await rig.insert([State.online] * 3, heartbeat=t0 - 3600)
    sup = rig.supervisor(QUIET, startup_grace=600)
    await sup.load()
    release = asyncio.Event()
    read = rig.repo.fresh_heartbeats

    async def held(ids: Sequence[str], since: float) -> dict[str, float]:
        if set(ids) & set(crowd):
            await release.wait()
        return await read(ids, since)

    rig.repo.fresh_heartbeats = held  # type: ignore[method-assign]
    for account_id in crowd + few:
        acc = sup.accounts[account_id]
        acc.last_heartbeat = acc.entered_at = t0 - 3600
    await sup.start()
    sup._queue_stale([sup.accounts[i] for i in crowd])
    await asyncio.sleep(0.01)
    assert sup.mass_under_way
    for account_id in few:
        sup.accounts[account_id].last_heartbeat = t0 - 3000  # not in the crowd's slice
    sup._queue_stale([sup.accounts[i] for i in few])
    for _ in range(3000):
        if sup.counts[State.offline] == len(few):
            break
        await asyncio.sleep(0.01)
    assert sup.counts[State.offline] == len(few) and sup.busy
    assert all(sup.accounts[i].status is State.online for i in crowd)
    release.set()
    await settle(sup, rig.clock)
    assert sup.counts[State.offline] == len(crowd) + len(few)
