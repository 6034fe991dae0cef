"""The transition table of BRIEF §3, in one place, and O(1) questions about it.

The table is plain data (`TRANSITIONS`) fed into ONE shared ``transitions.Machine`` built at import.
The library validates the table (unknown states, malformed rows) and defines its meaning; we then
read its ``events[...].transitions`` once into a ``(State, Trigger) -> State`` dict, so that a
lookup is one hash probe and never touches a per-account model.

Why not the library's usual way (``machine.add_model(account)`` and ``account.trigger(...)``):

* ``add_model`` decorates every model with one bound method per trigger and per state check,
  about 10 KB per account, and registering gets slower as the model list grows (about 130 s
  for 100k accounts). We keep accounts as slotted objects of a few hundred bytes instead.
* The library's ``Timeout`` states start a timer per account and per state entry. Deadlines
  instead live in one heap (`accountd.daemon.deadlines`), costing nothing while nothing expires.
* The one door that changes state (the engine) must commit to the database *before* memory
  changes; a callback-driven ``model.trigger()`` would mutate the model first.

So the machine has no models at all (``model=None``); tests assert it stays that way.

``force`` ("any → any, chosen by the admin") is the one trigger whose destination is an argument:
it is encoded as one row per destination, guarded in the library by a condition on the
``target`` keyword, and forcing an account into the state it is already in is illegal (nothing
would change, and a log row saying so would only mislead).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Final, TypedDict

from transitions import Machine

from accountd.errors import IllegalTransition
from accountd.statemachine.states import State, Trigger


class TransitionRow(TypedDict):
    """One row of the table: ``trigger`` moves an account from any of ``source`` to ``dest``."""

    trigger: str
    source: list[str]
    dest: str


def _row(trigger: Trigger, sources: list[State], dest: State) -> TransitionRow:
    return {"trigger": trigger.value, "source": [s.value for s in sources], "dest": dest.value}


_S = State
_T = Trigger

# BRIEF §3, row by row, in its order. Read-only by convention: the machine below is built from it
# at import, and changing it afterwards changes nothing.
TRANSITIONS: Final[list[TransitionRow]] = [
    _row(_T.start, [_S.created], _S.initializing),
    # A refresh (waiting_qr -> waiting_qr) is a real transition: it is logged and resets the
    # per-QR deadline; the recovery policy counts it against qr_max_refreshes.
    _row(_T.qr_ready, [_S.initializing, _S.waiting_qr, _S.recovering], _S.waiting_qr),
    _row(_T.qr_scanned, [_S.waiting_qr], _S.waiting_confirm),
    _row(_T.confirmed, [_S.waiting_confirm], _S.verifying),
    _row(_T.verified, [_S.verifying], _S.online),
    _row(_T.heartbeat_lost, [_S.online], _S.offline),
    # "initializing … online, recovering": the four login states, online and recovering.
    _row(
        _T.logged_out,
        [
            _S.initializing,
            _S.waiting_qr,
            _S.waiting_confirm,
            _S.verifying,
            _S.online,
            _S.recovering,
        ],
        _S.offline,
    ),
    _row(
        _T.timeout,
        [_S.initializing, _S.waiting_qr, _S.waiting_confirm, _S.verifying, _S.recovering],
        _S.offline,
    ),
    _row(_T.recover, [_S.offline, _S.error], _S.recovering),
    _row(_T.recovered, [_S.recovering], _S.online),
    _row(_T.relogin_required, [_S.recovering], _S.initializing),
    _row(_T.fail, [s for s in State if s is not _S.error], _S.error),
    # force: any -> any; one row per destination, from every other state.
    *(_row(_T.force, [s for s in State if s is not dest], dest) for dest in State),
]


def _target_is(dest: State) -> Callable[..., bool]:
    """The library-side guard of a ``force`` row: taken only when the admin asked for ``dest``."""

    def condition(*_args: object, target: object = None, **_kwargs: object) -> bool:
        return target == dest

    condition.__name__ = f"target_is_{dest.value}"
    return condition


def _build_machine() -> Machine:
    rows: list[dict[str, object]] = []
    for row in TRANSITIONS:
        spec: dict[str, object] = dict(row)
        if row["trigger"] == Trigger.force:
            spec["conditions"] = [_target_is(State(row["dest"]))]
        rows.append(spec)
    return Machine(
        model=None,  # no per-account models, ever: see the module docstring
        states=[s.value for s in State],
        transitions=rows,
        initial=State.created.value,
        auto_transitions=False,  # no implicit to_<state>() triggers: only the table's moves
        ignore_invalid_triggers=False,
    )


#: The one shared machine. Exposed for tests and tools; engine code calls the functions below.
MACHINE: Final[Machine] = _build_machine()


def _derive(
    machine: Machine,
) -> tuple[dict[tuple[State, Trigger], State], dict[State, frozenset[State]]]:
    """Read the library's view of the table into plain dicts (once, at import)."""
    nxt: dict[tuple[State, Trigger], State] = {}
    forced: dict[State, frozenset[State]] = {}
    missing = {t.value for t in Trigger} - set(machine.events)
    if missing:
        raise RuntimeError(f"triggers without a row in TRANSITIONS: {sorted(missing)}")
    for name, event in machine.events.items():
        trigger = Trigger(name)
        for source, candidates in event.transitions.items():
            state = State(source)
            if any(t.dest is None for t in candidates):
                raise RuntimeError(f"{trigger} from {state}: internal transitions are not used")
            dests = {State(str(t.dest)) for t in candidates}
            if trigger is Trigger.force:
                forced[state] = frozenset(dests)
            elif len(dests) != 1:
                # An ordinary trigger must be deterministic: two rows from one source would make
                # the outcome depend on row order, which nobody reading the table would expect.
                raise RuntimeError(f"{trigger} from {state} has several destinations: {dests}")
            else:
                nxt[(state, trigger)] = dests.pop()
    return nxt, forced


