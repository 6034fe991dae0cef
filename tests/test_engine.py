"""The engine on real databases, with time on a `FakeClock`.

Supervisor + the one door + `AccountRepository` on three freshly migrated databases (SQLite, and
MariaDB when ``ACCOUNTD_TEST_MYSQL_URL`` is set), a `WorkerClient` aimed at a loopback port where
nothing listens (a genuinely down worker: every call fails with `WorkerTransient`, which the
recovery policy must survive), worker events through `Supervisor.apply_events` (what ingest
calls) and time through the clock. Accounts are plain ``wework_accounts`` rows, as other
platform services insert them.

This module holds the rig shared by ``tests/test_engine_*.py`` and the tests of the transition
table itself, deadlines, lost compare-and-sets and mass changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import delete, func, insert, select, update

from accountd.adapters.db import Databases
from accountd.adapters.repository import AccountRepository, from_db_time, to_db_time
from accountd.adapters.schema import account_status_logs, accountd_supervision, wework_accounts
from accountd.adapters.worker import WorkerClient
from accountd.daemon.clock import FakeClock
from accountd.daemon.door import Change
from accountd.daemon.policy import PolicyConfig
from accountd.daemon.protocol import WORKER_EVENTS, ItemResult, WorkerEvent
from accountd.daemon.supervisor import Supervisor, TransitionEvent
from accountd.statemachine import DEADLINE_STATES, State, Trigger, all_pairs, is_legal, next_state

# ------------------------------------------------------------------------------------ the rig


@dataclass(frozen=True, slots=True)
class Moved:
    """One committed transition, as the supervisor's hook saw it (``at`` is fake time)."""

    account_id: str
    old: State
    new: State
    trigger: Trigger
    at: float
    attempts: int
    next_action: str | None
    next_action_at: float | None


