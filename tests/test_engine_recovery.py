"""The engine's own decisions on real databases: heartbeats, backoff, giving up, QR limits,
flapping, recovery caps, mass offline. The worker is down throughout (see `tests.test_engine`),
so every resume fails transiently and only the policy decides what happens next."""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import update

from accountd.adapters.repository import to_db_time
from accountd.adapters.schema import wework_accounts
from accountd.daemon.policy import PolicyConfig
from accountd.daemon.protocol import ItemResult
from accountd.daemon.supervisor import FAIL, RECOVER, RETRY_ERROR
from accountd.statemachine import State, Trigger
from tests.test_engine import Rig, beat, close_to, events, from_db_time, open_rig, run_until, settle


@pytest.fixture
async def rig(migrated_urls: dict[str, str]) -> AsyncIterator[Rig]:
    async with open_rig(migrated_urls) as r:
        yield r


# ------------------------------------------------------------ 3. heartbeats and the backoff


async def test_online_to_offline_on_stale_heartbeat_then_backoff_until_error(rig: Rig) -> None:
    # One account per tenant, so twelve simultaneous drops are not a mass outage; a high start
    # rate and flap count keep the limiter and flap detection out of this test's way.
    cfg = PolicyConfig(
        heartbeat_timeout=45,
        base=10,
        cap=40,
        max_attempts=4,
        error_retry_after=1800,
        flap_count=50,
        start_rate=1000,
    )
    t0 = rig.clock.now()
    ids = [(await rig.insert([State.online], tenant=f"t{i}", heartbeat=t0))[0] for i in range(12)]
    sup = rig.supervisor(cfg, startup_grace=0)
    await sup.load()
    await sup.start()

    for k in range(1, 7):  # beating every 10 s keeps them online well past the timeout
        await run_until(sup, rig.clock, t0 + 10 * k)
        beat(sup, ids)
    last_beat = t0 + 60
    await run_until(sup, rig.clock, last_beat + 45 - 0.01)
    assert sup.counts[State.online] == 12 and not rig.moves

    await run_until(sup, rig.clock, last_beat + 45)
    for acc in ids:
        (lost,) = rig.moves_of(acc)
        assert (lost.old, lost.new, lost.trigger, lost.at) == (
            State.online,
            State.offline,
            Trigger.heartbeat_lost,
            last_beat + 45,
        )
        log = (await rig.logs(acc))[-1]
        assert log["change_reason"].startswith("heartbeat_lost: no heartbeat within 45s")
        # The backoff decision is persisted with the transition, in the same transaction.
        row = await rig.supervision(acc)
        assert (row["status"], row["attempts"], row["next_action"]) == ("offline", 1, RECOVER)
        assert close_to(from_db_time(row["next_action_at"]), sup.accounts[acc].next_action_at)
        assert 0 <= from_db_time(row["next_action_at"]) - lost.at <= cfg.base  # type: ignore[operator]

    # Attempts 1-4 (resume fails, recovering times out), then `fail`, then a retry from error.
    end = last_beat + 45 + (10 + 20 + 40 + 40) + 4 * 60 + 1800 + 60 + 1
    await run_until(sup, rig.clock, end)

    bound = {1: 10.0, 2: 20.0, 3: 40.0, 4: 40.0}  # base doubling, capped at 40
    delays: dict[int, list[float]] = {n: [] for n in bound}
    for acc in ids:
        moves = rig.moves_of(acc)
        path = [(m.old, m.trigger) for m in moves]
        assert path == [
            (State.online, Trigger.heartbeat_lost),
            *[(State.offline, Trigger.recover), (State.recovering, Trigger.timeout)] * 4,
            (State.offline, Trigger.fail),
            (State.error, Trigger.recover),
            (State.recovering, Trigger.timeout),
            (State.offline, Trigger.fail),  # out of attempts: one try per error_retry_after
        ], path
        for n in bound:
            went_offline, recovering, timed_out = moves[2 * n - 2], moves[2 * n - 1], moves[2 * n]
            assert went_offline.attempts == n and went_offline.next_action == RECOVER
            assert recovering.at == went_offline.next_action_at  # fired when it said it would
            delays[n].append(recovering.at - went_offline.at)
            assert timed_out.at == recovering.at + 60
        # After the 4th failed attempt the policy gives up at once, and retries from error later.
        gave_up, failed, retried = moves[8], moves[9], moves[10]
        assert gave_up.next_action == FAIL and failed.at == gave_up.at
        assert failed.next_action == RETRY_ERROR and failed.next_action_at == failed.at + 1800
        assert retried.at == failed.at + 1800 and retried.new is State.recovering

        logs = await rig.logs(acc)
        assert [(r["old_status"], r["new_status"]) for r in logs] == [(m.old, m.new) for m in moves]
        # The timeouts name the down worker; the give-up is explained before the error.
        assert "the last worker call failed" in logs[2]["change_reason"]
        assert logs[2]["error_details"].startswith("last worker error: worker POST /v1/sessions/")
        assert "; next: recover: attempt 2/4" in logs[2]["change_reason"]
        for n in bound:  # each recover row names its attempt, as the decision before it did
            assert (
                f"; next: recover: attempt {n}/4 after backoff" in logs[2 * n - 2]["change_reason"]
            )
            assert logs[2 * n - 1]["change_reason"].startswith(f"recover: attempt {n}/4 after")
        assert "fail: gave up after 4 recovery attempts" in logs[8]["change_reason"]
        assert logs[9]["change_reason"].startswith("fail: ")
        assert logs[10]["change_reason"].startswith("recover: error retry after 1800s")
        row = (await rig.rows([acc]))[acc]
        assert (row["status"], row["error_message"]) == ("error", "recovery_exhausted")

    for n, ds in delays.items():
        assert all(0 <= d <= bound[n] for d in ds), (n, ds)
    # Full jitter spreads over the whole, growing interval: with twelve accounts some delay of
    # attempt n exceeds the bound of attempt n-1 (each miss has probability <= 2**-12).
    assert max(delays[2]) > bound[1] and max(delays[3]) > bound[2]


