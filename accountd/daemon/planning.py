"""What a transition writes besides the status, and what the daemon does next on its own.

`TransitionPlanner` is the policy half of the one door: for a legal change it decides the row's
other columns (`login_qr_code`, `error_message`), the `change_reason`, the supervision row (time
entered, attempts, QR refreshes, flap history, next action) and the worker call the new state
needs. It reads the account and the policy (`RecoveryPolicy`, the mass-offline detector) and
writes nothing: the door commits what it returns, and `Supervisor.after_commit` applies it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from accountd.adapters.repository import TransitionRequest, to_db_time
from accountd.daemon.door import Change, Planned, Redirect, Repeat
from accountd.daemon.policy import (
    MassOfflineDetector,
    PolicyConfig,
    RecoveryDecision,
    RecoveryPolicy,
    backoff_delay,
)
from accountd.statemachine import State, Trigger
from accountd.statemachine.account import Account

# Kinds of deadline in the queue; persisted as accountd_supervision.next_action.
TIMEOUT = "timeout"  # the state's deadline → `timeout`
HEARTBEAT = "heartbeat"  # online: no heartbeat within heartbeat.timeout → `heartbeat_lost`
RECOVER = "recover"  # offline: backoff elapsed → `recover`
RETRY_ERROR = "retry_error"  # error: error_retry_after elapsed → `recover` with a fresh budget
FAIL = "fail"  # the recovery policy gave up → `fail`
START = "start"  # created: ask the worker to open a session → `start`


@dataclass(slots=True)  # not frozen: see accountd.adapters.repository.TransitionRequest
class Action:
    kind: str
    at: float
    note: str = ""


@dataclass(slots=True)  # not frozen: see accountd.adapters.repository.TransitionRequest
class Effects:
    """What `plan` decided and `after_commit` applies once the transaction has committed."""

    attempts: int
    qr_refreshes: int
    online_since: float | None
    offline_history: tuple[float, ...]
    action: Action | None
    call: str | None  # "open" | "resume" | "close"
    alert: str | None  # an alert the decision raises (flapping, recovery exhausted, ...)


class TransitionPlanner:
    """Decides what a legal transition writes (see the module docstring)."""

    def __init__(
        self,
        cfg: PolicyConfig,
        mass: MassOfflineDetector,
        rng: random.Random,
        paused_reasons: dict[str, str],
        shown_qr: dict[str, int],
    ) -> None:
        self.cfg = cfg
        self.policy = RecoveryPolicy(cfg, rng=rng)
        self.mass = mass
        self.rng = rng
        self.paused_reasons = paused_reasons
        #: Hash of the QR code each account in waiting_qr shows, where the worker sent one.
        #: Owned by the supervisor, which keeps it in step with the committed status.
        self.shown_qr = shown_qr

    def plan(
        self, acc: Account, change: Change, new_state: State, now: float
    ) -> Planned | Redirect | Repeat:
        """Decide what a legal transition writes: row fields, reason, supervision state."""
        trigger = change.trigger
        data = dict(change.data or {})
        fields: dict[str, Any] = {}
        attempts = acc.attempts
        qr = acc.qr_refreshes
        online_since = acc.online_since
        history = acc.offline_history
        decision: RecoveryDecision | None = None
        action: Action | None = None
        note = ""

        if trigger is Trigger.recover and data.get("reset_attempts"):
            # An admin's `recover` is a deliberate fresh start: a new recovery and QR budget.
            attempts = 0
            qr = 0
        if trigger is Trigger.qr_ready:
            code = data.get("qr_code")
            if (
                acc.status is State.waiting_qr
                and isinstance(code, str)
                and self.shown_qr.get(acc.id) == hash(code)
            ):
                # The QR on show, sent again: workers resend a batch whose answer they never
                # got, and unlike other events a refresh is legal where the first one led. A
                # 64-bit hash stands for the code (TEXT, up to 64 KB): a false match, about
                # one in 2**64, would drop one refresh.
                return Repeat()
            qr_decision = self.policy.on_qr_ready(acc, now)
            if qr_decision.trigger is Trigger.fail:
                # Nobody is scanning: a human step must never loop unattended.
                return Redirect(
                    Trigger.fail,
                    qr_decision.reason.removeprefix("fail: "),
                    {"error": "qr_not_scanned", "needs_human": True, "alert": qr_decision.alert},
                )
            qr = qr_decision.qr_refreshes
            fields["login_qr_code"] = code if isinstance(code, str) else None
            if acc.status is State.waiting_qr:
                # "refresh n/max": also tells two refreshes within one second apart in the log.
                note = qr_decision.reason.removeprefix("qr_ready: ")

        if new_state is State.offline:
            hold = self.mass.cooldown_until(acc.tenant_id, now)
            decision = self.policy.after_offline(
                acc, now, cause=trigger, from_state=acc.status, hold_until=hold
            )
            online_since = None
        elif new_state is State.error:
            error = data.get("error")
            fields["error_message"] = str(error) if error else change.cause
            # A QR nobody scans is not retried unattended: an admin must act.
            if not data.get("needs_human"):
                decision = self.policy.after_error(acc, now)
        elif new_state is State.online:
            fields["login_qr_code"] = None
            fields["error_message"] = None
            online_since = now
            qr = 0
            action = Action(HEARTBEAT, now + self.cfg.heartbeat_timeout)
        else:
            action = self.entry_action(acc, new_state, now)

        alert = data.get("alert")
        if decision is not None:
            attempts = decision.attempts
            qr = decision.qr_refreshes
            history = decision.offline_history
            alert = decision.alert or alert
            action = None
            if decision.action is not None and decision.at is not None:
                if decision.action == "fail":
                    kind = FAIL
                elif new_state is State.error:
                    kind = RETRY_ERROR
                else:
                    kind = RECOVER
                action = Action(kind, decision.at, decision.reason)

        call: str | None = None
        if new_state is State.initializing and (
            trigger is not Trigger.relogin_required or data.get("daemon")
        ):
            call = "open"
        elif new_state is State.recovering:
            call = "resume"
        elif new_state is State.error:
            call = "close"

        reason = f"{trigger}: {change.cause}"
        if note:
            reason += f"; {note}"
        if decision is not None:
            reason += f"; next: {decision.reason}"
        details = data.get("error_details") or data.get("error")
        supervision = {
            "entered_at": to_db_time(now),
            "attempts": attempts,
            "qr_refreshes": qr,
            "next_action": action.kind if action else None,
            "next_action_at": to_db_time(action.at) if action else None,
            "online_since": to_db_time(online_since),
            "offline_history": list(history),
            "paused": acc.paused,
            "paused_reason": self.paused_reasons.get(acc.id) if acc.paused else None,
        }
        request = TransitionRequest(
            acc.id,
            str(acc.status),
            str(new_state),
            reason,
            str(details) if details else None,
            change.operator_id,
            fields=fields,
            supervision=supervision,
        )
        effects = Effects(
            attempts, qr, online_since, history, action, call, str(alert) if alert else None
        )
        return Planned(request, new_state, effects)

    def entry_action(self, acc: Account, state: State, now: float) -> Action | None:
        """The next action of an account found in ``state`` without a decision at hand
        (entering a login state, or adopting a row whose supervision state is missing)."""
        cfg = self.cfg
        if state is State.created:
            return Action(START, now)
        if state is State.online:
            return Action(HEARTBEAT, now + cfg.heartbeat_timeout)
        if state.has_deadline:
            seconds = cfg.deadlines[str(state)]
            return Action(TIMEOUT, now + seconds, f"timeout in {seconds:g}s")
        if acc.paused:
            return None
        if state is State.offline:
            delay = backoff_delay(acc.attempts + 1, base=cfg.base, cap=cfg.cap, rng=self.rng)
            return Action(RECOVER, now + delay)
        if state is State.error and cfg.error_retry_after > 0:
            if acc.qr_refreshes > cfg.qr_max_refreshes:
                return None  # failed for a QR nobody scanned: waits for an admin
            return Action(RETRY_ERROR, now + cfg.error_retry_after)
        return None
