"""Crash consistency: SIGKILL the real daemon at random moments under load, restart, verify.

The CI subset of ``python -m bench.torture`` (the soak: 20 rounds, thousands of accounts; see
docs/reliability.md): ``accountd run`` as a real process, the worker simulator with failure
rates on, new rows inserted and ``accountctl`` force/recover/pause/resume fired all the time;
three SIGKILLs at random moments, each followed by an immediate restart. Afterwards every
account must come online (or sit in the one documented terminal state until an admin recovers
it), ``accountd db verify`` must exit 0, no admin decision may be logged twice, and every
supervision row of an account that did not move across a restart must be restored exactly.
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

from sqlalchemy import insert

from accountd.adapters.db import Databases
from accountd.adapters.schema import account_status_logs, tenants, wework_accounts
from bench.torture import (
    CI,
    NEVER,
    ONCE,
    SNAP_COLUMNS,
    check_history,
    compare_snapshots,
    run_torture,
)


async def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    migrated_urls: dict[str, str], tmp_path: Path
) -> None:
    result = await run_torture(migrated_urls, tmp_path, CI, say=lambda _: None)
    summary = result.summary()
    # pytest keeps only the last few temporary directories: a CI failure carries its evidence.
    summary += "".join(f"\n{p.read_text()[:6000]}" for p in result.evidence[:2])
    assert result.ok, summary
    assert result.violations == [], summary
    assert result.verify_exit == 0, summary
    assert len(result.rounds) == CI.rounds >= 3
    # The kills landed in a busy daemon: transitions committed in every round, recoveries in
    # flight (attempts > 0) among the rows a restart had to restore, admin forces acknowledged.
    assert all(r.transitions > 0 for r in result.rounds), summary
    assert sum(r.restored for r in result.rounds) > 0, summary
    assert sum(r.mid_recovery for r in result.rounds) > 0, summary
    assert result.transitions > 500, summary
    assert result.accounts > CI.accounts, summary  # rows inserted while it ran were taken up
    assert result.admin["force:0"] > 0, summary


def _row(last_log: str | None, attempts: int, at: dt.datetime | None) -> tuple[object, ...]:
    values = {
        "status": "offline",
        "attempts": attempts,
        "qr_refreshes": 0,
        "entered_at": dt.datetime(2026, 1, 1, 12, 0, 0),
        "next_action": "recover",
        "next_action_at": at,
        "online_since": None,
        "offline_history": [1.0],
        "paused": False,
    }
    return (last_log, *(values[c] for c in SNAP_COLUMNS))


def test_a_restart_that_resets_attempts_or_deadlines_is_reported() -> None:
    due = dt.datetime(2026, 1, 1, 12, 0, 9)
    before = {
        "kept": _row("log-1", 3, due),
        "reset": _row("log-2", 3, due),
        "rescheduled": _row("log-3", 2, due),
        "moved-on": _row("log-4", 2, due),
        "vanished": _row("log-5", 1, due),
    }
    after = {
        "kept": _row("log-1", 3, due),
        "reset": _row("log-2", 0, due),
        "rescheduled": _row("log-3", 2, due + dt.timedelta(seconds=10)),
        "moved-on": _row("log-9", 0, None),  # a new transition after the restart: not compared
    }
    compared, mid, problems = compare_snapshots(before, after)
    assert (compared, mid) == (3, 3)
    assert len(problems) == 3, problems
    assert any(p.startswith("reset:") and "'attempts': (3, 0)" in p for p in problems)
    assert any(p.startswith("rescheduled:") and "next_action_at" in p for p in problems)
    assert any(p.startswith("vanished:") for p in problems)


async def test_history_check_reports_double_logged_and_lost_decisions(
    migrated_urls: dict[str, str],
) -> None:
    dbs = Databases(migrated_urls)
    try:
        tenant, account = str(uuid.uuid4()), str(uuid.uuid4())
        async with dbs.core.begin() as conn:
            await conn.execute(insert(tenants).values(id=tenant, tenant_name="T", tenant_code="t"))
        log = [
            ("created", "initializing", "start: new account picked up"),
            ("initializing", "error", "force: torture-0-1; next: recover"),
            ("error", "error", "force: torture-0-1; next: recover"),  # the same decision again
            ("error", "verifying", "recover: not a legal edge"),
        ]
        async with dbs.platform.begin() as conn:
            await conn.execute(
                insert(wework_accounts).values(
                    id=account,
                    tenant_id=tenant,
                    account_name="a",
                    wework_guid="g",
                    status="verifying",
                )
            )
            await conn.execute(
                insert(account_status_logs),
                [
                    {
                        "id": f"01900000-0000-7000-8000-00000000000{i}",
                        "account_id": account,
                        "old_status": old,
                        "new_status": new,
                        "change_reason": reason,
                    }
                    for i, (old, new, reason) in enumerate(log)
                ],
            )
        expect = {"torture-0-1": ONCE, "torture-0-2": ONCE, "torture-0-3": NEVER}
        accounts, rows, problems = await check_history(dbs.platform, expect)
        assert (accounts, rows) == (1, 4)
        text = "\n".join(problems)
        assert "'torture-0-1' logged 2 times" in text
        assert "'torture-0-2' answered applied but logged 0 times" in text
        assert "error -> verifying is no legal edge" in text
        assert "torture-0-3" not in text
        assert len(problems) == 4, problems  # torture-0-1 also fails its "exactly once"
    finally:
        await dbs.dispose()
