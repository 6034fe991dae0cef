"""Recovery policy: what the daemon does on its own after an account changes state.

Everything here is pure: the time comes in as ``now`` (epoch seconds), randomness from an injected
``random.Random``, and nothing is mutated but the detectors' own counters. A decision is a value
(`RecoveryDecision`) that the engine commits together with the transition and only then applies
to memory, so a restart resumes from the database exactly where it was.

The rules (BRIEF §3 "Defaults"):

* after ``offline``: ``recover`` after exponential backoff with full jitter, counting attempts;
  ``fail`` once ``max_attempts`` are used up, when the account is flapping (``flap_count``
  offline transitions in ``flap_window``), or when its QR budget is spent;
* after ``error``: ``recover`` after ``error_retry_after`` (0 = never);
* after ``online``: attempts reset once the account has been online ``reset_after`` seconds;
  the QR budget resets at once (the human did their part);
* QR codes: a refresh in ``waiting_qr`` (or a QR that timed out unscanned) counts; above
  ``qr_max_refreshes`` the account fails with an alert instead of looping on a QR nobody scans;
* recovery starts are capped (`RecoveryLimiter`), and a wave of drops within one worker or tenant
  pauses its recovery for a cool-down and raises one ``mass_offline`` alert
  (`MassOfflineDetector`).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from accountd.errors import ConfigError
from accountd.statemachine import DEADLINE_STATES, HUMAN_STATES, Account, State, Trigger

#: `RecoveryDecision.action` for "zero the attempt counter" (not a trigger: no state change).
RESET_ATTEMPTS = "reset_attempts"

#: Alert names a decision may carry (the engine raises them; the metrics count them).
ALERT_FLAPPING = "flapping"
ALERT_QR_NOT_SCANNED = "qr_not_scanned"
ALERT_RECOVERY_EXHAUSTED = "recovery_exhausted"
ALERT_MASS_OFFLINE = "mass_offline"

_TRIGGER_VALUES = frozenset(t.value for t in Trigger)

_DEFAULT_DEADLINES: Mapping[str, float] = MappingProxyType(
    {
        State.initializing.value: 60.0,
        State.waiting_qr.value: 120.0,
        State.waiting_confirm.value: 120.0,
        State.verifying.value: 120.0,
        State.recovering.value: 60.0,
    }
)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The numbers of the policy; fields mirror the config sections (durations in seconds)."""

    heartbeat_timeout: float = 45.0
    #: Per-state deadline, keyed by state value: exactly the states that have one.
    deadlines: Mapping[str, float] = field(default_factory=lambda: _DEFAULT_DEADLINES)
    qr_max_refreshes: int = 3
    base: float = 10.0
    cap: float = 300.0
    max_attempts: int = 8
    reset_after: float = 600.0
    error_retry_after: float = 1800.0
    max_in_flight: int = 50
    start_rate: float = 10.0
    flap_count: int = 5
    flap_window: float = 600.0
    mass_offline_ratio: float = 0.3
    mass_offline_window: float = 120.0
    mass_offline_cooldown: float = 300.0
    #: A "wave" needs at least this many drops, so that one account of a two-account tenant
    #: going offline is not a mass outage.
    mass_offline_min_drops: int = 3

    def __post_init__(self) -> None:
        positive = (
            *("heartbeat_timeout", "base", "cap", "reset_after", "start_rate"),
            *("flap_window", "mass_offline_window"),
        )
        for name in positive:
            _check(name, getattr(self, name) > 0, "must be > 0")
        for name in ("error_retry_after", "mass_offline_cooldown"):
            _check(name, getattr(self, name) >= 0, "must be >= 0")
        for name in ("max_attempts", "max_in_flight", "flap_count", "mass_offline_min_drops"):
            _check(name, getattr(self, name) >= 1, "must be >= 1")
        _check("qr_max_refreshes", self.qr_max_refreshes >= 0, "must be >= 0")
        _check("cap", self.cap >= self.base, "must be >= base")
        _check("mass_offline_ratio", 0 < self.mass_offline_ratio <= 1, "must be in (0, 1]")
        known = {s.value for s in DEADLINE_STATES}
        for key, value in self.deadlines.items():
            _check(
                f"deadlines.{key}", key in known, f"is not a state with a deadline {sorted(known)}"
            )
            _check(f"deadlines.{key}", value > 0, "must be > 0")
        missing = known - set(self.deadlines)
        _check(f"deadlines.{min(missing, default='')}", not missing, "is missing")
        # Frozen means frozen: keep our own read-only copy, not the caller's dict.
        object.__setattr__(self, "deadlines", MappingProxyType(dict(self.deadlines)))


