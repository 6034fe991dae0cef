"""The transition table of BRIEF §3, checked exhaustively, and the shape of the account record."""

from __future__ import annotations

import sys
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transitions import MachineError

from accountd.errors import IllegalTransition
from accountd.statemachine import (
    ADMIN_TRIGGERS,
    ALL_STATES,
    DAEMON_TRIGGERS,
    DEADLINE_STATES,
    DOWN_STATES,
    HUMAN_STATES,
    LOGIN_STATES,
    MACHINE,
    TRANSITIONS,
    WORKER_TRIGGERS,
    Account,
    State,
    Trigger,
    all_pairs,
    force_targets,
    is_legal,
    legal_triggers,
    next_state,
    sources,
)

S, T = State, Trigger
LOGIN = [S.initializing, S.waiting_qr, S.waiting_confirm, S.verifying]

# BRIEF §3 transcribed by hand, independently of accountd.statemachine.machine.TRANSITIONS, so a
# typo in the module's table cannot hide behind a test generated from that same table.
EXPECTED: dict[tuple[State, Trigger], State] = {
    (S.created, T.start): S.initializing,
    **{(s, T.qr_ready): S.waiting_qr for s in (S.initializing, S.waiting_qr, S.recovering)},
    (S.waiting_qr, T.qr_scanned): S.waiting_confirm,
    (S.waiting_confirm, T.confirmed): S.verifying,
    (S.verifying, T.verified): S.online,
    (S.online, T.heartbeat_lost): S.offline,
    **{(s, T.logged_out): S.offline for s in (*LOGIN, S.online, S.recovering)},
    **{(s, T.timeout): S.offline for s in (*LOGIN, S.recovering)},
    (S.offline, T.recover): S.recovering,
    (S.error, T.recover): S.recovering,
    (S.recovering, T.recovered): S.online,
    (S.recovering, T.relogin_required): S.initializing,
    **{(s, T.fail): S.error for s in State if s is not S.error},
}


def _table_rows() -> list[tuple[State, Trigger, State]]:
    """Every non-force row of the module's TRANSITIONS, one (source, trigger, dest) each."""
    return [
        (State(src), Trigger(row["trigger"]), State(row["dest"]))
        for row in TRANSITIONS
        if row["trigger"] != T.force
        for src in row["source"]
    ]


def _pair_id(value: object) -> str:
    return str(value)


# -- the table --------------------------------------------------------------------------------


def test_the_nine_states_are_exactly_the_seed_enum() -> None:
    # The seed: status ENUM('created', 'initializing', 'waiting_qr', 'waiting_confirm',
    # 'verifying', 'online', 'offline', 'error', 'recovering')
    seed = (
        "created initializing waiting_qr waiting_confirm verifying online offline error recovering"
    )
    assert [s.value for s in State] == seed.split()
    assert frozenset(State) == ALL_STATES
    assert State("online") is S.online and S.online == "online"


def test_module_table_matches_the_brief_transcription() -> None:
    rows = _table_rows()
    assert len(rows) == len(set((s, t) for s, t, _ in rows)), "a (state, trigger) appears twice"
    assert {(s, t): d for s, t, d in rows} == EXPECTED


@pytest.mark.parametrize(("state", "trigger", "dest"), _table_rows(), ids=_pair_id)
def test_every_table_row_goes_to_its_destination(
    state: State, trigger: Trigger, dest: State
) -> None:
    assert next_state(state, trigger) is dest
    assert is_legal(state, trigger)
    assert trigger in legal_triggers(state)
    assert state in sources(trigger)


@pytest.mark.parametrize(
    ("state", "trigger"),
    [(s, t) for s, t in all_pairs() if t is not T.force and (s, t) not in EXPECTED],
    ids=_pair_id,
)
def test_every_illegal_pair_raises_illegal_transition(state: State, trigger: Trigger) -> None:
    assert not is_legal(state, trigger)
    assert trigger not in legal_triggers(state)
    assert state not in sources(trigger)
    with pytest.raises(IllegalTransition) as info:
        next_state(state, trigger)
    assert (info.value.state, info.value.trigger) == (state.value, trigger.value)


