"""The supervision journal: large batches write their supervision rows as one journal row.

On real databases (SQLite, and MariaDB when ``ACCOUNTD_TEST_MYSQL_URL`` is set): the fold leaves
exactly what a direct upsert would have, in journal order; the door keeps journaling while a row
may be unfolded, so a fold never puts an older row over a newer one (an admin's pause
included); start-up folds what a crash left; ``db verify`` reads the journal.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import delete, func, select

from accountd.adapters.batch_sql import SUPERVISION_FIELDS
from accountd.adapters.repository import Applied, TransitionRequest
from accountd.adapters.schema import (
    accountd_supervision,
    accountd_supervision_journal,
    wework_accounts,
)
from accountd.adapters.verify import verify
from accountd.daemon.door import Change
from accountd.daemon.policy import PolicyConfig
from accountd.daemon.protocol import ItemResult
from accountd.daemon.supervisor import Supervisor
from accountd.statemachine import State, Trigger
from tests.test_engine import Rig, open_rig, settle

QUIET = PolicyConfig(heartbeat_timeout=600, base=600, cap=600)
WHEN = dt.datetime(2031, 5, 6, 7, 8, 9, 123456)
# What a direct write and a folded one must agree on (the log ids and write times differ).
COMPARED = tuple(f for f in SUPERVISION_FIELDS if f != "last_log_id")


@pytest.fixture
async def rig(migrated_urls: dict[str, str]) -> AsyncIterator[Rig]:
    async with open_rig(migrated_urls) as r:
        r.urls = migrated_urls  # type: ignore[attr-defined]
        yield r


def request(account_id: str, old: str, new: str, k: int, **supervision: Any) -> TransitionRequest:
    values: dict[str, Any] = {
        "entered_at": WHEN,
        "attempts": k % 4,
        "qr_refreshes": k % 3,
        "next_action": "recover",
        "next_action_at": WHEN + dt.timedelta(seconds=k, microseconds=k),
        "online_since": WHEN - dt.timedelta(hours=1) if k % 2 else None,
        "offline_history": [1.5 + k, 2.25],
        "paused": k % 5 == 0,
        "paused_reason": f"maint 'o' {k}" if k % 5 == 0 else None,
    }
    values.update(supervision)
    return TransitionRequest(account_id, old, new, f"test: {k}", supervision=values)


async def journal_rows(rig: Rig) -> int:
    j = accountd_supervision_journal
    async with rig.dbs.platform.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(j))).scalar_one())


async def supervision_rows(rig: Rig, ids: list[str]) -> dict[str, dict[str, Any]]:
    s = accountd_supervision
    async with rig.dbs.platform.connect() as conn:
        rows = await conn.execute(select(s).where(s.c.account_id.in_(ids)))
        return {r.account_id: dict(r._mapping) for r in rows}


async def verified_in_one_batch(rig: Rig, n: int) -> tuple[Supervisor, list[str]]:
    """A running supervisor whose ``n`` accounts went verifying -> online in one journaled
    batch (load wrote their supervision rows as 'verifying': repairs)."""
    ids = await rig.insert([State.verifying] * n)
    sup = rig.supervisor(QUIET, startup_grace=600)
    assert sup.door.journal_min <= n <= sup.door.batch_size
    await sup.load()
    await sup.start()
    for f in sup.door.fire_many([Change(a, Trigger.verified, "test") for a in ids]):
        assert await f is ItemResult.APPLIED
    return sup, ids


async def test_a_folded_journal_leaves_the_rows_a_direct_upsert_writes(rig: Rig) -> None:
    n = 120
    direct = await rig.insert([State.online] * n)
    journaled = await rig.insert([State.online] * n)
    for ids, journal in ((direct, False), (journaled, True)):
        requests = [request(a, "online", "offline", k) for k, a in enumerate(ids)]
        outcomes = await rig.repo.apply_transitions(requests, journal=journal)
        assert all(isinstance(o, Applied) for o in outcomes)
    # Status and log rows are committed either way; the journaled supervision waits.
    assert await journal_rows(rig) == 1
    assert await supervision_rows(rig, journaled) == {}
    assert {r["status"] for r in (await rig.rows(journaled)).values()} == {"offline"}

    assert await rig.repo.fold_journal() == (1, n)
    assert await rig.repo.fold_journal() == (0, 0)
    assert await journal_rows(rig) == 0
    want, got = await supervision_rows(rig, direct), await supervision_rows(rig, journaled)
    for k in range(n):
        a, b = want[direct[k]], got[journaled[k]]
        assert {c: a[c] for c in COMPARED} == {c: b[c] for c in COMPARED}, k
        (log,) = await rig.logs(journaled[k])
        assert b["last_log_id"] == log["id"]
    assert got[journaled[7]]["next_action_at"] == WHEN + dt.timedelta(seconds=7, microseconds=7)


async def test_the_fold_applies_the_journal_in_order_and_skips_deleted_accounts(
    rig: Rig,
) -> None:
    kept, gone = await rig.insert([State.online] * 2)
    first = [request(kept, "online", "offline", 1), request(gone, "online", "offline", 2)]
    await rig.repo.apply_transitions(first, journal=True)
    await rig.repo.apply_transitions(
        [request(kept, "offline", "recovering", 3, attempts=1)], journal=True
    )
    async with rig.dbs.platform.begin() as conn:
        await conn.execute(delete(wework_accounts).where(wework_accounts.c.id == gone))
    # One transaction for both journal rows; the later row wins; the deleted account is skipped
    # (an upsert would fail its foreign key and take the whole fold with it).
    assert await rig.repo.fold_journal(limit=10) == (2, 1)
    rows = await supervision_rows(rig, [kept, gone])
    assert list(rows) == [kept]
    assert (rows[kept]["status"], rows[kept]["attempts"]) == ("recovering", 1)


async def test_the_door_journals_large_batches_and_everything_until_the_fold(rig: Rig) -> None:
    sup, ids = await verified_in_one_batch(rig, 300)
    await settle(sup, rig.clock)
    assert await journal_rows(rig) == 1 and sup.door.journal_active
    assert {r["status"] for r in (await supervision_rows(rig, ids)).values()} == {"verifying"}

    # A single change after it goes to the journal too: written directly, the later fold of
    # the older row would put 'online' back over it.
    (one,) = sup.door.fire_many([Change(ids[0], Trigger.logged_out, "test")])
    assert await one is ItemResult.APPLIED
    assert await journal_rows(rig) == 2

    assert await sup.fold_journal() == 2
    assert not sup.door.journal_active and await journal_rows(rig) == 0
    rows = await supervision_rows(rig, ids)
    assert rows[ids[0]]["status"] == "offline"
    assert {rows[a]["status"] for a in ids[1:]} == {"online"}

    # With the journal empty, a single change writes its row directly again.
    (two,) = sup.door.fire_many([Change(ids[1], Trigger.logged_out, "test")])
    assert await two is ItemResult.APPLIED
    assert await journal_rows(rig) == 0
    assert (await supervision_rows(rig, [ids[1]]))[ids[1]]["status"] == "offline"


async def test_a_pause_while_the_journal_holds_rows_is_journaled_after_them(rig: Rig) -> None:
    sup, ids = await verified_in_one_batch(rig, 250)
    assert await sup.set_paused(sup.accounts[ids[0]], True, "maintenance")
    assert await journal_rows(rig) == 2
    assert (await supervision_rows(rig, [ids[0]]))[ids[0]]["paused"] is False
    assert await sup.fold_journal() == 2
    row = (await supervision_rows(rig, [ids[0]]))[ids[0]]
    # Both survive the fold: the batch's status (older) and the pause (newer).
    assert (row["status"], row["paused"], row["paused_reason"]) == ("online", True, "maintenance")


async def test_start_up_folds_what_a_crash_left_in_the_journal(rig: Rig) -> None:
    ids = await rig.insert([State.online] * 3)
    # As a killed daemon leaves it: statuses and log rows committed, supervision journaled.
    requests = [request(a, "online", "offline", k, paused=False) for k, a in enumerate(ids)]
    await rig.repo.apply_transitions(requests, journal=True)
    assert await journal_rows(rig) == 1
    sup = rig.supervisor(QUIET, startup_grace=600)
    await sup.load()
    assert await journal_rows(rig) == 0
    for k, account_id in enumerate(ids):
        acc = sup.accounts[account_id]
        # Restored from the journaled rows, not re-planned as a change behind our back.
        assert acc.status is State.offline
        assert acc.attempts == k % 4
        assert acc.offline_history == (1.5 + k, 2.25)
        assert acc.next_action_at == pytest.approx(
            (WHEN + dt.timedelta(seconds=k, microseconds=k)).replace(tzinfo=dt.UTC).timestamp()
        )


async def test_verify_reads_the_journal(rig: Rig) -> None:
    ids = await rig.insert([State.online] * 3)
    requests = [request(a, "online", "offline", k) for k, a in enumerate(ids)]
    await rig.repo.apply_transitions(requests, journal=True)
    urls: dict[str, str] = rig.urls  # type: ignore[attr-defined]
    report = await verify(urls)
    check = report.get("supervision_matches_status")
    assert check.ok, check
    # Behind the daemon's back: the account's status no longer agrees with its journaled one.
    await rig.set_status(ids[1], State.online)
    report = await verify(urls)
    check = report.get("supervision_matches_status")
    assert (check.violations, check.ids) == (1, [ids[1]])


async def test_a_stop_folds_what_the_flush_job_had_not_folded_yet(rig: Rig) -> None:
    sup, ids = await verified_in_one_batch(rig, 220)
    assert await journal_rows(rig) == 1
    await rig.stop(sup)
    assert await journal_rows(rig) == 0
    assert {r["status"] for r in (await supervision_rows(rig, ids)).values()} == {"online"}


async def test_the_torture_snapshot_sees_the_journal_as_the_restart_will(rig: Rig) -> None:
    """bench.torture compares supervision rows across a SIGKILL and a restart: what the killed
    daemon left in the journal must count as left, since the restart folds it first."""
    from bench.torture import supervision_snapshot

    ids = await rig.insert([State.online] * 4)
    first = [request(a, "online", "offline", k) for k, a in enumerate(ids)]
    await rig.repo.apply_transitions(first)
    second = [request(a, "offline", "recovering", k + 10, attempts=1) for k, a in enumerate(ids)]
    await rig.repo.apply_transitions(second[:2], journal=True)
    left = await supervision_snapshot(rig.dbs.platform)
    assert [left[a][1] for a in ids] == ["recovering", "recovering", "offline", "offline"]
    await rig.repo.fold_journal()
    assert await supervision_snapshot(rig.dbs.platform) == left


async def test_the_torture_snapshot_reads_table_and_journal_at_one_moment(rig: Rig) -> None:
    """After a restart the new daemon commits while the snapshot reads: a batch journaled
    between its two reads must not show its new state beside the last log id from before it
    (that looked like a restart changing supervision state, on SQLite)."""
    from bench.torture import supervision_snapshot

    ids = await rig.insert([State.online] * 2)
    await rig.repo.apply_transitions(
        [request(a, "online", "offline", k) for k, a in enumerate(ids)]
    )

    async def commit_meanwhile() -> None:
        await rig.repo.apply_transitions(
            [request(ids[0], "offline", "recovering", 7)], journal=True
        )

    seen = await supervision_snapshot(rig.dbs.platform, between=commit_meanwhile)
    assert [seen[a][1] for a in ids] == ["offline", "offline"]
    assert await journal_rows(rig) == 1  # it did commit, after the snapshot's moment
    now = await supervision_snapshot(rig.dbs.platform)
    assert (now[ids[0]][1], now[ids[0]][0] != seen[ids[0]][0]) == ("recovering", True)


def test_a_journal_document_writes_shared_values_once_and_reads_back_every_row() -> None:
    from accountd.adapters.repository import journal_document, journal_entries

    columns = ["account_id", "status", "attempts", "paused", "next_action_at", "history"]
    rows = [
        [f"a{k}", "offline", 1, False, f"2031-05-06 07:08:{k:02d}.000001", "[]"] for k in range(3)
    ]
    rows[2][5] = "[1.5]"
    doc = json.loads(journal_document(columns, rows))
    assert doc["same"] == {"status": "offline", "attempts": 1, "paused": False}
    assert doc["columns"] == ["account_id", "next_action_at", "history"]
    assert [dict(zip(columns, r, strict=True)) for r in rows] == list(
        journal_entries(journal_document(columns, rows))
    )
    # One row shares nothing with another: written whole.
    one = json.loads(journal_document(columns, rows[:1]))
    assert "same" not in one and one["rows"] == [rows[0]]