def _check(name: str, ok: bool, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {problem}")


def deadline_for(state: State, entered_at: float, cfg: PolicyConfig) -> float | None:
    """When an account that entered ``state`` at ``entered_at`` times out (None: never)."""
    seconds = cfg.deadlines.get(state.value)
    return None if seconds is None else entered_at + seconds


def heartbeat_deadline(account: Account, cfg: PolicyConfig) -> float:
    """When an online account is declared ``heartbeat_lost`` if no newer heartbeat arrives.

    Heartbeats older than the online entry do not count: the clock starts when it went online.
    """
    last = account.entered_at
    if account.last_heartbeat is not None and account.last_heartbeat > last:
        last = account.last_heartbeat
    return last + cfg.heartbeat_timeout


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before recovery attempt ``attempt`` (1 for the first).

    Exponential backoff with *full jitter* (AWS Architecture Blog, "Exponential Backoff and
    Jitter"): uniform over ``[0, min(cap, base * 2**(attempt-1))]``. Spreading the whole interval,
    rather than adding a little noise to a fixed delay, is what keeps thousands of accounts that
    dropped together from coming back together.
    """
    if attempt < 1:
        raise ValueError(f"attempt starts at 1, got {attempt}")
    # Past 2**60 the bound is the cap anyway; clamping avoids an int too large for a float.
    bound = min(cap, base * 2.0 ** min(attempt - 1, 60))
    return rng.uniform(0.0, bound)


# -- flapping ---------------------------------------------------------------------------------


def is_flapping(
    history: tuple[float, ...], now: float, count: int = 5, window: float = 600.0
) -> bool:
    """Whether ``history`` holds at least ``count`` offline transitions in the last ``window`` s."""
    since = now - window
    return sum(1 for t in history if t > since) >= count


class FlapDetector:
    """Flap detection over `Account.offline_history`, so it survives restarts with the row."""

    def __init__(self, count: int = 5, window: float = 600.0) -> None:
        self.count = count
        self.window = window

    def trim(self, history: tuple[float, ...], now: float) -> tuple[float, ...]:
        """Drop entries outside the window; keep at most ``count`` (all a verdict needs)."""
        since = now - self.window
        kept = tuple(t for t in history if t > since)
        return kept[-self.count :]

    def record(self, history: tuple[float, ...], now: float) -> tuple[float, ...]:
        """The history with an offline transition at ``now`` added (trimmed)."""
        return self.trim((*history, now), now)

    def is_flapping(self, history: tuple[float, ...], now: float) -> bool:
        return is_flapping(history, now, self.count, self.window)


# -- mass offline -----------------------------------------------------------------------------


class _Group:
    __slots__ = ("cooldown_until", "drops", "members", "size")

    def __init__(self) -> None:
        self.size = 0
        self.drops: deque[tuple[float, object]] = deque()
        #: Drops per member inside the window: its length is the number of *distinct* accounts.
        self.members: dict[object, int] = {}
        self.cooldown_until = -math.inf


class MassOfflineDetector:
    """Notices when a large share of one group (a worker, a tenant) drops at once.

    Group keys are the caller's strings (say ``"worker:w1"``, ``"tenant:t9"``); an account is in
    one group per key kind. `record_drop` returns True exactly once per episode, when the drops
    in the last ``window`` seconds reach ``ratio`` of the group (and ``min_drops``); the group
    then stays in cool-down for ``cooldown`` seconds, during which drops are not counted, so the
    end of a cool-down needs a fresh wave to start a new episode. All operations are O(1)
    amortised: each drop time is appended once and expires once.

    With ``member`` (the account id) a wave counts distinct accounts: one account going offline
    three times in two minutes is flapping, not a mass outage of its whole tenant.
    """

    def __init__(
        self,
        *,
        ratio: float = 0.3,
        window: float = 120.0,
        cooldown: float = 300.0,
        min_drops: int = 3,
    ) -> None:
        self.ratio = ratio
        self.window = window
        self.cooldown = cooldown
        self.min_drops = min_drops
        self._groups: dict[str, _Group] = {}

    def add(self, group: str) -> None:
        """One more account belongs to ``group``."""
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group()
        g.size += 1

    def remove(self, group: str) -> None:
        """One account left ``group`` (deleted, or moved elsewhere)."""
        g = self._groups.get(group)
        if g is None or g.size == 0:
            raise KeyError(f"group {group!r} has no accounts to remove")
        g.size -= 1
        if g.size == 0 and not g.drops and g.cooldown_until == -math.inf:
            del self._groups[group]

    def move(self, old: str | None, new: str | None) -> None:
        """An account changed group (e.g. its session moved to another worker)."""
        if old == new:
            return
        if old is not None:
            self.remove(old)
        if new is not None:
            self.add(new)

    def size(self, group: str) -> int:
        g = self._groups.get(group)
        return 0 if g is None else g.size

    def record_drop(self, group: str, now: float, member: object = None) -> bool:
        """An account of ``group`` went offline at ``now``; True when this starts an episode.

        ``member`` identifies the account (repeated drops of one member count once per window);
        without it every drop counts.
        """
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group()
        if now < g.cooldown_until:
            return False
        if member is None:
            member = object()  # anonymous: a member of its own
        drops, members = g.drops, g.members
        drops.append((now, member))
        members[member] = members.get(member, 0) + 1
        since = now - self.window
        while drops and drops[0][0] <= since:
            _, gone = drops.popleft()
            left = members[gone] - 1
            if left:
                members[gone] = left
            else:
                del members[gone]
        if len(members) >= max(self.min_drops, self.ratio * g.size):
            g.cooldown_until = now + self.cooldown
            drops.clear()
            members.clear()
            return True
        return False

    def in_cooldown(self, group: str, now: float) -> bool:
        g = self._groups.get(group)
        return g is not None and now < g.cooldown_until

    def cooldown_until(self, group: str, now: float) -> float | None:
        """When the cool-down of ``group`` ends, or None when it is not in one."""
        g = self._groups.get(group)
        return g.cooldown_until if g is not None and now < g.cooldown_until else None


# -- recovery rate and concurrency --------------------------------------------------------------


# "One token", give or take rounding: epoch seconds near 1.7e9 carry only ~1e-7 s of precision,
# so the refill computed at `next_available(now)` may come out a hair short of 1.0.
_ONE_TOKEN = 1.0 - 1e-6


class RecoveryLimiter:
    """At most ``max_in_flight`` recoveries at once, started at most ``start_rate`` per second.

    The rate is a token bucket holding up to ``burst`` tokens (default: one second's worth), so a
    backlog drains at the steady rate after an initial burst. A recovery is in flight from
    `try_acquire` until the engine calls `release` (the account left ``recovering``).
    """

    def __init__(
        self, *, max_in_flight: int = 50, start_rate: float = 10.0, burst: float | None = None
    ) -> None:
        if max_in_flight < 1 or start_rate <= 0:
            raise ValueError("max_in_flight must be >= 1 and start_rate > 0")
        self.max_in_flight = max_in_flight
        self.start_rate = start_rate
        self.burst = max(1.0, start_rate if burst is None else burst)
        self._tokens = self.burst
        self._last: float | None = None
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _tokens_at(self, now: float) -> float:
        if self._last is None:
            return self._tokens
        # max(0, …): a wall-clock step backwards must not drain the bucket.
        return min(self.burst, self._tokens + max(0.0, now - self._last) * self.start_rate)

    def try_acquire(self, now: float) -> bool:
        """Take a slot and a token if both are available."""
        if self._in_flight >= self.max_in_flight:
            return False
        tokens = self._tokens_at(now)
        self._tokens, self._last = tokens, now
        if tokens < _ONE_TOKEN:
            return False
        self._tokens = max(0.0, tokens - 1.0)
        self._in_flight += 1
        return True

    def try_take_token(self, now: float) -> bool:
        """Take a start token only, for a caller that counts in-flight recoveries itself (the
        engine derives them from how many accounts are in ``recovering``, which survives
        restarts and status changes made behind its back)."""
        tokens = self._tokens_at(now)
        self._tokens, self._last = tokens, now
        if tokens < 1.0:
            return False
        self._tokens = tokens - 1.0
        return True

    def release(self) -> None:
        if self._in_flight == 0:
            raise RuntimeError("release() without a matching try_acquire()")
        self._in_flight -= 1

    def next_available(self, now: float) -> float:
        """The earliest time `try_acquire` could succeed; ``inf`` while every slot is taken
        (a slot frees only on `release`, which has no time)."""
        if self._in_flight >= self.max_in_flight:
            return math.inf
        tokens = self._tokens_at(now)
        return now if tokens >= _ONE_TOKEN else now + (1.0 - tokens) / self.start_rate


# -- decisions --------------------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: see accountd.adapters.repository.TransitionRequest
class RecoveryDecision:
    """What to do next for one account, and the counters to persist with it.

    ``action`` is a trigger value to fire at ``at`` (``"recover"``, ``"fail"``, ``"qr_ready"``),
    `RESET_ATTEMPTS`, or None (nothing scheduled). ``reason`` is for operators: it goes into
    ``change_reason`` and logs. ``alert`` names an alert to raise once, if any.
    """

    action: str | None
    at: float | None
    reason: str
    attempts: int
    qr_refreshes: int
    offline_history: tuple[float, ...]
    alert: str | None = None

    @property
    def trigger(self) -> Trigger | None:
        """``action`` as a `Trigger`, when it is one."""
        return Trigger(self.action) if self.action in _TRIGGER_VALUES else None


class RecoveryPolicy:
    """Turns "this account just entered state X" into a `RecoveryDecision`.

    Call with the account as it is *after* the transition (``status`` and ``entered_at`` of the
    new state) and, for ``online``, with ``online_since`` still holding the start of the last
    online stretch until the next one begins.
    """

    def __init__(self, cfg: PolicyConfig, *, rng: random.Random) -> None:
        self.cfg = cfg
        self.rng = rng
        self.flaps = FlapDetector(cfg.flap_count, cfg.flap_window)

    def _decide(
        self,
        account: Account,
        action: str | None,
        at: float | None,
        reason: str,
        *,
        attempts: int | None = None,
        qr_refreshes: int | None = None,
        offline_history: tuple[float, ...] | None = None,
        alert: str | None = None,
    ) -> RecoveryDecision:
        return RecoveryDecision(
            action=action,
            at=at,
            reason=reason,
            attempts=account.attempts if attempts is None else attempts,
            qr_refreshes=account.qr_refreshes if qr_refreshes is None else qr_refreshes,
            offline_history=(
                account.offline_history if offline_history is None else offline_history
            ),
            alert=alert,
        )

    def after_offline(
        self,
        account: Account,
        now: float,
        *,
        cause: Trigger,
        from_state: State,
        hold_until: float | None = None,
    ) -> RecoveryDecision:
        """The account just went ``offline`` from ``from_state`` because of ``cause``.

        ``hold_until`` is the end of a mass-offline cool-down covering the account, if any: the
        recovery is scheduled no earlier than that.
        """
        cfg = self.cfg
        # Flapping is a session that keeps coming up and going down: only drops *from online*
        # count. A recovery that times out is the attempt counter's business (max_attempts).
        if from_state is State.online:
            history = self.flaps.record(account.offline_history, now)
        else:
            history = self.flaps.trim(account.offline_history, now)
        qr = account.qr_refreshes
        if cause is Trigger.timeout and from_state in HUMAN_STATES:
            # Nobody scanned (or confirmed) in time: that QR is as spent as a refreshed one.
            qr += 1
        attempts = account.attempts
        if (
            from_state is State.online
            and account.online_since is not None
            and now - account.online_since >= cfg.reset_after
        ):
            attempts = 0  # it was stable: this is a fresh outage, not the next attempt

        def decide(
            action: str | None, at: float | None, reason: str, alert: str | None = None
        ) -> RecoveryDecision:
            return RecoveryDecision(action, at, reason, attempts, qr, history, alert)

        if account.paused:
            return decide(None, None, "paused: no automatic recovery")
        if self.flaps.is_flapping(history, now):
            reason = (
                f"fail: flapping, {len(history)} offline transitions "
                f"within {cfg.flap_window:g}s ({cause})"
            )
            return decide(Trigger.fail, now, reason, ALERT_FLAPPING)
        if qr > account.qr_refreshes and qr > cfg.qr_max_refreshes:
            reason = f"fail: qr not scanned after {cfg.qr_max_refreshes} refreshes"
            return decide(Trigger.fail, now, reason, ALERT_QR_NOT_SCANNED)
        attempt = attempts + 1
        if attempt > cfg.max_attempts:
            reason = f"fail: gave up after {cfg.max_attempts} recovery attempts ({cause})"
            return decide(Trigger.fail, now, reason, ALERT_RECOVERY_EXHAUSTED)
        delay = backoff_delay(attempt, base=cfg.base, cap=cfg.cap, rng=self.rng)
        at = now + delay
        reason = (
            f"recover: attempt {attempt}/{cfg.max_attempts} after backoff {delay:.1f}s ({cause})"
        )
        if hold_until is not None and hold_until > at:
            reason += f", held {hold_until - now:.1f}s by mass_offline cool-down"
            at = hold_until
        return RecoveryDecision(Trigger.recover, at, reason, attempt, qr, history)

    def after_error(self, account: Account, now: float) -> RecoveryDecision:
        """The account just entered ``error``: retry after ``error_retry_after`` unless 0.

        The counters are kept: a retry from ``error`` is one more attempt, so an account that
        exhausted its attempts gets one try per ``error_retry_after``, never a fast loop.
        """
        wait = self.cfg.error_retry_after
        if account.paused:
            return self._decide(account, None, None, "paused: no automatic retry from error")
        if wait == 0:
            return self._decide(account, None, None, "error: automatic retry disabled")
        return self._decide(
            account, Trigger.recover, now + wait, f"recover: retry from error after {wait:g}s"
        )

    def after_online(self, account: Account, now: float) -> RecoveryDecision:
        """The account just came ``online``: the QR budget resets now, attempts once stable."""
        if account.attempts == 0:
            return self._decide(account, None, None, "online", qr_refreshes=0)
        wait = self.cfg.reset_after
        reason = f"reset attempts after {wait:g}s stable online"
        return self._decide(account, RESET_ATTEMPTS, now + wait, reason, qr_refreshes=0)

    def on_reset_due(self, account: Account, now: float) -> RecoveryDecision:
        """The `RESET_ATTEMPTS` deadline fired: zero the attempts if still stably online."""
        since = account.online_since
        if (
            account.status is State.online
            and since is not None
            and now - since >= self.cfg.reset_after
        ):
            return self._decide(
                account, None, None, f"attempts reset after {now - since:.0f}s online", attempts=0
            )
        return self._decide(account, None, None, "attempts kept: not stably online")

    def on_qr_ready(self, account: Account, now: float) -> RecoveryDecision:
        """A worker reported a (new) QR code: apply it, or ``fail`` when the budget is spent.

        The first QR of a login (from initializing or recovering) is free; a refresh while
        already in ``waiting_qr`` counts against ``qr_max_refreshes``.
        """
        qr = account.qr_refreshes
        if account.status is State.waiting_qr:
            qr += 1
        # Only a refresh can exhaust the budget: the first QR of a retry from `error` (whose
        # budget is already spent) is still shown once; its refresh or timeout then fails.
        if account.status is State.waiting_qr and qr > self.cfg.qr_max_refreshes:
            reason = f"fail: qr not scanned after {self.cfg.qr_max_refreshes} refreshes"
            return self._decide(
                account, Trigger.fail, now, reason, qr_refreshes=qr, alert=ALERT_QR_NOT_SCANNED
            )
        reason = "qr_ready"
        if account.status is State.waiting_qr:
            reason = f"qr_ready: refresh {qr}/{self.cfg.qr_max_refreshes}"
        return self._decide(account, Trigger.qr_ready, now, reason, qr_refreshes=qr)


__all__ = [
    "ALERT_FLAPPING",
    "ALERT_MASS_OFFLINE",
    "ALERT_QR_NOT_SCANNED",
    "ALERT_RECOVERY_EXHAUSTED",
    "RESET_ATTEMPTS",
    "FlapDetector",
    "MassOfflineDetector",
    "PolicyConfig",
    "RecoveryDecision",
    "RecoveryLimiter",
    "RecoveryPolicy",
    "backoff_delay",
    "deadline_for",
    "heartbeat_deadline",
    "is_flapping",
]
