"""The nine account states and the triggers that move between them.

In the manner of Home Assistant's ``ConfigEntryState`` and the Supervisor's ``states.py``: the
states are an ``Enum`` whose members carry the metadata the policies need (has a deadline, needs a
human, counts as down), plus named sets so callers never spell those lists out again. This module
imports nothing of ours, so anything may import it.

The values are exactly the seed's ``wework_accounts.status`` ENUM; as a ``StrEnum`` a member *is*
its column value (``State.online == "online"``), which is what the database layer writes.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """Where one account is in its lifecycle (the seed's ``wework_accounts.status``)."""

    created = "created"
    initializing = "initializing"
    waiting_qr = "waiting_qr"
    waiting_confirm = "waiting_confirm"
    verifying = "verifying"
    online = "online"
    offline = "offline"
    error = "error"
    recovering = "recovering"

    @property
    def has_deadline(self) -> bool:
        """The daemon fires ``timeout`` if the account stays here longer than configured."""
        return self in DEADLINE_STATES

    @property
    def needs_human(self) -> bool:
        """Progress waits on a person (scanning or confirming a QR code)."""
        return self in HUMAN_STATES

    @property
    def is_down(self) -> bool:
        """The account was working and is not now: what dashboards count as an outage."""
        return self in DOWN_STATES

    @property
    def is_login(self) -> bool:
        """One of the steps of a (QR) login, from opening the session to the final check."""
        return self in LOGIN_STATES


# Plain frozensets built after the class: membership is one hash lookup, and the properties above
# read them at call time, so the definitions below are the single source of this metadata.
DEADLINE_STATES: frozenset[State] = frozenset(
    {
        State.initializing,
        State.waiting_qr,
        State.waiting_confirm,
        State.verifying,
        State.recovering,
    }
)
HUMAN_STATES: frozenset[State] = frozenset({State.waiting_qr, State.waiting_confirm})
DOWN_STATES: frozenset[State] = frozenset({State.offline, State.error, State.recovering})
LOGIN_STATES: frozenset[State] = frozenset(
    {State.initializing, State.waiting_qr, State.waiting_confirm, State.verifying}
)
ALL_STATES: frozenset[State] = frozenset(State)
#: A state by its value without ``State(value)``'s trip through ``EnumType.__call__``: at a
#: million accounts that call was a tenth of the start-up load.
STATE_BY_VALUE: dict[str, State] = {s.value: s for s in State}


class Trigger(StrEnum):
    """An event that may change an account's state (BRIEF §3, "Trigger" column)."""

    start = "start"
    qr_ready = "qr_ready"
    qr_scanned = "qr_scanned"
    confirmed = "confirmed"
    verified = "verified"
    heartbeat_lost = "heartbeat_lost"
    logged_out = "logged_out"
    timeout = "timeout"
    recover = "recover"
    recovered = "recovered"
    relogin_required = "relogin_required"
    fail = "fail"
    force = "force"


# Who may fire what. The ingest listener accepts only WORKER_TRIGGERS as event names; the control
# API only ADMIN_TRIGGERS. `recover` is both the daemon's (recovery policy) and an admin's, and
# `fail` both the worker's and the daemon's (the policy giving up), so the sets overlap.
WORKER_TRIGGERS: frozenset[Trigger] = frozenset(
    {
        Trigger.qr_ready,
        Trigger.qr_scanned,
        Trigger.confirmed,
        Trigger.verified,
        Trigger.logged_out,
        Trigger.recovered,
        Trigger.relogin_required,
        Trigger.fail,
    }
)
DAEMON_TRIGGERS: frozenset[Trigger] = frozenset(
    {Trigger.start, Trigger.heartbeat_lost, Trigger.timeout, Trigger.recover, Trigger.fail}
)
ADMIN_TRIGGERS: frozenset[Trigger] = frozenset({Trigger.force, Trigger.recover})

__all__ = [
    "ADMIN_TRIGGERS",
    "ALL_STATES",
    "DAEMON_TRIGGERS",
    "DEADLINE_STATES",
    "DOWN_STATES",
    "HUMAN_STATES",
    "LOGIN_STATES",
    "STATE_BY_VALUE",
    "WORKER_TRIGGERS",
    "State",
    "Trigger",
]