async def test_error_is_never_retried_when_error_retry_after_is_zero(rig: Rig) -> None:
    (acc,) = await rig.insert([State.online], heartbeat=rig.clock.now())
    sup = rig.supervisor(PolicyConfig(error_retry_after=0, heartbeat_timeout=10**6))
    await sup.load()
    t0 = rig.clock.now()
    await sup.start()
    assert await events(sup, rig.clock, [(acc, "fail", {"error": "banned"})]) == [
        ItemResult.APPLIED
    ]
    row = await rig.supervision(acc)
    assert (row["status"], row["next_action"], row["next_action_at"]) == ("error", None, None)
    await run_until(sup, rig.clock, t0 + 30 * 86400)
    assert await rig.status(acc) is State.error
    assert len(await rig.logs(acc)) == 1


# ------------------------------------------------------ 4. a heartbeat written by another service


async def test_heartbeat_written_to_the_row_by_another_service_keeps_online(rig: Rig) -> None:
    t0 = rig.clock.now()
    (acc,) = await rig.insert([State.online], heartbeat=t0)
    sup = rig.supervisor(PolicyConfig(heartbeat_timeout=45), startup_grace=0)
    await sup.load()
    await sup.start()
    await run_until(sup, rig.clock, t0 + 30)
    a = wework_accounts
    async with rig.dbs.platform.begin() as conn:
        await conn.execute(
            update(a).where(a.c.id == acc).values(last_heartbeat_at=to_db_time(t0 + 30))
        )
    # Memory alone would call it stale at t0+45; the database says it beat at t0+30.
    await run_until(sup, rig.clock, t0 + 75 - 0.01)
    assert await rig.status(acc) is State.online and not rig.moves
    await run_until(sup, rig.clock, t0 + 75)
    assert await rig.status(acc) is State.offline
    assert [(m.trigger, m.at) for m in rig.moves_of(acc)] == [(Trigger.heartbeat_lost, t0 + 75)]


# --------------------------------------------------------------------- 5. the QR refresh limit


async def test_waiting_qr_to_error_after_qr_max_refreshes_and_no_automatic_retry(
    rig: Rig,
) -> None:
    (acc,) = await rig.insert([State.initializing])
    sup = rig.supervisor(PolicyConfig(qr_max_refreshes=3))
    await sup.load()
    t0 = rig.clock.now()
    await sup.start()
    # The first QR of a login is free; three refreshes are allowed; the fourth needs a human.
    for k in range(4):
        assert await events(sup, rig.clock, [(acc, "qr_ready", {"qr_code": f"QR{k}"})]) == [
            ItemResult.APPLIED
        ]
        assert await rig.status(acc) is State.waiting_qr
        assert (await rig.rows([acc]))[acc]["login_qr_code"] == f"QR{k}"
    assert await events(sup, rig.clock, [(acc, "qr_ready", {"qr_code": "QR4"})]) == [
        ItemResult.APPLIED
    ]
    row = (await rig.rows([acc]))[acc]
    assert (row["status"], row["error_message"]) == ("error", "qr_not_scanned")
    logs = await rig.logs(acc)
    assert [r["change_reason"].split(":")[0] for r in logs] == ["qr_ready"] * 4 + ["fail"]
    assert logs[-1]["change_reason"] == "fail: qr not scanned after 3 refreshes"
    assert sup.accounts[acc].next_action is None
    sup_row = await rig.supervision(acc)
    assert (sup_row["next_action"], sup_row["next_action_at"]) == (None, None)

    # Nothing happens on its own, ever: no retry from error, no new QR cycle.
    await run_until(sup, rig.clock, t0 + 7 * 86400)
    assert await rig.status(acc) is State.error
    assert len(await rig.logs(acc)) == 5