def test_all_pairs_is_every_combination_once() -> None:
    pairs = list(all_pairs())
    assert len(pairs) == len(State) * len(Trigger) == 9 * 13
    assert set(pairs) == {(s, t) for s in State for t in Trigger}


def test_online_to_offline_on_heartbeat_lost() -> None:
    assert next_state(S.online, T.heartbeat_lost) is S.offline


def test_qr_refresh_stays_in_waiting_qr() -> None:
    assert next_state(S.waiting_qr, T.qr_ready) is S.waiting_qr


def test_logged_out_covers_login_states_online_and_recovering_only() -> None:
    assert sources(T.logged_out) == frozenset({*LOGIN, S.online, S.recovering})


def test_error_cannot_fail_again() -> None:
    assert sources(T.fail) == ALL_STATES - {S.error}
    with pytest.raises(IllegalTransition):
        next_state(S.error, T.fail)


def test_created_can_only_start_fail_or_be_forced() -> None:
    assert legal_triggers(S.created) == frozenset({T.start, T.fail, T.force})


# -- force --------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", list(State), ids=_pair_id)
def test_force_moves_any_state_to_any_other(state: State) -> None:
    assert force_targets(state) == ALL_STATES - {state}
    assert is_legal(state, T.force)
    for target in State:
        if target is state:
            with pytest.raises(IllegalTransition):
                next_state(state, T.force, target)
        else:
            assert next_state(state, T.force, target) is target
    assert sources(T.force) == ALL_STATES


def test_force_without_target_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="target"):
        next_state(S.online, T.force)


def test_target_disagreeing_with_the_table_is_a_programming_error() -> None:
    assert next_state(S.online, T.heartbeat_lost, S.offline) is S.offline
    with pytest.raises(ValueError, match="always goes to"):
        next_state(S.online, T.heartbeat_lost, S.error)


# -- the shared transitions.Machine -------------------------------------------------------------


class _Probe:
    """A throwaway object the library can move (it only needs a `state` attribute)."""

    __slots__ = ("state",)

    def __init__(self, state: State) -> None:
        self.state = state.value


@pytest.mark.parametrize(("state", "trigger"), list(all_pairs()), ids=_pair_id)
def test_lookup_agrees_with_the_library_firing_the_trigger(state: State, trigger: Trigger) -> None:
    # The precomputed dict must say exactly what transitions itself does for every pair.
    targets = list(State) if trigger is T.force else [None]
    for target in targets:
        probe = _Probe(state)
        try:
            fired = MACHINE.events[trigger.value].trigger(probe, target=target)
        except MachineError:
            fired = False
        try:
            expected: State | None = next_state(state, trigger, target)
        except IllegalTransition:
            expected = None
        if expected is None:
            assert not fired and probe.state == state.value
        else:
            assert fired and probe.state == expected.value


def test_machine_is_shared_and_never_holds_models() -> None:
    # No add_model: 100k lookups (one per simulated account) leave the machine model-free.
    accounts = [
        Account(id=str(i), tenant_id="t", wework_guid=f"g{i}", status=S.online)
        for i in range(100_000)
    ]
    for account in accounts:
        account.status = next_state(account.status, T.heartbeat_lost)
    assert all(a.status is S.offline for a in accounts)
    assert len(MACHINE.models) <= 1
    assert not hasattr(accounts[0], "heartbeat_lost"), "the library decorated an account"
    assert MACHINE.auto_transitions is False


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=60))
def test_random_walk_over_legal_triggers_stays_within_the_nine_states(choices: list[int]) -> None:
    state = S.created
    for choice in choices:
        options = sorted(legal_triggers(state))
        assert options, f"{state} is a dead end"
        trigger = options[choice % len(options)]
        target = None
        if trigger is T.force:
            others = sorted(force_targets(state))
            target = others[choice % len(others)]
        new = next_state(state, trigger, target)
        assert new in ALL_STATES
        assert new is not state or (state, trigger) == (S.waiting_qr, T.qr_ready)
        state = new


