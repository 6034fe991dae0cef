"""The worker simulator's session table: what each simulated WeCom session does next, and when.

No I/O and no clock of its own: the caller passes ``now`` (monotonic seconds) in and takes the due
heartbeats and events out, so one scheduler task can drive 100,000 sessions from a single heap
and tests can drive it with any clock. Stale timers are never removed from the heap; each session
carries a generation number and a timer whose generation no longer matches is skipped when popped
(cheaper than searching the heap on every drop, close or reopen).
"""

from __future__ import annotations

import base64
import heapq
import random
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from enum import IntEnum, StrEnum
from typing import Any

RATE_FIELDS: tuple[str, ...] = (
    "p_qr_never_scanned",
    "p_session_drop",
    "p_logout",
    "p_resume_fail",
    "p_5xx",
    "p_fail",
)


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How the simulated worker behaves. Durations are seconds; ``p_*`` are probabilities."""

    ingest_url: str = "http://127.0.0.1:8470"
    token: str = ""
    seed: int | None = None
    #: Delay of each automatic step (open → qr_ready, scanned → confirmed, confirmed → verified,
    #: resume → recovered/relogin_required), drawn uniformly from [min, max].
    step_latency_min: float = 0.2
    step_latency_max: float = 1.0
    #: Delay before a human "scans" the QR code, drawn uniformly from [min, max].
    scan_latency_min: float = 1.0
    scan_latency_max: float = 5.0
    heartbeat_interval: float = 15.0
    #: A QR that nobody scans is refreshed (a new ``qr_ready``) this often, at most
    #: ``qr_max_refreshes`` times; then the session goes quiet ("qr_expired"). None: never refresh.
    qr_refresh_interval: float | None = 60.0
    qr_max_refreshes: int = 5
    #: Per QR login flow: nobody ever scans this flow's QR code.
    p_qr_never_scanned: float = 0.0
    #: Per heartbeat: the session silently stops beating instead.
    p_session_drop: float = 0.0
    #: Per heartbeat: the session reports ``logged_out`` instead.
    p_logout: float = 0.0
    #: Per resume: the session cannot resume; ``relogin_required`` then a new QR flow.
    p_resume_fail: float = 0.0
    #: Per session call (open/resume/close): answer 503 and do nothing.
    p_5xx: float = 0.0
    #: Per automatic step (open, verify, resume): report ``fail`` and stop.
    p_fail: float = 0.0
    #: The scheduler sends at most one batch per tick; items due within a tick share a POST.
    tick: float = 0.05
    max_batch: int = 10_000
    #: Events not yet accepted by the daemon (it is down or overloaded) kept for a retry.
    max_pending_events: int = 100_000

    def __post_init__(self) -> None:
        for name in RATE_FIELDS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")
        for lo, hi in (
            ("step_latency_min", "step_latency_max"),
            ("scan_latency_min", "scan_latency_max"),
        ):
            if not 0.0 <= getattr(self, lo) <= getattr(self, hi):
                raise ValueError(f"need 0 <= {lo} <= {hi}")
        if self.heartbeat_interval <= 0 or self.tick < 0:
            raise ValueError("heartbeat_interval must be > 0 and tick >= 0")
        if self.qr_refresh_interval is not None and self.qr_refresh_interval <= 0:
            raise ValueError("qr_refresh_interval must be > 0 (or None)")
        if self.qr_max_refreshes < 0 or not 1 <= self.max_batch <= 10_000:
            raise ValueError("qr_max_refreshes must be >= 0 and max_batch within [1, 10000]")
        if self.max_pending_events < 1:
            raise ValueError("max_pending_events must be positive")

    def with_rates(self, rates: dict[str, Any]) -> SimulatorConfig:
        """A copy with some ``p_*`` fields changed; unknown names and bad values raise."""
        unknown = set(rates) - set(RATE_FIELDS)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        for name, value in rates.items():
            if type(value) not in (int, float):
                raise ValueError(f"{name} must be a number")
        changes: dict[str, Any] = {k: float(v) for k, v in rates.items()}
        return replace(self, **changes)

    def rates(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in RATE_FIELDS}


class Phase(StrEnum):
    """Where a simulated session is (the simulator's view, not the daemon's state)."""

    OPENING = "opening"  # before the first qr_ready
    WAITING_SCAN = "waiting_scan"
    SCANNED = "scanned"
    CONFIRMED = "confirmed"
    ONLINE = "online"
    RESUMING = "resuming"
    QR_EXPIRED = "qr_expired"
    DROPPED = "dropped"
    LOGGED_OUT = "logged_out"
    FAILED = "failed"


class _Step(IntEnum):
    QR = 0
    QR_REFRESH = 1
    SCAN = 2
    CONFIRM = 3
    VERIFY = 4
    BEAT = 5
    RESUME = 6
    LOGOUT = 7


@dataclass(slots=True)
class _Session:
    phase: Phase
    gen: int = 0
    refreshes: int = 0
    will_scan: bool = True


@dataclass(frozen=True, slots=True)
class OutEvent:
    account_id: str
    event: str
    data: dict[str, Any]


@dataclass(slots=True)
class Due:
    """What one call of `SessionTable.advance` produced."""

    heartbeats: list[str] = field(default_factory=list)
    events: list[OutEvent] = field(default_factory=list)


def fake_qr_code(account_id: str, n: int) -> str:
    """A small, unique, obviously fake ``data:`` URL standing in for a QR code image."""
    payload = base64.b64encode(f"accountd-sim:{account_id}:{n}".encode()).decode("ascii")
    return f"data:image/png;base64,{payload}"


class SessionTable:
    """All simulated sessions and their timers (one heap)."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._sessions: dict[str, _Session] = {}
        # (due, seq, account_id, generation, step); seq keeps equal due times in FIFO order.
        self._heap: list[tuple[float, int, str, int, _Step]] = []
        self._seq = 0
        self._qr_serial = 0
        # The daemon's session calls per (call, account): "open" and "resume" as received.
        self.calls: Counter[tuple[str, str]] = Counter()
        # A call whose outcome has not been reported yet (open → qr_ready or fail; resume →
        # recovered, relogin_required or fail), per account. A second open/resume arriving while
        # one is in flight is recorded in `overlaps` as (account_id, new call, call in flight):
        # the daemon must never run two logins or recoveries of one account at once.
        self.in_flight: dict[str, str] = {}
        self.overlaps: list[tuple[str, str, str]] = []

    # -- commands from the daemon and the control endpoints ---------------------------------

    def open(self, account_id: str, now: float) -> None:
        """Open (or restart) a session: a fresh QR login flow."""
        self._call_started("open", account_id)
        s = self._sessions.get(account_id)
        if s is None:
            s = self._sessions[account_id] = _Session(Phase.OPENING)
        self._start_qr_flow(account_id, s, now)

    def resume(self, account_id: str, now: float) -> None:
        """Try to resume a session; an unknown one is created (the worker may have restarted)."""
        self._call_started("resume", account_id)
        s = self._sessions.get(account_id)
        if s is None:
            s = self._sessions[account_id] = _Session(Phase.RESUMING)
        s.gen += 1
        s.phase = Phase.RESUMING
        self._at(now + self._step(), account_id, s, _Step.RESUME)

    def close(self, account_id: str) -> bool:
        self.in_flight.pop(account_id, None)  # its outcome will never be reported
        return self._sessions.pop(account_id, None) is not None

    def _call_started(self, call: str, account_id: str) -> None:
        self.calls[call, account_id] += 1
        running = self.in_flight.get(account_id)
        if running is not None:
            self.overlaps.append((account_id, call, running))
        self.in_flight[account_id] = call

    def drop(self, account_id: str) -> bool:
        """Stop the session silently (no more heartbeats, no event)."""
        s = self._sessions.get(account_id)
        if s is None:
            return False
        s.gen += 1
        s.phase = Phase.DROPPED
        self.in_flight.pop(account_id, None)  # cancelled with the session's timers
        return True

    def logout(self, account_id: str, now: float) -> bool:
        """Report ``logged_out`` on the next tick and stop the session."""
        s = self._sessions.get(account_id)
        if s is None:
            return False
        s.gen += 1
        s.phase = Phase.LOGGED_OUT
        self.in_flight.pop(account_id, None)  # cancelled with the session's timers
        self._at(now, account_id, s, _Step.LOGOUT)
        return True

    def snapshot(self) -> dict[str, str]:
        return {aid: str(s.phase) for aid, s in self._sessions.items()}

    def phase(self, account_id: str) -> Phase | None:
        s = self._sessions.get(account_id)
        return None if s is None else s.phase

    def __len__(self) -> int:
        return len(self._sessions)

    # -- the scheduler's side -----------------------------------------------------------------

    def next_due(self) -> float | None:
        """When the earliest timer fires (it may be stale: `advance` then yields nothing)."""
        return self._heap[0][0] if self._heap else None

    def advance(self, now: float) -> Due:
        """Fire every timer due at or before `now`; return the heartbeats and events to send."""
        out = Due()
        heap = self._heap
        sessions = self._sessions
        while heap and heap[0][0] <= now:
            due, _, aid, gen, step = heapq.heappop(heap)
            s = sessions.get(aid)
            if s is None or s.gen != gen:
                continue  # closed, or superseded by a later command
            if step is _Step.BEAT:
                self._beat(aid, s, due, now, out)
            else:
                self._fire(aid, s, step, now, out)
        return out

    # -- internals ------------------------------------------------------------------------------

    def _at(self, when: float, aid: str, s: _Session, step: _Step) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, aid, s.gen, step))

    def _step(self) -> float:
        c = self.config
        return self._rng.uniform(c.step_latency_min, c.step_latency_max)

    def _start_qr_flow(self, aid: str, s: _Session, now: float) -> None:
        s.gen += 1
        s.phase = Phase.OPENING
        s.refreshes = 0
        s.will_scan = self._rng.random() >= self.config.p_qr_never_scanned
        self._at(now + self._step(), aid, s, _Step.QR)

    def _fail(self, aid: str, s: _Session, out: Due, reason: str) -> None:
        s.phase = Phase.FAILED
        out.events.append(OutEvent(aid, "fail", {"error": f"simulated failure: {reason}"}))

    def _qr_ready(self, aid: str, s: _Session, now: float, out: Due) -> None:
        c = self.config
        self._qr_serial += 1
        out.events.append(
            OutEvent(aid, "qr_ready", {"qr_code": fake_qr_code(aid, self._qr_serial)})
        )
        s.phase = Phase.WAITING_SCAN
        if s.will_scan:
            self._at(
                now + self._rng.uniform(c.scan_latency_min, c.scan_latency_max), aid, s, _Step.SCAN
            )
        elif c.qr_refresh_interval is not None:
            self._at(now + c.qr_refresh_interval, aid, s, _Step.QR_REFRESH)

    def _fire(self, aid: str, s: _Session, step: _Step, now: float, out: Due) -> None:
        c = self.config
        rng = self._rng
        if step in (_Step.QR, _Step.RESUME):
            self.in_flight.pop(aid, None)  # every branch below reports the call's outcome
        if step is _Step.QR:
            if rng.random() < c.p_fail:
                self._fail(aid, s, out, "could not open the WeCom client")
            else:
                self._qr_ready(aid, s, now, out)
        elif step is _Step.QR_REFRESH:
            if s.refreshes >= c.qr_max_refreshes:
                s.phase = Phase.QR_EXPIRED  # stop asking: the daemon decides what happens next
            else:
                s.refreshes += 1
                self._qr_ready(aid, s, now, out)
        elif step is _Step.SCAN:
            out.events.append(OutEvent(aid, "qr_scanned", {}))
            s.phase = Phase.SCANNED
            self._at(now + self._step(), aid, s, _Step.CONFIRM)
        elif step is _Step.CONFIRM:
            out.events.append(OutEvent(aid, "confirmed", {}))
            s.phase = Phase.CONFIRMED
            self._at(now + self._step(), aid, s, _Step.VERIFY)
        elif step is _Step.VERIFY:
            if rng.random() < c.p_fail:
                self._fail(aid, s, out, "verification rejected")
            else:
                out.events.append(OutEvent(aid, "verified", {}))
                self._go_online(aid, s, now)
        elif step is _Step.RESUME:
            if rng.random() < c.p_fail:
                self._fail(aid, s, out, "resume crashed")
            elif rng.random() < c.p_resume_fail:
                out.events.append(OutEvent(aid, "relogin_required", {"reason": "session expired"}))
                self._start_qr_flow(aid, s, now)
            else:
                out.events.append(OutEvent(aid, "recovered", {}))
                self._go_online(aid, s, now)
        elif step is _Step.LOGOUT:
            out.events.append(OutEvent(aid, "logged_out", {"reason": "logged out by operator"}))

    def _go_online(self, aid: str, s: _Session, now: float) -> None:
        s.phase = Phase.ONLINE
        self._at(now + self.config.heartbeat_interval, aid, s, _Step.BEAT)

    def _beat(self, aid: str, s: _Session, due: float, now: float, out: Due) -> None:
        c = self.config
        r = self._rng.random()
        if r < c.p_session_drop:
            s.phase = Phase.DROPPED
            return
        if r < c.p_session_drop + c.p_logout:
            out.events.append(OutEvent(aid, "logged_out", {"reason": "kicked by another login"}))
            s.phase = Phase.LOGGED_OUT
            return
        out.heartbeats.append(aid)
        # Keep the beat on its own grid (no drift), but never schedule into the past when the
        # scheduler fell behind: a burst of catch-up beats is no real worker's behaviour.
        nxt = due + c.heartbeat_interval
        self._at(nxt if nxt > now else now + c.heartbeat_interval, aid, s, _Step.BEAT)