class Rig:
    """Databases, a fake clock, a down worker, and the supervisors built on them."""

    def __init__(self, dbs: Databases, worker: WorkerClient, clock: FakeClock) -> None:
        self.dbs = dbs
        self.repo = AccountRepository(dbs.platform)
        self.worker = worker
        self.clock = clock
        self.moves: list[Moved] = []
        self._live: list[Supervisor] = []

    def supervisor(
        self, cfg: PolicyConfig | None = None, *, seed: int = 7, **kwargs: Any
    ) -> Supervisor:
        sup = Supervisor(
            self.repo,
            self.worker,
            cfg or PolicyConfig(),
            self.clock,
            rng=random.Random(seed),
            **kwargs,
        )
        sup.listeners.append(self._record)
        self._live.append(sup)
        return sup

    def _record(self, ev: TransitionEvent) -> None:
        acc = ev.account
        self.moves.append(
            Moved(
                acc.id,
                ev.old,
                ev.new,
                ev.trigger,
                ev.at,
                acc.attempts,
                acc.next_action,
                acc.next_action_at,
            )
        )

    def moves_of(self, account_id: str) -> list[Moved]:
        return [m for m in self.moves if m.account_id == account_id]

    async def stop(self, sup: Supervisor) -> None:
        if sup in self._live:
            self._live.remove(sup)
            await sup.stop(grace=5.0)

    async def close(self) -> None:
        for sup in list(self._live):
            await self.stop(sup)

    # -- rows -----------------------------------------------------------------------------

    async def insert(
        self,
        states: Sequence[State],
        *,
        tenant: str = "t1",
        heartbeat: float | None = None,
        error_message: str | None = None,
        qr_code: str | None = None,
    ) -> list[str]:
        ids = [str(uuid.uuid4()) for _ in states]
        rows = [
            {
                "id": account_id,
                "tenant_id": tenant,
                "account_name": f"acc-{account_id[:8]}",
                "wework_guid": f"guid-{account_id}",
                "status": str(state),
                "last_heartbeat_at": to_db_time(heartbeat),
                "error_message": error_message,
                "login_qr_code": qr_code,
            }
            for account_id, state in zip(ids, states, strict=True)
        ]
        async with self.dbs.platform.begin() as conn:
            for i in range(0, len(rows), 1000):
                await conn.execute(insert(wework_accounts), rows[i : i + 1000])
        return ids

    async def rows(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        a = wework_accounts
        async with self.dbs.platform.connect() as conn:
            result = await conn.execute(select(a).where(a.c.id.in_(list(ids))))
            return {r.id: dict(r._mapping) for r in result}

    async def status(self, account_id: str) -> State:
        return State((await self.rows([account_id]))[account_id]["status"])

    async def set_status(self, account_id: str, state: State) -> None:
        """Another service changes the status behind the daemon's back."""
        a = wework_accounts
        async with self.dbs.platform.begin() as conn:
            await conn.execute(update(a).where(a.c.id == account_id).values(status=str(state)))

    async def logs(self, account_id: str) -> list[dict[str, Any]]:
        lg = account_status_logs
        async with self.dbs.platform.connect() as conn:
            result = await conn.execute(
                select(lg).where(lg.c.account_id == account_id).order_by(lg.c.id)
            )
            return [dict(r._mapping) for r in result]

    async def log_counts(self) -> dict[str, int]:
        lg = account_status_logs
        async with self.dbs.platform.connect() as conn:
            stmt = select(lg.c.account_id, func.count()).group_by(lg.c.account_id)
            result = await conn.execute(stmt)
            return {r[0]: int(r[1]) for r in result}

    async def total_logs(self) -> int:
        return sum((await self.log_counts()).values())

    async def supervision(self, account_id: str) -> dict[str, Any]:
        s = accountd_supervision
        async with self.dbs.platform.connect() as conn:
            row = (await conn.execute(select(s).where(s.c.account_id == account_id))).one()
            return dict(row._mapping)


@contextlib.asynccontextmanager
async def open_rig(urls: dict[str, str]) -> AsyncIterator[Rig]:
    """A rig on migrated databases; every supervisor it built is stopped on the way out."""
    dbs = Databases(urls)
    # Whole seconds: last_heartbeat_at is a second-resolution TIMESTAMP, so rows written at
    # "now + n" read back exactly. Near the real time so database timestamps stay sane.
    clock = FakeClock(start=float(int(time.time())))
    try:
        # Bound but never listening: connecting is refused at once (ECONNREFUSED), and no other
        # process can take the port meanwhile. A real, down worker: no mock involved.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            async with WorkerClient(url, timeout=2.0) as worker:
                r = Rig(dbs, worker, clock)
                try:
                    yield r
                finally:
                    await r.close()
    finally:
        await dbs.dispose()


@pytest.fixture
async def rig(migrated_urls: dict[str, str]) -> AsyncIterator[Rig]:
    async with open_rig(migrated_urls) as r:
        yield r


# ------------------------------------------------------------------------------ driving time


async def settle(sup: Supervisor, clock: FakeClock) -> None:
    """Until the engine has nothing left to do at the current fake time.

    Database and socket I/O take real time (aiosqlite runs in a thread), so this yields to the
    loop *and* sleeps briefly until the door is idle, no deadline is due or being handled and no
    worker call is queued, several checks in a row.
    """
    quiet = 0
    for _ in range(5000):
        await clock.settle()
        await asyncio.wait_for(sup.door.wait_idle(), 30)
        nxt = sup.runner.next_due()
        due = sup.runner.running and nxt is not None and nxt <= clock.now()
        calls = sup.calls.running and not sup.calls.idle
        if sup.busy or due or calls or sup.door.pending:
            quiet = 0
        else:
            quiet += 1
            if quiet >= 3:
                return
        await asyncio.sleep(0.001)
    raise AssertionError("the engine did not settle")


async def run_until(sup: Supervisor, clock: FakeClock, target: float) -> None:
    """Move the fake clock to ``target`` one deadline at a time, settling at each.

    Stepping deadline by deadline (rather than one big `FakeClock.advance`) makes every
    transition happen at exactly the fake time its deadline named, even though each commit takes
    real time.
    """
    await settle(sup, clock)
    for _ in range(20_000):
        nxt = sup.runner.next_due()
        if not sup.runner.running or nxt is None or nxt > target:
            break
        await clock.advance(max(0.0, nxt - clock.now()))
        await settle(sup, clock)
    else:
        raise AssertionError("too many deadlines before the target time")
    await clock.advance(max(0.0, target - clock.now()))
    await settle(sup, clock)


async def events(
    sup: Supervisor, clock: FakeClock, items: Sequence[tuple[str, str, dict[str, Any]]]
) -> list[ItemResult]:
    """Worker events, through the same call ingest makes."""
    at = dt.datetime.fromtimestamp(clock.now(), dt.UTC)
    batch = [WorkerEvent(account_id, event, data, at) for account_id, event, data in items]
    results = await asyncio.wait_for(sup.apply_events(batch), 30)
    await settle(sup, clock)
    return results


def beat(sup: Supervisor, ids: Sequence[str]) -> None:
    now = dt.datetime.now(dt.UTC)
    assert sup.record_heartbeats(list(ids), [now] * len(ids)) == [ItemResult.APPLIED] * len(ids)


def close_to(a: float | None, b: float | None, tol: float = 2e-6) -> bool:
    """Equal up to the microsecond precision of DATETIME(6) (and of floats near 1.7e9)."""
    return a is not None and b is not None and abs(a - b) <= tol


# ------------------------------------------------------------------- 1. the transition table


def _destination(trigger: Trigger) -> State:
    """Where a (non-force) trigger always leads, read from the table itself."""
    for state in State:
        if is_legal(state, trigger):
            return next_state(state, trigger)
    raise AssertionError(trigger)


async def test_every_transition_table_pair_through_the_door(rig: Rig) -> None:
    states = list(State)
    pairs = list(all_pairs())
    # Stale QR/error text on every row, so that `verified`/`recovered` must be seen clearing it.
    ids = await rig.insert([s for s, _ in pairs], error_message="old error", qr_code="old-qr")
    sup = rig.supervisor()
    assert await sup.load() == len(pairs)
    sup.door.start()  # the door only: no deadline may fire behind the test's back
    assert await rig.total_logs() == 0  # loading writes supervision state, never log rows

    targets: dict[str, State] = {}
    worker: list[tuple[int, str, str, dict[str, Any]]] = []
    daemon: list[tuple[int, Change]] = []
    for i, ((state, trigger), account_id) in enumerate(zip(pairs, ids, strict=True)):
        if trigger is Trigger.force:
            target = states[(states.index(state) + 1) % len(states)]
            targets[account_id] = target
            change = Change(account_id, trigger, "admin says so", target=target, operator_id="op-7")
            daemon.append((i, change))
        elif trigger.value in WORKER_EVENTS:
            data: dict[str, Any] = {}
            if trigger is Trigger.qr_ready:
                data = {"qr_code": f"QR-{i}"}
            elif trigger is Trigger.fail:
                data = {"error": f"boom-{i}"}
            worker.append((i, account_id, trigger.value, data))
        else:
            daemon.append((i, Change(account_id, trigger, "daemon decided")))

    results: dict[int, ItemResult] = {}
    worker_results = await events(sup, rig.clock, [(a, e, d) for _, a, e, d in worker])
    results.update({i: r for (i, *_), r in zip(worker, worker_results, strict=True)})
    futures = sup.door.fire_many([c for _, c in daemon])
    daemon_results = await asyncio.wait_for(asyncio.gather(*futures), 30)
    results.update({i: r for (i, _), r in zip(daemon, daemon_results, strict=True)})
    await settle(sup, rig.clock)

    rows = await rig.rows(ids)
    counts = await rig.log_counts()
    for i, ((state, trigger), account_id) in enumerate(zip(pairs, ids, strict=True)):
        where = f"{trigger} from {state}"
        row = rows[account_id]
        if trigger is Trigger.force or is_legal(state, trigger):
            dest = next_state(state, trigger, targets.get(account_id))
            assert results[i] is ItemResult.APPLIED, where
            assert row["status"] == dest, where
            assert sup.accounts[account_id].status is dest, where
            (log,) = await rig.logs(account_id)
            assert (log["old_status"], log["new_status"]) == (state, dest), where
            assert log["change_reason"].startswith(f"{trigger}: "), where
            assert log["operator_id"] == ("op-7" if trigger is Trigger.force else None), where
            sup_row = await rig.supervision(account_id)
            assert (sup_row["status"], sup_row["last_log_id"]) == (dest, log["id"]), where
            if trigger is Trigger.qr_ready:
                assert row["login_qr_code"] == f"QR-{i}", where
            if trigger is Trigger.fail:
                assert row["error_message"] == f"boom-{i}", where
            if dest is State.online and trigger is not Trigger.force:
                assert (row["login_qr_code"], row["error_message"]) == (None, None), where
        else:
            duplicate = trigger.value in WORKER_EVENTS and _destination(trigger) is state
            expected = ItemResult.DUPLICATE if duplicate else ItemResult.ILLEGAL
            assert results[i] is expected, where
            assert row["status"] == state, where
            assert sup.accounts[account_id].status is state, where
            assert counts.get(account_id, 0) == 0, where
    legal = sum(1 for s, t in pairs if t is Trigger.force or is_legal(s, t))
    assert sup.door.stats.committed == legal
    assert sum(counts.values()) == legal


async def test_unknown_account_and_non_worker_event_are_refused(rig: Rig) -> None:
    (acc,) = await rig.insert([State.online])
    sup = rig.supervisor()
    await sup.load()
    sup.door.start()
    results = await events(
        sup, rig.clock, [("no-such-id", "verified", {}), (acc, "heartbeat_lost", {})]
    )
    assert results == [ItemResult.UNKNOWN_ACCOUNT, ItemResult.ILLEGAL]
    assert await rig.status(acc) is State.online
    assert await rig.total_logs() == 0


# ------------------------------------------------------------------------------ 2. deadlines


async def test_login_and_recovering_states_to_offline_on_their_deadline(rig: Rig) -> None:
    cfg = PolicyConfig()  # the BRIEF's deadlines: initializing/recovering 60 s, the rest 120 s
    order = sorted(DEADLINE_STATES, key=lambda s: list(State).index(s))
    ids = dict(zip(order, await rig.insert(order), strict=True))
    sup = rig.supervisor(cfg)
    await sup.load()
    t0 = rig.clock.now()
    await sup.start()

    for seconds in sorted(set(cfg.deadlines.values())):
        due = [s for s in order if cfg.deadlines[str(s)] == seconds]
        await run_until(sup, rig.clock, t0 + seconds - 0.01)
        for state in due:
            assert await rig.status(ids[state]) is state, f"{state} timed out early"
            assert not rig.moves_of(ids[state])
        await run_until(sup, rig.clock, t0 + seconds)
        for state in due:
            first = rig.moves_of(ids[state])[0]
            assert (first.old, first.new, first.trigger) == (state, State.offline, Trigger.timeout)
            assert first.at == t0 + seconds
            log = (await rig.logs(ids[state]))[0]
            assert (log["old_status"], log["new_status"]) == (state, State.offline)
            assert log["change_reason"].startswith(
                f"timeout: no progress in {state} within {seconds:g}s"
            ), log["change_reason"]


async def test_deadline_set_for_a_state_does_not_fire_after_leaving_it(rig: Rig) -> None:
    (acc,) = await rig.insert([State.waiting_qr])
    sup = rig.supervisor()
    await sup.load()
    t0 = rig.clock.now()
    await sup.start()
    await run_until(sup, rig.clock, t0 + 100)
    assert await events(sup, rig.clock, [(acc, "qr_scanned", {})]) == [ItemResult.APPLIED]
    # waiting_qr's 120 s have passed; waiting_confirm's own 120 s have not.
    await run_until(sup, rig.clock, t0 + 219.9)
    assert await rig.status(acc) is State.waiting_confirm
    await run_until(sup, rig.clock, t0 + 220)
    assert await rig.status(acc) is State.offline
    assert [(m.old, m.trigger, m.at) for m in rig.moves_of(acc)][:2] == [
        (State.waiting_qr, Trigger.qr_scanned, t0 + 100),
        (State.waiting_confirm, Trigger.timeout, t0 + 220),
    ]


# ----------------------------------------------------------------- 11. lost compare-and-set


async def test_lost_compare_and_set_reloads_the_row_and_redecides(rig: Rig) -> None:
    applied, illegal, duplicate = await rig.insert([State.verifying] * 3)
    sup = rig.supervisor()
    await sup.load()
    sup.door.start()
    verified: list[tuple[str, str, dict[str, Any]]] = [
        (a, "verified", {}) for a in (applied, illegal, duplicate)
    ]
    assert await events(sup, rig.clock, verified) == [ItemResult.APPLIED] * 3

    # Another service moves the rows while the daemon still believes them online.
    await rig.set_status(applied, State.recovering)  # logged_out is legal from here too
    await rig.set_status(illegal, State.error)  # logged_out is not
    await rig.set_status(duplicate, State.offline)  # already where logged_out leads
    dropped: list[tuple[str, str, dict[str, Any]]] = [
        (a, "logged_out", {}) for a in (applied, illegal, duplicate)
    ]
    results = await events(sup, rig.clock, dropped)
    assert results == [ItemResult.APPLIED, ItemResult.ILLEGAL, ItemResult.DUPLICATE]
    assert sup.door.stats.conflicts == 3

    expected = {applied: State.offline, illegal: State.error, duplicate: State.offline}
    for account_id, state in expected.items():
        assert await rig.status(account_id) is state
        assert sup.accounts[account_id].status is state  # memory took the database's word
        chain = [(r["old_status"], r["new_status"]) for r in await rig.logs(account_id)]
        if account_id == applied:
            # The re-decided change is logged from the status actually found: no log row claims
            # a move from a state the row was not in, and nothing is logged for the lost try.
            assert chain == [("verifying", "online"), ("recovering", "offline")]
            assert (await rig.supervision(account_id))["status"] == "offline"
        else:
            assert chain == [("verifying", "online")]


# ------------------------------------------------------------------ 12. mass change grouping


async def test_two_thousand_online_to_offline_on_stale_heartbeat_in_few_batches(rig: Rig) -> None:
    n = 2000
    t0 = rig.clock.now()
    ids = await rig.insert([State.online] * n, heartbeat=t0)
    sup = rig.supervisor(PolicyConfig(heartbeat_timeout=45), startup_grace=0, batch_size=500)
    assert await sup.load() == n
    await sup.start()
    await run_until(sup, rig.clock, t0 + 44.9)
    assert sup.door.stats.committed == 0
    await run_until(sup, rig.clock, t0 + 45)

    assert sup.counts[State.offline] == n
    assert sup.door.stats.committed == n
    assert sup.door.stats.batches <= n // 500 + 3, sup.door.stats
    counts = await rig.log_counts()
    assert set(counts) == set(ids) and set(counts.values()) == {1}
    lg = account_status_logs
    async with rig.dbs.platform.connect() as conn:
        kinds = (
            await conn.execute(
                select(lg.c.old_status, lg.c.new_status, func.count()).group_by(
                    lg.c.old_status, lg.c.new_status
                )
            )
        ).all()
    assert [tuple(k) for k in kinds] == [("online", "offline", n)]
    a = wework_accounts
    async with rig.dbs.platform.connect() as conn:
        statuses = (await conn.execute(select(a.c.status, func.count()).group_by(a.c.status))).all()
    assert [tuple(s) for s in statuses] == [("offline", n)]


async def test_an_account_deleted_and_created_again_is_not_dropped_by_its_old_check(
    rig: Rig,
) -> None:
    """Heartbeat checks hold the account object, not its id (`HeartbeatChecks`): the check of
    a deleted account must die with it, not fire for a new account under the same id."""
    t0 = rig.clock.now()
    kept, gone = await rig.insert([State.online] * 2, heartbeat=t0)
    sup = rig.supervisor(PolicyConfig(heartbeat_timeout=45), startup_grace=0)
    assert await sup.load() == 2
    await sup.start()
    old = sup.accounts[gone]
    async with rig.dbs.platform.begin() as conn:
        await conn.execute(
            delete(accountd_supervision).where(accountd_supervision.c.account_id == gone)
        )
        row = (
            await conn.execute(select(wework_accounts).where(wework_accounts.c.id == gone))
        ).one()
        await conn.execute(delete(wework_accounts).where(wework_accounts.c.id == gone))
    sup.forget([gone])
    # Another service creates it again, online, with the same old heartbeat in its row.
    async with rig.dbs.platform.begin() as conn:
        await conn.execute(insert(wework_accounts).values(**row._mapping))
    assert sup.adopt_new(list((await rig.repo.get_accounts([gone])).values())) == 1
    assert sup.accounts[gone] is not old and old.heartbeat_check is None
    await run_until(sup, rig.clock, t0 + 30)
    beat(sup, [kept, gone])  # in memory only: nothing flushes them to the rows here

    await run_until(sup, rig.clock, t0 + 46)  # the old check was due at t0 + 45
    assert await rig.status(gone) is State.online and await rig.status(kept) is State.online
    assert sup.door.stats.committed == 0 and await rig.total_logs() == 0
    await run_until(sup, rig.clock, t0 + 76)  # silent since t0 + 30: both are dropped
    assert sup.counts[State.offline] == 2


__all__ = [
    "Moved",
    "Rig",
    "beat",
    "close_to",
    "events",
    "from_db_time",
    "open_rig",
    "run_until",
    "settle",
]
