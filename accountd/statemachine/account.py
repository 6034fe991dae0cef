"""The in-memory view of one supervised account.

The daemon holds one of these per account, possibly 100k of them, so it is a slotted object (no
per-instance ``__dict__``) and the fields are values, not objects with their own weight:
``status`` is a shared enum member, ``offline_history`` a tuple (the empty tuple is a singleton,
so a healthy account pays nothing for it), ``next_action`` one of a handful of interned strings.

Measured on CPython 3.11 (tests/test_statemachine.py keeps this honest): the object itself is
168 bytes; with a 36-character id, a 32-character ``wework_guid``, and three float timestamps
of its own it is about 400 bytes. ``tenant_id`` and ``worker_key`` are shared with the other
accounts of the same tenant or worker when the loader interns them (``sys.intern``), and
``online_since`` may be the very float object of ``entered_at``; ``last_heartbeat`` and
``persisted_at`` are the one float of the batch that set them, shared by thousands of accounts.
Compare about 10 KB per account for a model registered with ``transitions.Machine.add_model``.
Per-account facts live here, in slots, rather than in side dicts keyed by id: a dict entry costs
more than a slot (about 40 bytes against 8), which at a million accounts is 30 MB per dict.

Only the one door that changes state (the engine) assigns ``status`` and the supervision fields,
and it does so after the database transaction commits; everything else reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from accountd.statemachine.states import State


@dataclass(slots=True, eq=False, kw_only=True)
class Account:
    """One account as the daemon supervises it (identity-compared, mutable by the engine)."""

    id: str
    tenant_id: str
    wework_guid: str
    status: State = State.created
    #: When the current state was entered (epoch seconds). Unlike the seed's ``updated_at``,
    #: which every heartbeat write bumps, this is what deadlines and durations are measured from.
    entered_at: float = 0.0
    last_heartbeat: float | None = None
    #: Recovery attempts since the last stable online stretch (reset after ``reset_after``).
    attempts: int = 0
    #: QR codes that expired or were replaced unscanned since the last successful login.
    qr_refreshes: int = 0
    #: What the daemon will do next on its own (a trigger name or ``"reset_attempts"``) and when.
    next_action: str | None = None
    next_action_at: float | None = None
    #: When the current (or most recent) online stretch began; kept after leaving online so the
    #: recovery policy can tell a stable session from a flapping one.
    online_since: float | None = None
    #: Recent times the account went offline, oldest first, trimmed to the flap window.
    offline_history: tuple[float, ...] = ()
    paused: bool = False
    #: The worker (host) that holds this account's session, if known.
    worker_key: str | None = None
    #: Bumped on every committed change; lets readers notice they hold a stale copy.
    version: int = 0
    #: When a heartbeat of this account was last queued for ``last_heartbeat_at`` (epoch
    #: seconds; 0 = never, a cached small int): later ones within ``persist_interval`` are not.
    persisted_at: float = 0
    #: While ``online``: when its heartbeat is checked next (`HeartbeatChecks` holds the very
    #: float beside the account; a check whose float is no longer this one is stale).
    heartbeat_check: float | None = None


__all__ = ["Account"]
