"""The recovery policy: backoff, giving up, error retry, QR budget, flapping, mass offline, limits.

Time is a FakeClock's (or plain floats from one); randomness a seeded ``random.Random``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import replace

import pytest

from accountd.daemon.clock import FakeClock
from accountd.daemon.policy import (
    ALERT_FLAPPING,
    ALERT_QR_NOT_SCANNED,
    ALERT_RECOVERY_EXHAUSTED,
    RESET_ATTEMPTS,
    FlapDetector,
    MassOfflineDetector,
    PolicyConfig,
    RecoveryLimiter,
    RecoveryPolicy,
    backoff_delay,
    deadline_for,
    heartbeat_deadline,
    is_flapping,
)
from accountd.errors import ConfigError
from accountd.statemachine import Account, State, Trigger, next_state

S, T = State, Trigger
T0 = 1_700_000_000.0


def _account(status: State = S.offline, **kw: object) -> Account:
    return Account(id="acc-1", tenant_id="t1", wework_guid="g1", status=status, entered_at=T0, **kw)  # type: ignore[arg-type]


@pytest.fixture
def policy() -> RecoveryPolicy:
    return RecoveryPolicy(PolicyConfig(), rng=random.Random(7))


# -- backoff ----------------------------------------------------------------------------------


def test_backoff_bound_doubles_from_base_and_is_capped() -> None:
    rng = random.Random(1)
    for attempt, bound in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 160), (6, 300), (9, 300)]:
        samples = [backoff_delay(attempt, base=10, cap=300, rng=rng) for _ in range(2000)]
        assert all(0.0 <= d <= bound for d in samples), attempt
        # Full jitter: the whole interval is used, not a narrow band near the bound.
        assert max(samples) > 0.95 * bound and min(samples) < 0.05 * bound
        assert 0.45 * bound < sum(samples) / len(samples) < 0.55 * bound


def test_backoff_is_deterministic_for_a_seeded_rng() -> None:
    a = [backoff_delay(n, base=10, cap=300, rng=random.Random(42)) for n in range(1, 9)]
    b = [backoff_delay(n, base=10, cap=300, rng=random.Random(42)) for n in range(1, 9)]
    assert a == b


def test_backoff_survives_absurd_attempt_numbers() -> None:
    assert 0 <= backoff_delay(10**6, base=10, cap=300, rng=random.Random(0)) <= 300


def test_backoff_attempt_starts_at_one() -> None:
    with pytest.raises(ValueError, match="starts at 1"):
        backoff_delay(0, base=10, cap=300, rng=random.Random(0))


# -- offline -> recover / fail ------------------------------------------------------------------


def test_offline_schedules_recover_after_backoff_with_readable_reason(
    policy: RecoveryPolicy,
) -> None:
    acc = _account(attempts=2)
    d = policy.after_offline(acc, T0, cause=T.heartbeat_lost, from_state=S.online)
    assert d.trigger is T.recover and d.action == "recover"
    assert d.attempts == 3
    assert d.at is not None and T0 <= d.at <= T0 + 40
    m = re.fullmatch(r"recover: attempt 3/8 after backoff (\d+\.\d)s \(heartbeat_lost\)", d.reason)
    assert m is not None, d.reason
    assert float(m.group(1)) == pytest.approx(d.at - T0, abs=0.05)
    assert d.offline_history == (T0,)
    assert d.alert is None


def test_offline_gives_up_with_fail_after_max_attempts(policy: RecoveryPolicy) -> None:
    acc = _account(attempts=8)
    d = policy.after_offline(acc, T0, cause=T.timeout, from_state=S.recovering)
    assert d.trigger is T.fail and d.at == T0
    assert d.reason == "fail: gave up after 8 recovery attempts (timeout)"
    assert d.alert == ALERT_RECOVERY_EXHAUSTED
    assert next_state(S.offline, d.trigger) is S.error


def test_attempts_reset_when_the_outage_follows_a_stable_online_stretch(
    policy: RecoveryPolicy,
) -> None:
    acc = _account(attempts=7, online_since=T0 - 600)
    d = policy.after_offline(acc, T0, cause=T.heartbeat_lost, from_state=S.online)
    assert d.attempts == 1 and d.trigger is T.recover
    assert d.at is not None and d.at <= T0 + 10  # back to the first, shortest backoff


def test_attempts_not_reset_after_a_short_online_stretch(policy: RecoveryPolicy) -> None:
    acc = _account(attempts=7, online_since=T0 - 599)
    d = policy.after_offline(acc, T0, cause=T.heartbeat_lost, from_state=S.online)
    assert d.attempts == 8 and d.trigger is T.recover


def test_online_schedules_attempt_reset_after_reset_after(policy: RecoveryPolicy) -> None:
    acc = _account(S.online, attempts=3, qr_refreshes=2, online_since=T0)
    d = policy.after_online(acc, T0)
    assert (d.action, d.at, d.trigger) == (RESET_ATTEMPTS, T0 + 600, None)
    assert d.qr_refreshes == 0 and d.attempts == 3
    # The reset fires: still online for 600 s -> attempts 0.
    done = policy.on_reset_due(acc, T0 + 600)
    assert done.attempts == 0 and done.action is None
    # ...but not if the account is no longer online.
    acc.status = S.offline
    assert policy.on_reset_due(acc, T0 + 600).attempts == 3


def test_online_without_attempts_schedules_nothing(policy: RecoveryPolicy) -> None:
    d = policy.after_online(_account(S.online, qr_refreshes=1), T0)
    assert d.action is None and d.at is None and d.qr_refreshes == 0


def test_full_backoff_sequence_grows_then_gives_up() -> None:
    # Walk an account through 8 failed recoveries: bounds double to the cap, then fail.
    policy = RecoveryPolicy(PolicyConfig(), rng=random.Random(3))
    acc = _account()
    now = T0
    bounds = []
    while True:
        d = policy.after_offline(acc, now, cause=T.timeout, from_state=S.recovering)
        if d.trigger is T.fail:
            break
        assert d.at is not None
        bounds.append(min(300, 10 * 2 ** (d.attempts - 1)))
        assert d.at - now <= bounds[-1]
        # The recovery runs for its 60 s deadline and times out again. Keep clear of flapping.
        now = d.at + 60 + 600
        acc.attempts, acc.offline_history = d.attempts, d.offline_history
    assert bounds == [10, 20, 40, 80, 160, 300, 300, 300]
    assert acc.attempts == 8


def test_mass_offline_hold_delays_recovery_until_the_cool_down_ends(
    policy: RecoveryPolicy,
) -> None:
    d = policy.after_offline(
        _account(), T0, cause=T.heartbeat_lost, from_state=S.online, hold_until=T0 + 300
    )
    assert d.trigger is T.recover and d.at == T0 + 300
    assert d.reason.endswith("held 300.0s by mass_offline cool-down")


def test_paused_account_is_not_recovered(policy: RecoveryPolicy) -> None:
    d = policy.after_offline(_account(paused=True), T0, cause=T.heartbeat_lost, from_state=S.online)
    assert d.action is None and d.at is None
    assert d.offline_history == (T0,)  # still recorded: pausing does not forget history
    assert policy.after_error(_account(S.error, paused=True), T0).action is None


# -- error ------------------------------------------------------------------------------------


def test_error_retries_with_recover_after_error_retry_after(policy: RecoveryPolicy) -> None:
    d = policy.after_error(_account(S.error, attempts=8), T0)
    assert d.trigger is T.recover and d.at == T0 + 1800
    assert d.reason == "recover: retry from error after 1800s"
    assert d.attempts == 8  # one try per error_retry_after, not a fresh burst of eight
    assert next_state(S.error, T.recover) is S.recovering


def test_error_retry_after_zero_never_retries() -> None:
    policy = RecoveryPolicy(PolicyConfig(error_retry_after=0), rng=random.Random(0))
    d = policy.after_error(_account(S.error), T0)
    assert d.action is None and d.at is None
    assert "disabled" in d.reason


# -- QR budget ----------------------------------------------------------------------------------


def test_qr_refreshes_count_and_the_fourth_refresh_fails(policy: RecoveryPolicy) -> None:
    acc = _account(S.initializing)
    first = policy.on_qr_ready(acc, T0)
    assert first.trigger is T.qr_ready and first.qr_refreshes == 0  # the first QR is free
    acc.status = next_state(acc.status, T.qr_ready)
    for n in (1, 2, 3):
        d = policy.on_qr_ready(acc, T0 + 120 * n)
        assert d.trigger is T.qr_ready and d.qr_refreshes == n
        assert d.reason == f"qr_ready: refresh {n}/3"
        acc.qr_refreshes = d.qr_refreshes
        acc.status = next_state(acc.status, T.qr_ready)
    d = policy.on_qr_ready(acc, T0 + 480)
    assert d.trigger is T.fail and d.alert == ALERT_QR_NOT_SCANNED
    assert d.reason == "fail: qr not scanned after 3 refreshes"
    assert next_state(acc.status, d.trigger) is S.error


def test_unscanned_qr_timeouts_spend_the_qr_budget_and_end_in_fail(
    policy: RecoveryPolicy,
) -> None:
    # The worker never refreshes; each QR just times out. The loop must still end.
    acc = _account(S.offline)
    now = T0
    outcomes = []
    for _ in range(10):
        d = policy.after_offline(acc, now, cause=T.timeout, from_state=S.waiting_qr)
        outcomes.append(d.trigger)
        acc.qr_refreshes, acc.attempts = d.qr_refreshes, d.attempts
        if d.trigger is T.fail:
            assert d.reason == "fail: qr not scanned after 3 refreshes"
            break
        now += 1000  # recover, relogin, new QR, 120 s, timeout: far apart, so no flapping
    assert outcomes == [T.recover, T.recover, T.recover, T.fail]


def test_heartbeat_loss_does_not_spend_the_qr_budget(policy: RecoveryPolicy) -> None:
    d = policy.after_offline(_account(qr_refreshes=3), T0, cause=T.logged_out, from_state=S.online)
    assert d.trigger is T.recover and d.qr_refreshes == 3


def test_first_qr_after_error_retry_is_shown_once(policy: RecoveryPolicy) -> None:
    # Budget already spent: the retry from error still shows one QR; refreshing it fails.
    acc = _account(S.initializing, qr_refreshes=4)
    assert policy.on_qr_ready(acc, T0).trigger is T.qr_ready
    acc.status = S.waiting_qr
    assert policy.on_qr_ready(acc, T0 + 120).trigger is T.fail


# -- flapping -----------------------------------------------------------------------------------


def test_five_offline_transitions_in_ten_minutes_is_flapping() -> None:
    history = (T0, T0 + 100, T0 + 200, T0 + 300, T0 + 590)
    assert is_flapping(history, T0 + 599)
    assert not is_flapping(history[1:], T0 + 599)  # four is not
    assert not is_flapping(history, T0 + 600)  # the oldest has left the window


def test_flap_detector_record_trims_old_entries() -> None:
    flaps = FlapDetector(count=5, window=600)
    history: tuple[float, ...] = ()
    for i in range(20):
        history = flaps.record(history, T0 + 200 * i)
    # 200 s apart: at most 3 in any 600 s window, never flapping, never growing.
    assert history == (T0 + 3400, T0 + 3600, T0 + 3800)
    assert not flaps.is_flapping(history, T0 + 3800)
    fast: tuple[float, ...] = ()
    for i in range(50):
        fast = flaps.record(fast, T0 + i)
    assert len(fast) == 5 and flaps.is_flapping(fast, T0 + 49)


def test_offline_while_flapping_fails_with_alert(policy: RecoveryPolicy) -> None:
    acc = _account(offline_history=(T0 - 400, T0 - 300, T0 - 200, T0 - 100))
    d = policy.after_offline(acc, T0, cause=T.heartbeat_lost, from_state=S.online)
    assert d.trigger is T.fail and d.alert == ALERT_FLAPPING
    assert d.reason == "fail: flapping, 5 offline transitions within 600s (heartbeat_lost)"
    # Four within the window (the fifth is old) is not flapping.
    acc.offline_history = (T0 - 700, T0 - 300, T0 - 200, T0 - 100)
    d = policy.after_offline(acc, T0, cause=T.heartbeat_lost, from_state=S.online)
    assert d.trigger is T.recover and d.offline_history == (T0 - 300, T0 - 200, T0 - 100, T0)


# -- mass offline -------------------------------------------------------------------------------


def _mass(n: int, group: str = "worker:w1") -> MassOfflineDetector:
    det = MassOfflineDetector(ratio=0.3, window=120, cooldown=300, min_drops=3)
    for _ in range(n):
        det.add(group)
    return det


def test_mass_offline_raises_once_at_thirty_percent_within_two_minutes() -> None:
    det = _mass(100)
    results = [det.record_drop("worker:w1", T0 + i) for i in range(60)]
    assert results.index(True) == 29  # the 30th drop reaches 30 % of 100
    assert results.count(True) == 1  # one episode, one alert
    assert det.in_cooldown("worker:w1", T0 + 30)
    assert det.cooldown_until("worker:w1", T0 + 30) == T0 + 29 + 300


def test_mass_offline_cool_down_ends_and_needs_a_fresh_wave() -> None:
    det = _mass(100)
    for i in range(30):
        det.record_drop("worker:w1", T0 + i)
    end = T0 + 29 + 300
    assert det.in_cooldown("worker:w1", end - 0.001)
    assert not det.in_cooldown("worker:w1", end)
    assert det.cooldown_until("worker:w1", end) is None
    # After the cool-down a few stragglers are no new episode; a new wave is.
    assert not any(det.record_drop("worker:w1", end + i) for i in range(29))
    assert det.record_drop("worker:w1", end + 29)


def test_drops_spread_beyond_the_window_are_not_mass_offline() -> None:
    det = _mass(100)
    # 60 drops, one every 5 s: at most 24 in any 120 s window.
    assert not any(det.record_drop("worker:w1", T0 + 5 * i) for i in range(60))


def test_mass_offline_groups_are_independent_and_track_moves() -> None:
    det = _mass(10, "worker:w1")
    for _ in range(10):
        det.add("tenant:t1")
    det.move("worker:w1", "worker:w2")
    assert (det.size("worker:w1"), det.size("worker:w2")) == (9, 1)
    det.move("worker:w2", None)
    det.remove("worker:w1")
    assert (det.size("worker:w1"), det.size("worker:w2")) == (8, 0)
    with pytest.raises(KeyError):
        det.remove("worker:w2")
    # 3 of 8 is >= 30 %: an episode for the worker, none yet for the tenant of 10.
    assert [det.record_drop("worker:w1", T0 + i) for i in range(3)] == [False, False, True]
    assert [det.record_drop("tenant:t1", T0 + i) for i in range(3)] == [False, False, True]
    assert not det.in_cooldown("tenant:t2", T0)


def test_a_tiny_group_losing_one_account_is_not_mass_offline() -> None:
    det = _mass(2)
    assert not det.record_drop("worker:w1", T0)
    assert not det.record_drop("worker:w1", T0 + 1)


def test_one_account_dropping_repeatedly_is_not_mass_offline() -> None:
    det = _mass(10)
    # One account flapping three times in two minutes: its own problem, not its tenant's.
    assert not any(det.record_drop("tenant:t1", T0 + i, "acc-1") for i in range(10))
    # Three distinct accounts (30 % of 10) within the window are a wave.
    assert not det.record_drop("tenant:t1", T0 + 20, "acc-2")
    assert det.record_drop("tenant:t1", T0 + 21, "acc-3")
    # A member whose drops left the window no longer counts.
    det2 = _mass(10)
    det2.record_drop("tenant:t1", T0, "acc-1")
    det2.record_drop("tenant:t1", T0 + 60, "acc-2")
    assert not det2.record_drop("tenant:t1", T0 + 121, "acc-3")  # acc-1's drop has expired
    assert det2.record_drop("tenant:t1", T0 + 122, "acc-1")


# -- recovery limiter ---------------------------------------------------------------------------


def test_limiter_caps_recoveries_in_flight() -> None:
    lim = RecoveryLimiter(max_in_flight=3, start_rate=100)
    assert [lim.try_acquire(T0) for _ in range(5)] == [True, True, True, False, False]
    assert lim.in_flight == 3 and lim.next_available(T0) == math.inf
    lim.release()
    assert lim.next_available(T0 + 1) == T0 + 1
    assert lim.try_acquire(T0 + 1) and not lim.try_acquire(T0 + 1)


def test_limiter_limits_start_rate_with_a_one_second_burst() -> None:
    clock = FakeClock(T0)
    lim = RecoveryLimiter(max_in_flight=1000, start_rate=10)
    started = 0
    # Ten seconds of trying every 10 ms: 10 (burst) + 10/s x 10 s = 110 starts, not 1000.
    for _ in range(1000):
        if lim.try_acquire(clock.now()):
            started += 1
        clock.set(clock.now() + 0.01)
    assert 105 <= started <= 110


def test_limiter_next_available_says_when_a_token_arrives() -> None:
    lim = RecoveryLimiter(max_in_flight=50, start_rate=10)
    for _ in range(10):
        assert lim.try_acquire(T0)
    assert not lim.try_acquire(T0)
    nxt = lim.next_available(T0)
    assert nxt == pytest.approx(T0 + 0.1)
    assert not lim.try_acquire(nxt - 0.01)
    assert lim.try_acquire(nxt)  # exactly when promised, rounding notwithstanding


def test_limiter_release_without_acquire_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        RecoveryLimiter().release()


def test_limiter_survives_the_wall_clock_stepping_back() -> None:
    lim = RecoveryLimiter(max_in_flight=50, start_rate=1, burst=1)
    assert lim.try_acquire(T0)
    assert not lim.try_acquire(T0 - 3600)  # no refill, and no negative debt either
    assert lim.try_acquire(T0 - 3600 + 1)


# -- deadlines and config ----------------------------------------------------------------------


def test_deadline_for_each_state() -> None:
    cfg = PolicyConfig()
    expected = {
        S.initializing: 60,
        S.waiting_qr: 120,
        S.waiting_confirm: 120,
        S.verifying: 120,
        S.recovering: 60,
    }
    for state in State:
        got = deadline_for(state, T0, cfg)
        assert got == (T0 + expected[state] if state in expected else None), state


def test_heartbeat_deadline_counts_from_the_later_of_entry_and_last_heartbeat() -> None:
    cfg = PolicyConfig()
    acc = _account(S.online)
    assert heartbeat_deadline(acc, cfg) == T0 + 45
    acc.last_heartbeat = T0 - 100  # a beat from before it went online does not count
    assert heartbeat_deadline(acc, cfg) == T0 + 45
    acc.last_heartbeat = T0 + 30
    assert heartbeat_deadline(acc, cfg) == T0 + 75


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"base": 0}, "base"),
        ({"cap": 5}, "cap"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"mass_offline_ratio": 1.5}, "mass_offline_ratio"),
        ({"error_retry_after": -1}, "error_retry_after"),
        ({"deadlines": {**PolicyConfig().deadlines, "online": 5}}, "deadlines.online"),
        ({"deadlines": {**PolicyConfig().deadlines, "verifying": 0}}, "deadlines.verifying"),
        (
            {"deadlines": {k: v for k, v in PolicyConfig().deadlines.items() if k != "recovering"}},
            "deadlines.recovering",
        ),
    ],
)
def test_bad_policy_numbers_are_config_errors_naming_the_key(
    changes: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: "):
        replace(PolicyConfig(), **changes)  # type: ignore[arg-type]


def test_policy_config_deadlines_are_read_only_copies() -> None:
    source = dict(PolicyConfig().deadlines)
    cfg = PolicyConfig(deadlines=source)
    source["verifying"] = 1
    assert cfg.deadlines["verifying"] == 120
    with pytest.raises(TypeError):
        cfg.deadlines["verifying"] = 1  # type: ignore[index]