def test_online_is_reachable_from_every_state_without_force() -> None:
    # No state is a trap: each one can get back to online through the normal (non-admin) flow.
    reach: dict[State, set[State]] = {
        s: {d for (src, _), d in EXPECTED.items() if src is s} for s in State
    }
    for start in State:
        seen, todo = {start}, [start]
        while todo:
            for nxt in reach[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert S.online in seen or start is S.online, start


# -- metadata -----------------------------------------------------------------------------------


def test_state_metadata_properties_match_the_named_sets() -> None:
    assert {S.initializing, *LOGIN[1:], S.recovering} == DEADLINE_STATES
    assert {S.waiting_qr, S.waiting_confirm} == HUMAN_STATES
    assert {S.offline, S.error, S.recovering} == DOWN_STATES
    assert set(LOGIN) == LOGIN_STATES
    for s in State:
        assert s.has_deadline == (s in DEADLINE_STATES)
        assert s.needs_human == (s in HUMAN_STATES)
        assert s.is_down == (s in DOWN_STATES)
        assert s.is_login == (s in LOGIN_STATES)
    assert not S.online.is_down and not S.online.has_deadline


def test_every_deadline_state_can_time_out() -> None:
    assert sources(T.timeout) == DEADLINE_STATES


def test_trigger_origins_cover_every_trigger() -> None:
    assert frozenset(Trigger) == WORKER_TRIGGERS | DAEMON_TRIGGERS | ADMIN_TRIGGERS
    assert {T.force, T.recover} == ADMIN_TRIGGERS
    assert T.force not in WORKER_TRIGGERS | DAEMON_TRIGGERS
    assert {T.start, T.heartbeat_lost, T.timeout} <= DAEMON_TRIGGERS


# -- the account record -------------------------------------------------------------------------


def _footprint(account: Account, *, identity: bool = True) -> int:
    """Bytes owned by one account: the object plus members no other account shares.

    ``identity=False`` leaves out ``id`` and ``wework_guid``, which the daemon's indexes
    (id -> account, guid -> account) hold anyway: what the record itself adds.
    """
    shared: set[int] = {id(None), id(True), id(False), id(())}
    shared |= {id(s) for s in State} | {id(t) for t in Trigger}
    total = sys.getsizeof(account)
    for name in Account.__slots__:
        value = getattr(account, name)
        # Small ints are cached by CPython; tenant/worker keys are interned by the loader.
        if id(value) in shared or (isinstance(value, int) and -5 <= value <= 256):
            continue
        if name in ("tenant_id", "worker_key") or (not identity and name in ("id", "wework_guid")):
            continue
        shared.add(id(value))
        total += sys.getsizeof(value)
        if isinstance(value, tuple):
            total += sum(sys.getsizeof(v) for v in value)
    return total


def test_account_is_slotted_and_about_400_bytes() -> None:
    now = 1_700_000_000.25
    account = Account(
        id=str(uuid.uuid4()),
        tenant_id=sys.intern("tenant-0001"),
        wework_guid=uuid.uuid4().hex,  # 32 characters
        status=S.online,
        entered_at=now,
        last_heartbeat=now + 14.5,
        next_action=T.recover,  # actions are shared constants, never fresh strings
        next_action_at=now + 45.0,
        worker_key=sys.intern("worker-a"),
    )
    account.online_since = account.entered_at  # the same float object, as the engine does
    assert not hasattr(account, "__dict__")
    with pytest.raises(AttributeError):
        account.colour = "red"  # type: ignore[attr-defined]
    # CPython 3.11, 64-bit: 168 bytes for the object (17 slots); 240 with its three timestamps;
    # 406 with the id (36 chars) and guid (32 chars) strings it shares with the indexes.
    assert sys.getsizeof(account) <= 168
    # The `heartbeat_check` slot (8 bytes) took the 400 over; it replaced a deadline-queue
    # entry of ~190 bytes (a 4-tuple, a sequence int, a dict entry) outside the account.
    assert _footprint(account, identity=False) < 250
    assert _footprint(account) < 410


def test_accounts_compare_by_identity() -> None:
    a = Account(id="a", tenant_id="t", wework_guid="g")
    b = Account(id="a", tenant_id="t", wework_guid="g")
    assert a != b and a == a
    assert len({a, b}) == 2
    assert a.status is S.created and a.offline_history == () and a.version == 0
