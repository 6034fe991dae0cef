"""Races: an admin and a worker on one account at once, piled-up recoveries, two daemons.

Everything here is real: the daemon (in-process for the first two, as processes for the last),
its control socket and ingest listener spoken to over the real unix socket and loopback TCP, the
worker simulator on loopback, and the databases (SQLite; MariaDB too when
``ACCOUNTD_TEST_MYSQL_URL`` is set). What decides each race is the daemon's one door; the tests
only make the requests collide and then read the answers and the status log.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select, update

from accountd.adapters.db import Databases
from accountd.adapters.schema import account_status_logs, accountd_leases
from accountd.daemon.demo import _free_port
from tests.helpers import fast_simulator, write_config
from tests.test_control import Stack, running
from tests.test_e2e import legal_edges, seed_accounts, statuses, wait_for
from tests.test_restart import spawn, wait_ready

ROUNDS = 3
ACCOUNTS = 24


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # sun_path holds 107 bytes: pytest's tmp_path is too deep for a socket.
    path = Path(tempfile.mkdtemp(prefix="arace-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def log_rows(dbs: Databases) -> dict[str, list[dict[str, Any]]]:
    lg = account_status_logs
    out: dict[str, list[dict[str, Any]]] = {}
    async with dbs.platform.connect() as conn:
        rows = await conn.execute(select(lg).order_by(lg.c.account_id, lg.c.id))
        for row in rows:
            out.setdefault(row.account_id, []).append(dict(row._mapping))
    return out


def check_chains(history: dict[str, list[dict[str, Any]]], current: dict[str, str]) -> None:
    """Every log row continues the previous one, every edge is legal, status = last row."""
    edges = legal_edges()
    for account_id, rows in history.items():
        for a, b in itertools.pairwise(rows):
            assert b["old_status"] == a["new_status"], f"{account_id}: chain broken: {a} → {b}"
        for r in rows:
            if r["operator_id"] is None:  # admin forces may take any edge
                assert (r["old_status"], r["new_status"]) in edges, f"{account_id}: {r}"
        assert current[account_id] == rows[-1]["new_status"], account_id


async def all_online(stack: Stack) -> bool:
    return set((await statuses(stack.dbs)).values()) == {"online"}


def ingest_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.daemon.ingest_port}"


def bearer(stack: Stack) -> dict[str, str]:
    token = stack.daemon.settings.ingest.token
    assert token is not None
    return {"Authorization": f"Bearer {token.get_secret_value()}"}


async def no_mass_offline_pause(stack: Stack) -> None:
    """These tests knock every account of one tenant offline on purpose, round after round:
    without this the mass-offline cool-down and the flap rule (both right in production)
    would park the accounts instead of letting the next round start. Applied the way an
    operator would, through a live reload."""
    text = stack.config.read_text()
    stack.config.write_text(
        text.replace("[recovery]\n", "[recovery]\nmass_offline_cooldown = 0\nflap_count = 100\n")
    )
    assert await stack.daemon.reload() == []
    assert stack.daemon.settings.recovery.mass_offline_cooldown == 0


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------- force vs event


@pytest.mark.parametrize("target", ["offline", "error"])
async def test_admin_force_and_worker_event_at_once_exactly_one_wins(
    migrated_urls: dict[str, str], tmp_path: Path, sock_dir: Path, target: str
) -> None:
    """Online accounts get `force → target` (control socket) and `logged_out` (ingest) at the
    same moment, round after round.

    The force is a compare-and-set on the state its request found. Whichever change commits
    first wins; the other is answered without a write: the admin gets 409 (`conflict` when the
    event moved the account while the force waited in the door, `illegal_transition` when it
    found nothing to do), the worker `illegal_transition` or `duplicate`. The one sequential
    case is a force whose request arrived after the event had committed: it then says so
    ("from": "offline", or the state the daemon's own recovery had moved the account to
    meanwhile) and its log row continues from there. A force never applies from a state its
    answer does not name, and no decision is logged twice."""
    sock = sock_dir / "control.sock"
    rng = random.Random(6)
    async with running(migrated_urls, tmp_path, sock, "", accounts=ACCOUNTS) as stack:
        control = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)))
        ingest = aiohttp.ClientSession(headers=bearer(stack))
        wins = {"force": 0, "event": 0, "sequential": 0}
        await no_mass_offline_pause(stack)
        try:
            for round_no in range(ROUNDS):
                await wait_for(lambda: all_online(stack), 40, f"all online before round {round_no}")
                before = {a: len(rows) for a, rows in (await log_rows(stack.dbs)).items()}
                reason = f"race round {round_no}"

                async def force(account_id: str, reason: str = reason) -> tuple[int, Any]:
                    async with control.post(
                        f"http://control/v1/accounts/{account_id}/force",
                        json={"state": target, "reason": reason},
                    ) as resp:
                        return resp.status, await resp.json(content_type=None)

                async def event(account_id: str) -> tuple[int, Any]:
                    item = {"account_id": account_id, "event": "logged_out", "at": now_rfc3339()}
                    async with ingest.post(
                        f"{ingest_url(stack)}/v1/events", json={"events": [item]}
                    ) as resp:
                        return resp.status, await resp.json(content_type=None)

                async def collide(account_id: str) -> tuple[tuple[int, Any], tuple[int, Any]]:
                    # Which side reaches the door first depends on the machine's timing (the
                    # control socket has its own thread, side_loop.py, while the events are
                    # parsed by the main loop). One side, picked at random, starts a random
                    # 0-16 ms later: the short delays collide, the long ones make sure each
                    # side also wins outright now and then.
                    delay = rng.choice((0.0, 0.001, 0.002, 0.004, 0.008, 0.016))
                    force_later = rng.random() < 0.5

                    async def later(
                        delayed: bool, call: Awaitable[tuple[int, Any]]
                    ) -> tuple[int, Any]:
                        if delayed:
                            await asyncio.sleep(delay)
                        return await call

                    f, e = await asyncio.gather(
                        later(force_later, force(account_id)),
                        later(not force_later, event(account_id)),
                    )
                    return f, e

                answers = await asyncio.gather(*(collide(a) for a in stack.ids))
                history = await log_rows(stack.dbs)
                for account_id, ((f_status, f_body), (e_status, e_body)) in zip(
                    stack.ids, answers, strict=True
                ):
                    assert e_status == 200, e_body
                    (result,) = e_body["results"]
                    force_won, event_won = f_status == 200, result == "applied"
                    new = history[account_id][before.get(account_id, 0) :]
                    forced = [r for r in new if r["change_reason"].startswith("force:")]
                    logged = [r for r in new if r["change_reason"].startswith("logged_out:")]
                    assert len(forced) == int(force_won), (account_id, f_body, new)
                    assert len(logged) == int(event_won), (account_id, e_body, new)
                    if not force_won:
                        assert f_status == 409, f_body
                        assert f_body["error"]["code"] in ("conflict", "illegal_transition")
                    if not event_won:
                        assert result in ("duplicate", "illegal_transition", "conflict"), e_body
                    if force_won:
                        (row,) = forced
                        assert f_body["applied"] is True
                        # The answer names the state the force really left, always.
                        assert row["old_status"] == f_body["from"], (row, f_body)
                        assert row["new_status"] == target and row["operator_id"] is not None
                    if force_won and event_won:
                        # Only as a sequence, one of two.
                        if logged[0]["id"] < forced[0]["id"]:
                            # The event first; the force came after and moved on from offline,
                            # or from where the daemon's own recovery (a few ms of backoff now
                            # and then, as below) had taken it meanwhile (seen: recovering).
                            between = [
                                r for r in new if logged[0]["id"] < r["id"] < forced[0]["id"]
                            ]
                            if between:
                                assert between[0]["old_status"] == "offline", new
                                assert between[-1]["new_status"] == f_body["from"], new
                            else:
                                assert f_body["from"] == "offline", (account_id, f_body, new)
                        else:
                            # The force first; the daemon's own recovery (backoff base 0.2 s,
                            # full jitter: now and then a few ms) moved the account on before
                            # the event arrived (seen: to recovering), and logged_out applied
                            # from there. check_chains below checks every link of the chain.
                            assert f_body["from"] == "online", (account_id, f_body, new)
                            between = [
                                r for r in new if forced[0]["id"] < r["id"] < logged[0]["id"]
                            ]
                            assert between and between[0]["old_status"] == "offline", new
                            assert between[-1]["new_status"] == logged[0]["old_status"], new
                        wins["sequential"] += 1
                    else:
                        assert force_won != event_won, (account_id, f_body, e_body)
                        wins["force" if force_won else "event"] += 1
                # Accounts in offline are recovered by the daemon (the simulator's sessions still
                # beat); those forced into error need an admin's recover to start the next round.
                current = await statuses(stack.dbs)
                for account_id in stack.ids:
                    if current[account_id] == "error":
                        async with control.post(
                            f"http://control/v1/accounts/{account_id}/recover"
                        ) as resp:
                            assert resp.status == 200, await resp.text()
            await wait_for(lambda: all_online(stack), 40, "all online after the last round")
        finally:
            await control.close()
            await ingest.close()
        check_chains(await log_rows(stack.dbs), await statuses(stack.dbs))
        print(f"force vs logged_out ({target}), {ACCOUNTS} accounts x {ROUNDS} rounds: {wins}")
        # Both sides won sometimes, or the requests never really collided.
        assert wins["force"] > 0 and wins["event"] > 0, wins


# --------------------------------------------------------------------------- recoveries


async def test_concurrent_recoveries_never_resume_one_session_twice(
    migrated_urls: dict[str, str], tmp_path: Path, sock_dir: Path
) -> None:
    """Sessions die; while the recovery policy brings them back, an admin keeps asking for
    `recover` on every account as fast as the control socket answers. Every `recovering` entry
    must ask the worker for exactly one resume, and no account ever has two in flight."""
    sock = sock_dir / "control.sock"
    async with running(migrated_urls, tmp_path, sock, "", accounts=ACCOUNTS) as stack:
        sim = stack.sim
        answers: list[tuple[int, str | None]] = []
        control = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)))
        await no_mass_offline_pause(stack)
        try:
            for round_no in range(ROUNDS):
                await wait_for(lambda: all_online(stack), 40, f"all online before round {round_no}")
                for account_id in stack.ids:
                    assert sim.drop(account_id)
                done = asyncio.Event()

                async def hammer(account_id: str, done: asyncio.Event = done) -> None:
                    while not done.is_set():
                        async with control.post(
                            f"http://control/v1/accounts/{account_id}/recover"
                        ) as resp:
                            body = await resp.json(content_type=None)
                            code = body["error"]["code"] if resp.status != 200 else None
                            answers.append((resp.status, code))
                        await asyncio.sleep(0.01)

                tasks = [asyncio.create_task(hammer(a)) for a in stack.ids]
                try:
                    # Offline after 1.5 s without heartbeats, then back within the backoff.
                    await asyncio.sleep(2.0)
                    await wait_for(lambda: all_online(stack), 40, f"recovered in round {round_no}")
                finally:
                    done.set()
                    await asyncio.gather(*tasks)
        finally:
            await control.close()
        assert sim.overlapping_calls() == []
        history = await log_rows(stack.dbs)
        check_chains(history, await statuses(stack.dbs))
        resumes = sim.call_counts("resume")
        admin = 0
        for account_id in stack.ids:
            entries = [r for r in history[account_id] if r["new_status"] == "recovering"]
            admin += sum(1 for r in entries if r["operator_id"] is not None)
            assert len(entries) >= ROUNDS, account_id
            # One resume per entry into `recovering`: never a second for the same attempt.
            assert resumes.get(account_id, 0) == len(entries), (account_id, entries)
        print(
            f"recoveries: {sum(resumes.values())} resume calls, {admin} by an admin, "
            f"{len(answers)} admin requests, overlapping resumes: {len(sim.overlapping_calls())}"
        )
        statuses_seen = {status for status, _ in answers}
        assert statuses_seen <= {200, 409}, answers
        assert {code for _, code in answers} <= {None, "illegal_transition", "conflict"}
        assert admin > 0, "the admin's recover never won: the requests did not collide"


# --------------------------------------------------------------------------- two daemons


async def test_second_daemon_process_is_refused_and_a_daemon_that_loses_its_lease_stops(
    migrated_urls: dict[str, str], tmp_path: Path
) -> None:
    token = "race-token-" + os.urandom(8).hex()
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    port = _free_port()
    sim = fast_simulator(ingest_url=f"http://127.0.0.1:{port}", token=token, seed=5)
    worker = await sim.start()
    dbs = Databases(migrated_urls)
    first_log, second_log = first_dir / "daemon.log", second_dir / "daemon.log"
    first = spawn(
        write_config(first_dir / "accountd.toml", migrated_urls, port, worker, token), first_log
    )
    second = None
    try:
        await seed_accounts(dbs, 5)
        await wait_ready(first_log, first, 1)

        async def online() -> bool:
            return set((await statuses(dbs)).values()) == {"online"}

        await wait_for(online, 30, "accounts online under the first daemon")
        # The same databases, its own listener and socket: an operator's copy-paste slip.
        second_config = write_config(
            second_dir / "accountd.toml", migrated_urls, _free_port(), worker, token
        )
        second = spawn(second_config, second_log)
        code = await asyncio.to_thread(second.wait, 60)
        output = second_log.read_text()
        assert code == 1, output
        assert f"another accountd ({socket.gethostname()}:{first.pid}:" in output, output
        assert "refusing to run two daemons on one database" in output
        assert "Traceback" not in output
        assert "ready:" not in output
        assert first.poll() is None, "the first daemon must be unaffected"

        # A peer takes the lease over (as a daemon would after ours expired while paused): the
        # first daemon must notice at its next renewal (ttl/3 = 10 s) and stop with status 1.
        async with dbs.platform.begin() as conn:
            await conn.execute(
                update(accountd_leases)
                .where(accountd_leases.c.name == "supervisor")
                .values(holder="elsewhere:1:takeover", epoch=accountd_leases.c.epoch + 1)
            )
        code = await asyncio.to_thread(first.wait, 40)
        output = first_log.read_text()
        assert code == 1, output[-3000:]
        assert "was taken by another daemon" in output
        assert "stopping so that two daemons never write together" in output
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        await sim.stop()
        await dbs.dispose()