_NEXT, _FORCE_TARGETS = _derive(MACHINE)

_LEGAL: Final[dict[State, frozenset[Trigger]]] = {
    state: frozenset(
        {t for (s, t) in _NEXT if s is state}
        | ({Trigger.force} if _FORCE_TARGETS.get(state) else set())
    )
    for state in State
}
_SOURCES: Final[dict[Trigger, frozenset[State]]] = {
    trigger: frozenset(
        _FORCE_TARGETS if trigger is Trigger.force else {s for (s, t) in _NEXT if t is trigger}
    )
    for trigger in Trigger
}


def next_state(state: State, trigger: Trigger, target: State | None = None) -> State:
    """Where ``trigger`` takes an account that is in ``state``.

    ``target`` is the admin's chosen destination and is required for ``force`` (forcing into the
    current state is illegal). For every other trigger the table decides; passing a ``target``
    that disagrees with it is a programming error (``ValueError``).

    Raises `accountd.errors.IllegalTransition` when the table does not allow the move.
    """
    if trigger is Trigger.force:
        if target is None:
            raise ValueError("force needs a target state")
        if target not in _FORCE_TARGETS.get(state, frozenset()):
            raise IllegalTransition(state.value, trigger.value)
        return target
    dest = _NEXT.get((state, trigger))
    if dest is None:
        raise IllegalTransition(state.value, trigger.value)
    if target is not None and target is not dest:
        raise ValueError(f"{trigger} always goes to {dest}; target {target} makes no sense")
    return dest


def is_legal(state: State, trigger: Trigger) -> bool:
    """Whether ``trigger`` can be fired from ``state`` (``force``: to some other state)."""
    return trigger in _LEGAL[state]


def legal_triggers(state: State) -> frozenset[Trigger]:
    """Every trigger that can be fired from ``state``."""
    return _LEGAL[state]


def sources(trigger: Trigger) -> frozenset[State]:
    """Every state from which ``trigger`` can be fired."""
    return _SOURCES[trigger]


def force_targets(state: State) -> frozenset[State]:
    """The states an admin may ``force`` an account in ``state`` into (all the others)."""
    return _FORCE_TARGETS.get(state, frozenset())


def all_pairs() -> Iterator[tuple[State, Trigger]]:
    """Every (state, trigger) combination, legal or not (for exhaustive tests)."""
    return itertools.product(State, Trigger)


__all__ = [
    "MACHINE",
    "TRANSITIONS",
    "TransitionRow",
    "all_pairs",
    "force_targets",
    "is_legal",
    "legal_triggers",
    "next_state",
    "sources",
]
