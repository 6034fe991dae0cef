"""The pure core of accountd: states, triggers, the transition table and the account record.

No I/O and no clock here; everything that decides *when* lives in `accountd.daemon`.
"""

from accountd.statemachine.account import Account
from accountd.statemachine.machine import (
    MACHINE,
    TRANSITIONS,
    all_pairs,
    force_targets,
    is_legal,
    legal_triggers,
    next_state,
    sources,
)
from accountd.statemachine.states import (
    ADMIN_TRIGGERS,
    ALL_STATES,
    DAEMON_TRIGGERS,
    DEADLINE_STATES,
    DOWN_STATES,
    HUMAN_STATES,
    LOGIN_STATES,
    STATE_BY_VALUE,
    WORKER_TRIGGERS,
    State,
    Trigger,
)

__all__ = [
    "ADMIN_TRIGGERS",
    "ALL_STATES",
    "DAEMON_TRIGGERS",
    "DEADLINE_STATES",
    "DOWN_STATES",
    "HUMAN_STATES",
    "LOGIN_STATES",
    "MACHINE",
    "STATE_BY_VALUE",
    "TRANSITIONS",
    "WORKER_TRIGGERS",
    "Account",
    "State",
    "Trigger",
    "all_pairs",
    "force_targets",
    "is_legal",
    "legal_triggers",
    "next_state",
    "sources",
]