async def test_a_resent_qr_ready_is_a_duplicate_even_after_a_restart(rig: Rig) -> None:
    # A worker resends a batch whose answer it never got (a timeout, or the daemon killed
    # between commit and reply). For most events the repeat is illegal where the first one
    # led; a QR refresh is legal in waiting_qr, so only its code tells a repeat from a refresh.
    acc, other = await rig.insert([State.initializing, State.initializing])
    cfg = PolicyConfig(qr_max_refreshes=3)
    sup = rig.supervisor(cfg)
    await sup.load()
    await sup.start()
    first = [(acc, "qr_ready", {"qr_code": "QR0"}), (other, "qr_ready", {"qr_code": "QR0"})]
    assert await events(sup, rig.clock, first) == [ItemResult.APPLIED] * 2
    assert await events(sup, rig.clock, first[:1]) == [ItemResult.DUPLICATE]
    refresh = [(acc, "qr_ready", {"qr_code": "QR1"})]
    assert await events(sup, rig.clock, refresh) == [ItemResult.APPLIED]
    assert await events(sup, rig.clock, refresh) == [ItemResult.DUPLICATE]
    # The code shown before is not a repeat of the one shown now: it is applied (a worker
    # going back to an older code is its business) and counted as a refresh.
    assert await events(sup, rig.clock, first[:1]) == [ItemResult.APPLIED]
    assert sup.accounts[acc].qr_refreshes == 2
    await rig.stop(sup)

    again = rig.supervisor(cfg)
    await again.load()
    await again.start()
    assert await events(again, rig.clock, first) == [ItemResult.DUPLICATE] * 2
    assert await events(again, rig.clock, refresh) == [ItemResult.APPLIED]
    logs = await rig.logs(acc)
    assert [r["new_status"] for r in logs] == ["waiting_qr"] * 4
    # Consecutive refreshes are told apart in the log by their count, even within one second.
    assert [r["change_reason"].rsplit("; ", 1)[-1] for r in logs[1:]] == [
        "refresh 1/3",
        "refresh 2/3",
        "refresh 3/3",
    ]
    assert again.accounts[acc].qr_refreshes == 3
    assert len(await rig.logs(other)) == 1
    # Leaving waiting_qr forgets the code: the same code later is a new QR, not a repeat.
    assert await events(again, rig.clock, [(other, "qr_scanned", {})]) == [ItemResult.APPLIED]
    assert await events(again, rig.clock, [(other, "logged_out", {})]) == [ItemResult.APPLIED]
    assert other not in again.shown_qr


# ------------------------------------------------------------------------------ 6. flapping


async def test_online_to_error_when_flapping(rig: Rig) -> None:
    cfg = PolicyConfig(flap_count=5, flap_window=600, heartbeat_timeout=10**6, start_rate=1000)
    (acc,) = await rig.insert([State.online], heartbeat=rig.clock.now())
    sup = rig.supervisor(cfg)
    await sup.load()
    t0 = rig.clock.now()
    await sup.start()
    for k in range(1, 5):
        assert await events(sup, rig.clock, [(acc, "logged_out", {})]) == [ItemResult.APPLIED]
        account = sup.accounts[acc]
        assert (account.status, account.next_action) == (State.offline, RECOVER), k
        assert account.next_action_at is not None
        await run_until(sup, rig.clock, account.next_action_at)
        assert await rig.status(acc) is State.recovering
        assert await events(sup, rig.clock, [(acc, "recovered", {})]) == [ItemResult.APPLIED]
        assert await rig.status(acc) is State.online
    # The fifth drop within the window: flapping, and the account stops cycling.
    assert await events(sup, rig.clock, [(acc, "logged_out", {})]) == [ItemResult.APPLIED]
    assert rig.clock.now() - t0 < cfg.flap_window
    assert await rig.status(acc) is State.error
    logs = await rig.logs(acc)
    assert "fail: flapping, 5 offline transitions within 600s" in logs[-2]["change_reason"]
    assert (logs[-1]["old_status"], logs[-1]["new_status"]) == ("offline", "error")


# -------------------------------------------------------------- 7. recovery concurrency cap


