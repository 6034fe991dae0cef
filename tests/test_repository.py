"""The account repository on real databases: compare-and-set transitions with their log rows."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, insert, select

from accountd.adapters.db import Databases
from accountd.adapters.repository import (
    AccountRepository,
    Applied,
    Conflict,
    TransitionRequest,
)
from accountd.adapters.schema import account_status_logs, accountd_supervision, wework_accounts


@pytest.fixture
async def dbs(migrated_urls: dict[str, str]) -> AsyncIterator[Databases]:
    databases = Databases(migrated_urls)
    try:
        yield databases
    finally:
        await databases.dispose()


async def insert_accounts(dbs: Databases, n: int, status: str = "created") -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    async with dbs.platform.begin() as conn:
        await conn.execute(
            insert(wework_accounts),
            [
                {
                    "id": i,
                    "tenant_id": "t1",
                    "account_name": f"acc-{k}",
                    "wework_guid": f"guid-{i}",
                    "status": status,
                }
                for k, i in enumerate(ids)
            ],
        )
    return ids


async def status_of(dbs: Databases, account_id: str) -> str | None:
    async with dbs.platform.connect() as conn:
        return (
            await conn.execute(
                select(wework_accounts.c.status).where(wework_accounts.c.id == account_id)
            )
        ).scalar()


async def log_rows(dbs: Databases, account_id: str) -> list[tuple[str | None, str, str | None]]:
    lg = account_status_logs
    async with dbs.platform.connect() as conn:
        rows = await conn.execute(
            select(lg.c.old_status, lg.c.new_status, lg.c.operator_id)
            .where(lg.c.account_id == account_id)
            .order_by(lg.c.id)
        )
        return [tuple(r) for r in rows]


async def test_apply_transition_commits_status_and_log_together(dbs: Databases) -> None:
    (acc,) = await insert_accounts(dbs, 1)
    repo = AccountRepository(dbs.platform)
    outcome = await repo.apply_transition(
        acc,
        "created",
        "initializing",
        "start: test",
        None,
        "admin-1",
        supervision={"entered_at": None, "attempts": 0},
    )
    assert isinstance(outcome, Applied)
    assert await status_of(dbs, acc) == "initializing"
    assert await log_rows(dbs, acc) == [("created", "initializing", "admin-1")]
    async with dbs.platform.connect() as conn:
        sup = (
            await conn.execute(
                select(accountd_supervision.c.status, accountd_supervision.c.last_log_id).where(
                    accountd_supervision.c.account_id == acc
                )
            )
        ).one()
    assert sup == ("initializing", outcome.log_id)


async def test_lost_compare_and_set_reports_conflict_and_changes_nothing(dbs: Databases) -> None:
    (acc,) = await insert_accounts(dbs, 1, status="online")
    repo = AccountRepository(dbs.platform)
    outcome = await repo.apply_transition(acc, "created", "initializing", "start: stale view")
    assert outcome == Conflict(acc, "created", "online")
    assert await status_of(dbs, acc) == "online"
    assert await log_rows(dbs, acc) == []


async def test_transition_of_a_deleted_row_is_a_conflict_with_nothing_found(
    dbs: Databases,
) -> None:
    repo = AccountRepository(dbs.platform)
    outcome = await repo.apply_transition("no-such-id", "created", "initializing", "start")
    assert outcome == Conflict("no-such-id", "created", None)


async def test_failure_between_update_and_log_insert_leaves_neither(dbs: Databases) -> None:
    (acc,) = await insert_accounts(dbs, 1)
    repo = AccountRepository(dbs.platform)

    def explode() -> None:
        raise RuntimeError("injected failure between the two statements")

    repo.between_statements = explode
    with pytest.raises(RuntimeError, match="injected"):
        await repo.apply_transition(acc, "created", "initializing", "start: doomed")
    assert await status_of(dbs, acc) == "created"
    assert await log_rows(dbs, acc) == []


async def test_grouped_transitions_apply_winners_and_report_losers(dbs: Databases) -> None:
    ids = await insert_accounts(dbs, 250, status="online")
    losers = await insert_accounts(dbs, 3, status="error")
    repo = AccountRepository(dbs.platform, chunk=100)  # several IN-chunks in one transaction
    requests = [
        TransitionRequest(i, "online", "offline", "heartbeat_lost: test", supervision={})
        for i in ids + losers
    ]
    outcomes = await repo.apply_transitions(requests)
    assert [type(o) for o in outcomes] == [Applied] * 250 + [Conflict] * 3
    assert {o.found for o in outcomes if isinstance(o, Conflict)} == {"error"}
    async with dbs.platform.connect() as conn:
        counts: dict[str, int] = dict(
            (
                await conn.execute(
                    select(wework_accounts.c.status, func.count()).group_by(
                        wework_accounts.c.status
                    )
                )
            ).all()
        )
        logs = (await conn.execute(select(func.count()).select_from(account_status_logs))).scalar()
    assert counts == {"offline": 250, "error": 3}
    assert logs == 250


async def test_transition_sets_and_clears_row_fields(dbs: Databases) -> None:
    (acc,) = await insert_accounts(dbs, 1, status="initializing")
    repo = AccountRepository(dbs.platform)
    await repo.apply_transition(
        acc, "initializing", "waiting_qr", "qr_ready", fields={"login_qr_code": "data:qr"}
    )
    await repo.apply_transition(
        acc, "waiting_qr", "error", "fail", fields={"error_message": "boom"}
    )
    async with dbs.platform.connect() as conn:
        row = (
            await conn.execute(
                select(wework_accounts.c.login_qr_code, wework_accounts.c.error_message).where(
                    wework_accounts.c.id == acc
                )
            )
        ).one()
    assert tuple(row) == ("data:qr", "boom")
    with pytest.raises(ValueError, match="not settable"):
        TransitionRequest(acc, "error", "online", "x", fields={"wework_secret": "nope"})


async def test_heartbeat_batch_writes_once_per_account_and_never_moves_back(
    dbs: Databases,
) -> None:
    ids = await insert_accounts(dbs, 30, status="online")
    repo = AccountRepository(dbs.platform)
    t0 = 1_800_000_000.0
    written = await repo.write_heartbeats({i: t0 + (k % 3) for k, i in enumerate(ids)})
    assert written == 30
    # An older value never overwrites a newer one (other services write this column too).
    assert await repo.write_heartbeats({ids[0]: t0 - 100}) == 0
    rows = await repo.get_accounts(ids)
    assert rows[ids[0]].last_heartbeat_at == t0
    assert rows[ids[1]].last_heartbeat_at == t0 + 1


async def test_iter_accounts_pages_through_every_row_once(dbs: Databases) -> None:
    ids = await insert_accounts(dbs, 23)
    repo = AccountRepository(dbs.platform)
    seen: list[str] = []
    pages = 0
    async for page in repo.iter_accounts(page_size=5):
        pages += 1
        seen.extend(r.id for r in page)
    assert sorted(seen) == sorted(ids)
    assert pages == 5


# Quotes, backslashes and the rest, as a worker's error text or an admin's reason may hold
# them. On MariaDB the sessions run with NO_BACKSLASH_ESCAPES (accountd.adapters.db): the
# driver then quotes by doubling single quotes only, and this is what says that loses nothing.
AWKWARD = ["it's", "C:\\temp\\", "\\'; DROP TABLE x; --", 'say "hi"', "nul\x00byte", "%s %(p0)s"]


@pytest.mark.parametrize("journal", [False, True], ids=["upsert", "journal"])
async def test_awkward_text_round_trips_through_the_batch_statements(
    dbs: Databases, journal: bool
) -> None:
    if dbs.platform.dialect.name == "mysql":
        async with dbs.platform.connect() as conn:
            mode = (await conn.exec_driver_sql("SELECT @@SESSION.sql_mode")).scalar()
        assert "NO_BACKSLASH_ESCAPES" in str(mode).split(",")
    ids = await insert_accounts(dbs, len(AWKWARD), status="waiting_qr")
    repo = AccountRepository(dbs.platform)
    requests = [
        TransitionRequest(
            i,
            "waiting_qr",
            "error",
            f"fail: {text}",
            error_details=text + "\\",
            fields={"error_message": text, "login_qr_code": "\\" + text},
            supervision={"paused": True, "paused_reason": text, "offline_history": [1.5]},
        )
        for i, text in zip(ids, AWKWARD, strict=True)
    ]
    assert all(
        isinstance(o, Applied) for o in await repo.apply_transitions(requests, journal=journal)
    )
    if journal:
        assert await repo.fold_journal() == (1, len(ids))
    a, lg, s = wework_accounts, account_status_logs, accountd_supervision
    async with dbs.platform.connect() as conn:
        found = {
            r[0]: tuple(r[1:])
            for r in await conn.execute(
                select(a.c.id, a.c.error_message, a.c.login_qr_code, lg.c.change_reason)
                .add_columns(lg.c.error_details, s.c.paused_reason)
                .join(lg, lg.c.account_id == a.c.id)
                .join(s, s.c.account_id == a.c.id)
                .where(a.c.id.in_(ids))
            )
        }
    assert found == {
        i: (text, "\\" + text, f"fail: {text}", text + "\\", text)
        for i, text in zip(ids, AWKWARD, strict=True)
    }