async def test_offline_to_recovering_respects_max_in_flight_and_start_rate(rig: Rig) -> None:
    cfg = PolicyConfig(
        base=1,
        cap=1,
        max_in_flight=2,
        start_rate=1,
        max_attempts=100,
        flap_count=100,
        deadlines={
            "initializing": 60,
            "waiting_qr": 120,
            "waiting_confirm": 120,
            "verifying": 120,
            "recovering": 5,
        },
    )
    ids = await rig.insert([State.offline] * 8)
    sup = rig.supervisor(cfg)
    in_flight: list[int] = []
    sup.listeners.append(lambda _ev: in_flight.append(sup.counts[State.recovering]))
    await sup.load()  # each offline account gets its first recover within base = 1 s
    t0 = rig.clock.now()
    await sup.start()
    await run_until(sup, rig.clock, t0 + 40)

    assert max(in_flight) == cfg.max_in_flight  # the cap was reached and never exceeded
    starts = sorted(m.at for m in rig.moves if m.trigger is Trigger.recover)
    # Token bucket of one second's worth (1 token): starts at least 1/start_rate apart.
    assert all(b - a >= 1 / cfg.start_rate - 1e-3 for a, b in itertools.pairwise(starts))
    # Slots are freed when recoveries time out, so every account got its turn.
    assert {m.account_id for m in rig.moves if m.trigger is Trigger.recover} == set(ids)


# ------------------------------------------------------------------------ 9. start-up grace


async def test_online_with_old_heartbeat_not_offline_before_startup_grace(rig: Rig) -> None:
    t0 = rig.clock.now()
    stale, saved = await rig.insert([State.online] * 2, heartbeat=t0 - 100)
    sup = rig.supervisor(PolicyConfig(heartbeat_timeout=45), startup_grace=60)
    await sup.load()
    await sup.start()
    await run_until(sup, rig.clock, t0 + 30)
    assert not rig.moves  # the daemon was not listening: that silence is ours, not theirs
    beat(sup, [saved])
    await run_until(sup, rig.clock, t0 + 60 - 0.01)
    assert not rig.moves
    await run_until(sup, rig.clock, t0 + 60)
    assert [(m.account_id, m.trigger, m.at) for m in rig.moves] == [
        (stale, Trigger.heartbeat_lost, t0 + 60)
    ]
    await run_until(sup, rig.clock, t0 + 75 - 0.01)
    assert await rig.status(saved) is State.online
    await run_until(sup, rig.clock, t0 + 75)
    assert [(m.trigger, m.at) for m in rig.moves_of(saved)] == [(Trigger.heartbeat_lost, t0 + 75)]


# -------------------------------------------------------------------------- 10. mass offline


async def test_mass_offline_holds_the_tenants_recoveries_until_cooldown_ends(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = PolicyConfig(
        heartbeat_timeout=10**6,
        mass_offline_ratio=0.3,
        mass_offline_window=120,
        mass_offline_cooldown=300,
        start_rate=1000,
        flap_count=100,
    )
    now = rig.clock.now()
    hit = await rig.insert([State.online] * 10, tenant="hit", heartbeat=now)
    calm = await rig.insert([State.online] * 10, tenant="calm", heartbeat=now)
    sup = rig.supervisor(cfg)
    await sup.load()
    t0 = rig.clock.now()
    await sup.start()

    caplog.set_level(logging.WARNING, logger="accountd.daemon.supervisor")
    wave = [*hit[:3], calm[0]]  # 3 of 10 is 30 % of "hit"; 1 of 10 of "calm" is not a wave
    assert (
        await events(sup, rig.clock, [(a, "logged_out", {}) for a in wave])
        == [ItemResult.APPLIED] * 4
    )
    cooldown_end = sup.mass.cooldown_until("hit", t0)
    assert cooldown_end == t0 + 300
    assert sup.mass.cooldown_until("calm", t0) is None
    await run_until(sup, rig.clock, t0 + 30)
    assert await events(sup, rig.clock, [(hit[3], "logged_out", {})]) == [ItemResult.APPLIED]
    assert "held" in (await rig.logs(hit[3]))[-1]["change_reason"]

    await run_until(sup, rig.clock, cooldown_end + 10)
    first_recover = {
        a: min(m.at for m in rig.moves_of(a) if m.trigger is Trigger.recover)
        for a in [*hit[:4], calm[0]]
    }
    assert first_recover[calm[0]] <= t0 + cfg.base  # the calm tenant recovers as usual
    for a in hit[:4]:
        assert cooldown_end <= first_recover[a] <= cooldown_end + 5, a
    alerts = [r for r in caplog.records if "mass_offline" in r.getMessage()]
    assert len(alerts) == 1 and "hit" in alerts[0].getMessage()
    assert sup.counts[State.online] == 20 - 5
    for a in hit[4:]:
        assert await rig.status(a) is State.online
    await settle(sup, rig.clock)
