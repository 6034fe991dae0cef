"""The supervisor: the in-memory truth about every account and the policy around transitions.

It owns the account table in memory, the deadline queue, the heartbeat buffer and the pool of
worker calls, and it is the `Planner` of the one door (`accountd.daemon.door.Door`): the door asks
it what a legal transition writes (row fields, log reason, supervision state) and tells it when
the transaction committed, at which point memory, deadlines and side effects follow.

Flow of an event: ingest → `apply_events` → `Door.fire` → committer batch → `plan` →
``apply_transitions`` (one transaction) → `after_commit` → deadline set, worker call queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from accountd.adapters.loader import LoadedRow, heartbeats_after, iter_loaded, shown_qr_hashes
from accountd.adapters.repository import (
    AccountRepository,
    AccountRow,
    from_db_time,
    to_db_time,
)
from accountd.adapters.worker import WorkerClient
from accountd.daemon.clock import Clock
from accountd.daemon.deadlines import DeadlineQueue, DeadlineRunner, HeartbeatChecks
from accountd.daemon.door import Change, Door, Planned, Redirect, Repeat
from accountd.daemon.outage import OutageGuard
from accountd.daemon.planning import (
    FAIL,
    HEARTBEAT,
    RECOVER,
    RETRY_ERROR,
    START,
    TIMEOUT,
    Action,
    Effects,
    TransitionPlanner,
)
from accountd.daemon.policy import (
    ALERT_FLAPPING,
    ALERT_QR_NOT_SCANNED,
    ALERT_RECOVERY_EXHAUSTED,
    MassOfflineDetector,
    PolicyConfig,
    RecoveryLimiter,
    is_flapping,
)
from accountd.daemon.priority import AdminLane
from accountd.daemon.protocol import WORKER_EVENTS, ItemResult, WorkerEvent
from accountd.daemon.worker_calls import WorkerCalls
from accountd.errors import Overloaded, WorkerTransient
from accountd.statemachine import STATE_BY_VALUE, TRANSITIONS, State, Trigger
from accountd.statemachine.account import Account

log = logging.getLogger(__name__)

# This many heartbeat deadlines within one slice of time make a mass event (a worker host died):
# 500 in 100 ms is 5,000 accounts a second going silent together. A smaller crowd fits in one
# batch of the normal lane, where it holds nobody up; in the bulk lane it waited behind every
# change of a larger mass event under way. With 50, clumps of 50-200 accounts that went silent
# together while 100,000 others did waited up to 38 s at a million accounts (docs/benchmarks.md).
MASS_EVENT = 500
MASS_SLICE = 0.1
# Accounts of a mass event re-checked against the database at once (before firing).
MASS_CHECK = 5000

# Seconds the shutdown spends folding the supervision journal at most.
JOURNAL_FOLD_AT_STOP = 5.0
# Journal rows per fold transaction (a journal row holds up to one batch: 500-1,000 accounts).
JOURNAL_SLICE = 2
# Accounts per `write_heartbeats` call of a flush (see `Supervisor.flush_heartbeats`).
FLUSH_SLICE = 5000
# Rows per page, and per call, of the pick-up of others' heartbeat writes (`poll_db_heartbeats`).
POLL_PAGE = 2000
POLL_MAX = 100_000


@dataclass(slots=True)  # not frozen: see accountd.adapters.repository.TransitionRequest
class TransitionEvent:
    """What listeners (metrics, alerts, the demo's printer) learn about a committed transition."""

    account: Account
    old: State
    new: State
    trigger: Trigger
    reason: str
    operator_id: str | None
    alert: str | None  # an alert the decision raised: flapping, qr_not_scanned, recovery_exhausted
    at: float
    time_in_old: float  # seconds spent in `old` (accountd_state_duration_seconds)


@dataclass(frozen=True, slots=True)
class GroupEvent:
    """A decision about a group of accounts: today only ``mass_offline`` of a tenant."""

    kind: str
    group: str
    at: float
    until: float  # end of the cool-down


TransitionListener = Callable[[TransitionEvent], None]
GroupListener = Callable[[GroupEvent], None]


class Supervisor:
    """Supervises every account; implements the door's `Planner` and ingest's `IngestSink`."""

    def __init__(
        self,
        repo: AccountRepository,
        worker: WorkerClient,
        cfg: PolicyConfig,
        clock: Clock,
        *,
        rng: random.Random | None = None,
        batch_size: int = 500,
        journal_min: int = 200,
        page_size: int = 5000,
        persist_interval: float = 15.0,
        startup_grace: float = 60.0,
        worker_concurrency: int = 50,
    ) -> None:
        self.repo = repo
        self.worker = worker
        self.cfg = cfg
        self.clock = clock
        self.rng = rng or random.Random()
        self.page_size = page_size
        self.persist_interval = persist_interval
        self.startup_grace = startup_grace
        self.worker_concurrency = worker_concurrency

        self.accounts: dict[str, Account] = {}
        # Held while an account's fields change together (a transition, a pause) and while
        # the side loop reads them (`accountctl show`, on another thread): a reader sees one
        # moment between two changes. Uncontended it costs ~0.1 µs per transition.
        self.view_lock = threading.Lock()
        self.by_guid: dict[str, str] = {}
        self.counts: Counter[State] = Counter({s: 0 for s in State})
        # Deadlines of every kind but one: online accounts' heartbeat checks, nearly all
        # re-armed when they come due, have a structure of their own (`HeartbeatChecks`).
        self.deadlines = DeadlineQueue()
        self.checks = HeartbeatChecks(cfg.heartbeat_timeout)
        self.runner = DeadlineRunner(
            self.deadlines,
            self._on_due,
            clock=clock,
            admin_waiting=lambda: self.lane.admins > 0,
            checks=self.checks,
            on_expired=self._on_expired,
        )
        # Two transactions in flight overlap our Python with the server's work; SQLite has a
        # single writer, so a second one would only wait for the lock. With one writer, too,
        # another account's change waits for the whole batch being committed, and SQLite
        # commits about 1,300 transitions a second: a mass event's batches keep the usual size
        # there (0.4 s each, not 0.8 s; at a million accounts the others' delay reached 1.02 s
        # with the larger ones).
        one_writer = repo.dialect != "mysql"
        self.door = Door(
            repo,
            self,
            batch_size=batch_size,
            max_batch=batch_size if one_writer else None,
            pipeline=1 if one_writer else 2,
            express=not one_writer,
            journal_min=journal_min,
        )
        self.limiter = RecoveryLimiter(max_in_flight=cfg.max_in_flight, start_rate=cfg.start_rate)
        self.mass = MassOfflineDetector(
            ratio=cfg.mass_offline_ratio,
            window=cfg.mass_offline_window,
            cooldown=cfg.mass_offline_cooldown,
            min_drops=cfg.mass_offline_min_drops,
        )
        # Listeners run after the commit, in the committer task: they must be quick and must
        # not raise (metrics, alert bookkeeping); slow work belongs in their own tasks.
        self.listeners: list[TransitionListener] = []
        self.group_listeners: list[GroupListener] = []
        self.heartbeats_received = 0
        #: Rows the heartbeat flush wrote (accountd_heartbeats_persisted_total).
        self.heartbeats_persisted = 0
        # Metrics hooks: (database, operation, seconds) after a timed write/load; (database)
        # after a failed one. Set by accountd.daemon.metrics.Metrics.attach.
        self.on_db_time: Callable[[str, str, float], None] | None = None
        self.on_db_error: Callable[[str], None] | None = None
        self.loaded = False
        self.started_at = clock.now()
        # Why paused accounts were paused (accountd_supervision.paused_reason); paused only.
        self.paused_reasons: dict[str, str] = {}
        # Hash of the QR code shown, per account in waiting_qr whose worker sent one: how the
        # planner tells a resent qr_ready from a refresh. Accounts leave it with waiting_qr.
        self.shown_qr: dict[str, int] = {}
        self.planner = TransitionPlanner(
            cfg, self.mass, self.rng, self.paused_reasons, self.shown_qr
        )
        # Heartbeats waiting to be written: account id → time (at most one per account; when
        # each account was last queued is `Account.persisted_at`).
        self._dirty: dict[str, float] = {}
        # Since when the flush has been giving way to a mass event (`_flush_gives_way`).
        self._flush_held_since: float | None = None
        self._last_error: dict[str, str] = {}
        self._recover_pending = 0
        # Accounts due for recovery while every slot was taken: (id, kind, version), FIFO.
        self._recover_queue: deque[tuple[str, str, int]] = deque()
        self.calls = WorkerCalls(worker, repo, self._worker_failed, concurrency=worker_concurrency)
        # Accounts whose heartbeat deadline passed, waiting for the database re-check (see
        # `_check_stale`): one task for the small rounds, one for a mass event's, so a mass
        # event's rounds cannot hold the others up.
        self._stale_small: deque[list[Account]] = deque()
        self._stale_mass: deque[list[Account]] = deque()
        self._stale_wakeups = (asyncio.Event(), asyncio.Event())  # (small, mass)
        self._stale_tasks: list[asyncio.Task[None]] = []
        self._small_checking = False  # a small round is being re-checked
        self._mass_checking = False  # a mass event's round is being re-checked
        self._internal: set[asyncio.Future[ItemResult]] = set()
        # Stalls and database outages (accountd.daemon.outage): checks that fell while the daemon
        # was deaf are moved instead of fired. Set by the daemon; None in bare engine tests.
        self.outage: OutageGuard | None = None
        # The heartbeat flush and poll give way to admin requests (accountd.daemon.priority);
        # the daemon sets its shared lane here. Decisions never wait on it.
        self.lane = AdminLane()

    # ---------------------------------------------------------------- lifecycle

    async def load(self) -> int:
        """Load every account (paged) and restore deadlines and backoff from supervision state."""
        now = self.clock.now()
        self.started_at = now
        load_started = time.perf_counter()
        repairs: list[dict[str, Any]] = []
        created: list[str] = []
        beats: dict[float, float] = {}
        adopt, make = self._adopt_loaded, LoadedRow._make
        # Supervision rows a crash (or a cut-off shutdown) left in the journal: folded first, so
        # the load reads them where they belong.
        folded = await self.fold_journal(force=True)
        if folded:
            log.info("folded %d supervision journal rows left by the last run", folded)
        async for page in iter_loaded(self.repo.engine, self.page_size):
            for row in page:
                acc = adopt(make(row), now, repairs, beats)
                if acc.status is State.created:
                    created.append(acc.id)
        if repairs:
            await self.repo.save_supervision(repairs)
        self.shown_qr.update(await shown_qr_hashes(self.repo.engine))
        if self.on_db_time is not None:
            self.on_db_time("platform", "load", time.perf_counter() - load_started)
        self.loaded = True
        for account_id in created:
            self.runner.set(account_id, now, START)
        log.info(
            "loaded %d accounts (%s); %d supervision rows repaired",
            len(self.accounts),
            ", ".join(f"{s}={n}" for s, n in self.counts.items() if n),
            len(repairs),
        )
        return len(self.accounts)

    async def start(self) -> None:
        self.door.start()
        self._stale_tasks = [
            asyncio.create_task(self._check_stale(mass), name=f"accountd-stale-check-{kind}")
            for mass, kind in ((False, "small"), (True, "mass"))
        ]
        await self.runner.start()
        await self.calls.start()

    async def stop(self, grace: float = 10.0) -> None:
        """Finish in-flight transitions (bounded), flush heartbeats, stop every task."""
        await self.runner.stop()
        # Candidates not yet re-checked are dropped: after a restart their deadlines are
        # restored from the heartbeat times (plus the start-up grace) and fire again.
        for task in self._stale_tasks:
            task.cancel()
        for task in self._stale_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._stale_tasks = []
        await self.door.drain(grace)
        await self.door.stop()
        await self.calls.stop()
        # Bounded too: at a million accounts on SQLite the queue took 77 s to write, past
        # systemd's TimeoutStopSec. What is left unwritten costs nothing that matters: the
        # next start reads last_heartbeat_at as it is and applies the start-up grace.
        try:
            async with asyncio.timeout(grace):
                await self.flush_heartbeats(force=True)
        except TimeoutError:
            log.warning(
                "final heartbeat flush cut off after %gs; %d heartbeats not persisted",
                grace,
                len(self._dirty),
            )
        except Exception:  # boundary: shutdown goes on; the next start re-reads the database
            log.exception("final heartbeat flush failed")
        # Bounded tighter than the rest: nothing waits on it (the next start folds what is
        # left before it loads), and systemd's TimeoutStopSec must still cover the whole stop.
        fold_grace = min(grace, JOURNAL_FOLD_AT_STOP)
        try:
            async with asyncio.timeout(fold_grace):
                await self.fold_journal(force=True)
        except TimeoutError:
            log.warning(
                "supervision journal fold cut off after %gs; the next start folds the rest",
                fold_grace,
            )
        except Exception:  # boundary: as above; the next start folds what is left
            log.exception("supervision journal fold failed; the next start folds it")

    def reconfigure(self, cfg: PolicyConfig) -> None:
        """Apply new policy numbers live (SIGHUP). Running deadlines keep their times; the
        heartbeat timeout applies at each account's next check."""
        self.cfg = cfg
        self.checks.timeout = cfg.heartbeat_timeout
        self.planner = TransitionPlanner(
            cfg, self.mass, self.rng, self.paused_reasons, self.shown_qr
        )
        self.limiter = RecoveryLimiter(max_in_flight=cfg.max_in_flight, start_rate=cfg.start_rate)
        self.mass.ratio = cfg.mass_offline_ratio
        self.mass.window = cfg.mass_offline_window
        self.mass.cooldown = cfg.mass_offline_cooldown
        self.mass.min_drops = cfg.mass_offline_min_drops

    # ---------------------------------------------------------------- loading

    def _adopt(self, row: AccountRow, now: float, repairs: list[dict[str, Any]]) -> Account:
        """Adopt a row the repository read (a new account, or a lost compare-and-set)."""
        sup = row.supervision or {}
        loaded = LoadedRow(
            id=row.id,
            tenant_id=row.tenant_id,
            wework_guid=row.wework_guid,
            status=row.status,
            last_heartbeat_at=row.last_heartbeat_at,
            has_supervision=row.supervision is not None,
            s_status=sup.get("status"),
            entered_at=_ts(sup.get("entered_at")),
            attempts=sup.get("attempts"),
            qr_refreshes=sup.get("qr_refreshes"),
            next_action=sup.get("next_action"),
            next_action_at=_ts(sup.get("next_action_at")),
            online_since=_ts(sup.get("online_since")),
            offline_history=json.dumps(sup.get("offline_history") or []),
            paused=bool(sup.get("paused")),
            paused_reason=sup.get("paused_reason"),
        )
        return self._adopt_loaded(loaded, now, repairs)

    def _adopt_loaded(
        self,
        row: LoadedRow,
        now: float,
        repairs: list[dict[str, Any]],
        beats: dict[float, float] | None = None,
    ) -> Account:
        """Take one account into memory and arm its next deadline.

        `beats` interns heartbeat times during a load: the database keeps whole seconds, so
        thousands of accounts share each value (one float object each instead of one per
        account: 24 MB at a million).
        """
        status = STATE_BY_VALUE.get(row.status) or State(row.status)  # the latter raises
        beat = row.last_heartbeat_at
        if beats is not None and beat is not None:
            beat = beats.setdefault(beat, beat)
        acc = Account(
            id=row.id,
            tenant_id=sys.intern(row.tenant_id),
            wework_guid=row.wework_guid,
            status=status,
            entered_at=now,
            last_heartbeat=beat,
        )
        self.counts[status] += 1
        self.mass.add(acc.tenant_id)
        if row.has_supervision and row.paused and row.paused_reason:
            self.paused_reasons[acc.id] = str(row.paused_reason)
        if row.has_supervision and row.s_status == row.status:
            acc.entered_at = row.entered_at or now
            acc.attempts = int(row.attempts or 0)
            acc.qr_refreshes = int(row.qr_refreshes or 0)
            # Online since it entered online, usually: then one float object for both.
            since = row.online_since
            acc.online_since = acc.entered_at if since == row.entered_at else since
            acc.offline_history = _history(row.offline_history)
            acc.paused = bool(row.paused)
            acc.next_action = row.next_action
            acc.next_action_at = row.next_action_at
        else:
            # New to us, or its status was changed behind our back: supervise it as if it had
            # just entered its state, and write that down so a restart agrees.
            if row.has_supervision:
                acc.attempts = int(row.attempts or 0)
                acc.paused = bool(row.paused)
            action = self.planner.entry_action(acc, status, now)
            acc.next_action = action.kind if action else None
            acc.next_action_at = action.at if action else None
            if status is not State.created:
                repairs.append(self._supervision_row(acc))
        # Published once complete: the side loop may read it the moment it is in the dict.
        self.accounts[acc.id] = acc
        self.by_guid[acc.wework_guid] = acc.id
        self._arm(acc, now, restoring=True)
        return acc

    def _arm(self, acc: Account, now: float, *, restoring: bool = False) -> None:
        """Put the account's next action into the deadline queue."""
        if acc.status is State.online:
            last = acc.last_heartbeat or acc.entered_at
            due = last + self.cfg.heartbeat_timeout
            if restoring:
                # Start-up grace: the daemon was not listening while it was down, so a missing
                # heartbeat is our outage, not the account's.
                due = max(due, now + self.startup_grace)
            self.runner.cancel(acc.id)
            self.runner.check(acc, due)
            return
        self.checks.discard(acc)
        if acc.next_action and acc.next_action_at is not None:
            self.runner.set(acc.id, acc.next_action_at, acc.next_action)
        else:
            self.runner.cancel(acc.id)

    def _supervision_row(self, acc: Account) -> dict[str, Any]:
        return {
            "account_id": acc.id,
            "status": str(acc.status),
            "entered_at": to_db_time(acc.entered_at),
            "attempts": acc.attempts,
            "qr_refreshes": acc.qr_refreshes,
            "next_action": acc.next_action,
            "next_action_at": to_db_time(acc.next_action_at),
            "online_since": to_db_time(acc.online_since),
            "offline_history": list(acc.offline_history),
            "paused": acc.paused,
            "paused_reason": self.paused_reasons.get(acc.id) if acc.paused else None,
            "last_log_id": None,
            "epoch": 0,
            "updated_at": to_db_time(self.clock.now()),
        }

    def adopt_new(self, rows: Sequence[AccountRow]) -> int:
        """Take over rows created by other services since the last poll; start them."""
        now = self.clock.now()
        added = 0
        for row in rows:
            acc = self.accounts.get(row.id)
            if acc is None:
                acc = self._adopt(row, now, [])
                added += 1
            pending = self.deadlines.get(acc.id)
            if acc.status is State.created and (pending is None or pending[1] != START):
                self.runner.set(acc.id, now, START)
        return added

    def forget(self, account_ids: Sequence[str]) -> None:
        """Rows deleted by other services: stop supervising them."""
        for account_id in account_ids:
            acc = self.accounts.pop(account_id, None)
            if acc is None:
                continue
            self.by_guid.pop(acc.wework_guid, None)
            self.counts[acc.status] -= 1
            self.mass.remove(acc.tenant_id)
            self.runner.cancel(account_id)
            self.checks.discard(acc)
            self._dirty.pop(account_id, None)
            self.paused_reasons.pop(account_id, None)
            self.shown_qr.pop(account_id, None)
            log.info("account %s was deleted from the database; no longer supervised", account_id)

    # ---------------------------------------------------------------- Planner (for the door)

    def now(self) -> float:
        return self.clock.now()

    def lookup(self, account_id: str) -> Account | None:
        return self.accounts.get(account_id)

    def refresh(self, acc: Account | None, account_id: str, row: AccountRow | None) -> None:
        """After a lost compare-and-set: take the database's word for the status."""
        if row is None:
            self.forget([account_id])
            return
        if acc is None:
            self._adopt(row, self.clock.now(), [])
            return
        new = State(row.status)
        if new is not acc.status:
            # Whatever moved it knows the QR it shows, if any; we do not.
            self.shown_qr.pop(acc.id, None)
            now = self.clock.now()
            with self.view_lock:
                self.counts[acc.status] -= 1
                self.counts[new] += 1
                acc.status = new
                acc.entered_at = now
                acc.version += 1
                action = self.planner.entry_action(acc, new, now)
                acc.next_action = action.kind if action else None
                acc.next_action_at = action.at if action else None
                self._arm(acc, now)

    def plan(
        self, acc: Account, change: Change, new_state: State, now: float
    ) -> Planned | Redirect | Repeat:
        return self.planner.plan(acc, change, new_state, now)

    def after_commit(self, acc: Account, change: Change, planned: Planned, now: float) -> None:
        effects: Effects = planned.context
        old = acc.status
        time_in_old = max(0.0, now - acc.entered_at)
        new = planned.new_state
        action: Action | None = effects.action
        with self.view_lock:
            self.counts[old] -= 1
            self.counts[new] += 1
            acc.status = new
            acc.entered_at = now
            acc.attempts = effects.attempts
            acc.qr_refreshes = effects.qr_refreshes
            acc.online_since = effects.online_since
            acc.offline_history = effects.offline_history
            acc.version += 1
            acc.next_action = action.kind if action else None
            acc.next_action_at = action.at if action else None
            if new is State.online:
                acc.last_heartbeat = now
            self._arm(acc, now)
        if new is State.waiting_qr and (code := planned.request.fields.get("login_qr_code")):
            self.shown_qr[acc.id] = hash(code)
        elif old is State.waiting_qr or new is State.waiting_qr:
            self.shown_qr.pop(acc.id, None)
        if effects.call is not None:
            self.calls.queue(effects.call, acc.id)
        if old is State.recovering:
            self._slot_freed()
        dropped = change.trigger in (Trigger.heartbeat_lost, Trigger.logged_out)
        if new is State.offline and dropped and self.mass.record_drop(acc.tenant_id, now, acc.id):
            log.warning(
                "mass_offline: tenant %s lost many accounts within %gs; recovery paused %gs",
                acc.tenant_id,
                self.cfg.mass_offline_window,
                self.cfg.mass_offline_cooldown,
            )
            group_event = GroupEvent(
                "mass_offline", acc.tenant_id, now, now + self.cfg.mass_offline_cooldown
            )
            for group_listener in self.group_listeners:
                group_listener(group_event)
        if self.listeners:
            event = TransitionEvent(
                acc,
                old,
                new,
                change.trigger,
                planned.request.reason,
                change.operator_id,
                effects.alert,
                now,
                time_in_old,
            )
            for listener in self.listeners:
                listener(event)

    # ---------------------------------------------------------------- deadlines

    def _on_expired(self, expired: list[Account]) -> None:
        """Heartbeat checks that found no heartbeat within the timeout (`HeartbeatChecks`
        re-armed the rest): excused by a stall or outage, or on to the re-check."""
        now = self.clock.now()
        timeout = self.cfg.heartbeat_timeout
        stale: list[Account] = []
        for acc in expired:
            last = max(acc.last_heartbeat or 0.0, acc.entered_at)
            if self.outage is not None and (
                later := self.outage.excuse_heartbeat(last, timeout, now)
            ):
                self.runner.check(acc, later)
            else:
                stale.append(acc)
        if stale:
            self._queue_stale(stale)

    async def _on_due(self, due: list[tuple[str, str]]) -> None:
        now = self.clock.now()
        for account_id, kind in due:
            acc = self.accounts.get(account_id)
            if acc is None:
                continue
            if kind == TIMEOUT:
                if self.outage is not None and (
                    later := self.outage.excuse_deadline(acc.next_action_at or now, now)
                ):
                    self.runner.set(acc.id, later, TIMEOUT)
                    continue
                seconds = self.cfg.deadlines.get(str(acc.status), 0)
                cause = f"no progress in {acc.status} within {seconds:g}s"
                details: dict[str, Any] | None = None
                if err := self._last_error.pop(acc.id, None):
                    # The worker's message (URL, account id, OS error) is long: in change_reason
                    # (VARCHAR(255), clipped) it pushed out the "; next: …" decision, which is
                    # what an operator most needs. The full text goes to error_details instead.
                    cause += " (the last worker call failed)"
                    details = {"error_details": f"last worker error: {err}"}
                self._fire(
                    Change(acc.id, Trigger.timeout, cause, data=details, expect_state=acc.status),
                    retry=TIMEOUT,
                )
            elif kind in (RECOVER, RETRY_ERROR):
                self._try_recover(acc, kind, now)
            elif kind == FAIL:
                why, alert = self._why_fail(acc, now)
                data: dict[str, Any] = {"error": alert, "alert": alert}
                if alert == ALERT_QR_NOT_SCANNED:
                    data["needs_human"] = True  # a QR nobody scans is never retried unattended
                self._fire(
                    Change(acc.id, Trigger.fail, why, data=data, expect_state=acc.status),
                    retry=FAIL,
                )
            elif kind == START:
                self._fire(
                    Change(
                        acc.id, Trigger.start, "new account picked up", expect_state=State.created
                    ),
                    retry=START,
                )

    def _queue_stale(self, stale: list[Account]) -> None:
        """Hand expired heartbeats to the re-check tasks, a mass event's apart from the rest.

        A mass event is many deadlines at (nearly) the same instant: at least `MASS_EVENT`
        accounts whose deadlines share one `MASS_SLICE` of time. Counting per slice rather
        than per round keeps everyone else out of it even when the runner lags behind and a
        round holds a second's worth of ordinary expiries.
        """
        slices = [int(max(a.last_heartbeat or 0.0, a.entered_at) / MASS_SLICE) for a in stale]
        crowd = Counter(slices)
        mass: list[Account] = []
        rest: list[Account] = []
        for acc, k in zip(stale, slices, strict=True):
            (mass if crowd[k] >= MASS_EVENT else rest).append(acc)
        # The database re-check runs in tasks of its own: awaited here, a mass event's
        # re-checks (one query per round) held up every later deadline of everyone else.
        if mass:
            self._stale_mass.append(mass)
            self._stale_wakeups[1].set()
        if rest:
            self._stale_small.append(rest)
            self._stale_wakeups[0].set()

    @property
    def busy(self) -> bool:
        """Deadlines being handled or heartbeat losses being re-checked (tests settle on it)."""
        return (
            self.runner.busy
            or bool(self._stale_small or self._stale_mass)
            or self._small_checking
            or self._mass_checking
        )

    async def _check_stale(self, mass: bool) -> None:
        """Re-check and fire the heartbeat losses of small rounds, or of a mass event's.

        Two tasks, one each: in one task, a small round that came due while a mass event's
        round was being re-checked (5,000 accounts in one query) waited for that query, up to
        0.25 s of another account's detection delay at a million accounts.
        """
        rounds = self._stale_mass if mass else self._stale_small
        wakeup = self._stale_wakeups[mass]
        while True:
            if not rounds:
                wakeup.clear()
                await wakeup.wait()
                continue
            stale = rounds.popleft()
            # Several rounds of a mass event in one re-check: fewer round trips.
            while mass and rounds and len(stale) < MASS_CHECK:
                stale += rounds.popleft()
            if mass:
                self._mass_checking = True
            else:
                self._small_checking = True
            try:
                await self._heartbeat_lost(stale, self.clock.now(), bulk=mass)
            except Exception:  # boundary: one bad round must not stop detection for everyone
                log.exception("heartbeat-loss check of %d accounts failed", len(stale))
            finally:
                if mass:
                    self._mass_checking = False
                else:
                    self._small_checking = False

    def _try_recover(self, acc: Account, kind: str, now: float) -> None:
        if acc.paused:
            return
        cooldown_end = self.mass.cooldown_until(acc.tenant_id, now)
        if cooldown_end is not None:
            self.runner.set(acc.id, cooldown_end + self.rng.uniform(0, 5), kind)
            return
        # In flight = accounts in `recovering` plus recover changes not yet committed: derived
        # from the states, so it stays right across restarts and outside status changes.
        in_flight = self.counts[State.recovering] + self._recover_pending
        if in_flight >= self.cfg.max_in_flight:
            # Wait in line instead of polling: a slot freeing up (`_slot_freed`) takes the next.
            self._recover_queue.append((acc.id, kind, acc.version))
            return
        if not self.limiter.try_take_token(now):
            later = max(self.limiter.next_available(now), now + 0.05)
            self.runner.set(acc.id, later + self.rng.uniform(0, 0.5), kind)
            return
        if kind == RETRY_ERROR:
            # The attempt counter is kept (RecoveryPolicy.after_error): an account that used up
            # its attempts gets exactly one try per error_retry_after, never a fast loop.
            cause = f"error retry after {self.cfg.error_retry_after:g}s"
            data: dict[str, Any] = {}
        else:
            # The policy counted this attempt when it scheduled it (attempts = the attempt's
            # number, see RecoveryPolicy.after_offline): +1 here logged "attempt 5/4".
            cause = f"attempt {acc.attempts}/{self.cfg.max_attempts} after backoff"
            data = {}
        self._recover_pending += 1
        fut = self._fire(Change(acc.id, Trigger.recover, cause, data=data, expect_state=acc.status))
        if fut is not None:
            fut.add_done_callback(self._recover_done)
        else:
            self._recover_pending -= 1

    def _why_fail(self, acc: Account, now: float) -> tuple[str, str]:
        """Why the recovery policy gave up, derived from the persisted counters (so a restart
        between the decision and the `fail` loses nothing): the reason and its alert."""
        cfg = self.cfg
        if acc.qr_refreshes > cfg.qr_max_refreshes:
            return f"QR not scanned after {cfg.qr_max_refreshes} refreshes", ALERT_QR_NOT_SCANNED
        if is_flapping(acc.offline_history, now, cfg.flap_count, cfg.flap_window):
            flaps = len(acc.offline_history)
            return f"flapping: {flaps} drops within {cfg.flap_window:g}s", ALERT_FLAPPING
        return f"gave up after {acc.attempts} recovery attempts", ALERT_RECOVERY_EXHAUSTED

    def _recover_done(self, _fut: asyncio.Future[ItemResult]) -> None:
        self._recover_pending -= 1
        self._slot_freed()

    def _slot_freed(self) -> None:
        """A recovery slot may be free: start the accounts waiting in line, oldest first."""
        now = self.clock.now()
        queue = self._recover_queue
        cap = self.cfg.max_in_flight
        while queue and self.counts[State.recovering] + self._recover_pending < cap:
            account_id, kind, version = queue.popleft()
            acc = self.accounts.get(account_id)
            if acc is not None and acc.version == version and acc.status in _RECOVERABLE:
                self._try_recover(acc, kind, now)

    async def _heartbeat_lost(self, stale: list[Account], now: float, *, bulk: bool) -> None:
        # Other services may write last_heartbeat_at directly: ask the database before declaring
        # the accounts stale (cost proportional to the expirations, by primary key).
        timeout = self.cfg.heartbeat_timeout
        try:
            beats = await self.repo.fresh_heartbeats([a.id for a in stale], now - timeout)
        except Exception:  # boundary: the DB is down; memory decides, the door will retry
            log.warning("could not re-check %d stale heartbeats in the database", len(stale))
            if self.outage is not None:
                self.outage.db_failed(now)  # the decisions below wait for it to come back
            beats = {}
        # ``bulk``: a mass event (a worker host died); its changes take the door's bulk lane so
        # that everyone else's still commit on time.
        for acc in stale:
            if acc.status is not State.online:
                continue  # moved on while waiting for the check (an event, an admin)
            # A heartbeat that arrived meanwhile (ingest), or one another service wrote.
            beat = max(acc.last_heartbeat or 0.0, acc.entered_at, beats.get(acc.id, 0.0))
            if beat + timeout > now:
                acc.last_heartbeat = max(acc.last_heartbeat or 0.0, beat)
                self.runner.check(acc, beat + timeout)
                continue
            if self.outage is not None and (
                later := self.outage.excuse_heartbeat(beat, timeout, now)
            ):
                self.runner.check(acc, later)
                continue
            last = acc.last_heartbeat
            ago = f"{now - last:.1f}s ago" if last else "never"
            self._fire(
                Change(
                    acc.id,
                    Trigger.heartbeat_lost,
                    f"no heartbeat within {timeout:g}s (last {ago})",
                    expect_state=State.online,
                    expect_version=acc.version,
                ),
                bulk=bulk,
                retry=HEARTBEAT,
            )

    def _fire(
        self, change: Change, *, bulk: bool = False, retry: str | None = None
    ) -> asyncio.Future[ItemResult] | None:
        """Fire a change decided by the daemon itself; outcomes other than applied are logged
        (``bulk``, a mass event's: not even that, and no future is returned).

        When the door is full (a database outage), a decision that came from a deadline is not
        dropped: ``retry`` names the deadline kind to re-arm a moment later.
        """
        try:
            if bulk:
                self.door.fire_unanswered(change)
                return None
            fut = self.door.fire(change)
        except Overloaded as exc:
            if retry is not None:
                later = self.clock.now() + exc.retry_after + self.rng.uniform(0, 1.0)
                if retry == HEARTBEAT:
                    if (acc := self.accounts.get(change.account_id)) is not None:
                        self.runner.check(acc, later)
                else:
                    self.runner.set(change.account_id, later, retry)
            log.debug("could not queue %s for %s: %s", change.trigger, change.account_id, exc)
            return None
        self._internal.add(fut)
        fut.add_done_callback(self._internal_done)
        return fut

    def _internal_done(self, fut: asyncio.Future[ItemResult]) -> None:
        self._internal.discard(fut)
        if not fut.cancelled() and fut.exception() is None:
            result = fut.result()
            if result is not ItemResult.APPLIED:
                log.debug("daemon change not applied: %s", result)

    # ---------------------------------------------------------------- worker calls

    def _worker_failed(self, call: str, account_id: str, exc: Exception) -> None:
        acc = self.accounts.get(account_id)
        if acc is None:
            return
        if isinstance(exc, WorkerTransient):
            # Transient: the state's deadline will fire and the recovery policy backs off.
            self._last_error[account_id] = str(exc)[:200]
            log.info("worker call %s for %s failed (transient): %s", call, account_id, exc)
            return
        if call == "resume" and getattr(exc, "status", None) == 404:
            self._fire(
                Change(
                    account_id,
                    Trigger.relogin_required,
                    "worker has no session to resume; a QR login is needed",
                    data={"daemon": True},
                    expect_state=State.recovering,
                )
            )
            return
        if call in ("open", "resume"):
            self._fire(
                Change(
                    account_id,
                    Trigger.fail,
                    f"worker rejected {call}: {exc}",
                    data={"error": f"worker_rejected: {exc}"},
                    expect_state=acc.status,
                )
            )

    # ---------------------------------------------------------------- IngestSink

    def record_heartbeats(
        self, account_ids: Sequence[str], ats: Sequence[datetime]
    ) -> list[ItemResult]:
        # Memory is authoritative for detection and the daemon's own clock decides staleness
        # (a worker's clock may be off); the database write is coalesced and rate-limited.
        # The hot loop of the ingest path (a million accounts beat every 15 s): one dict lookup
        # and two slot writes per item; every account of the batch shares the one `now` float.
        now = self.clock.now()
        dirty = self._dirty
        due_before = now - self.persist_interval
        results = [ItemResult.APPLIED] * len(account_ids)
        found = map(self.accounts.get, account_ids)
        for i, acc in enumerate(found):
            if acc is None:
                results[i] = ItemResult.UNKNOWN_ACCOUNT
                continue
            acc.last_heartbeat = now
            if acc.persisted_at <= due_before:
                dirty[acc.id] = now
                acc.persisted_at = now
        self.heartbeats_received += len(account_ids)
        return results

    async def apply_events(self, events: Sequence[WorkerEvent]) -> list[ItemResult]:
        results: list[ItemResult | None] = [None] * len(events)
        changes: list[tuple[int, Change]] = []
        for i, ev in enumerate(events):
            if ev.event not in WORKER_EVENTS:
                results[i] = ItemResult.ILLEGAL
            elif ev.account_id not in self.accounts:
                results[i] = ItemResult.UNKNOWN_ACCOUNT
            else:
                cause = f"worker event at {ev.at.isoformat(timespec='seconds')}"
                if ev.event == "fail" and ev.data.get("error"):
                    cause += f": {str(ev.data['error'])[:120]}"
                changes.append((i, Change(ev.account_id, Trigger(ev.event), cause, data=ev.data)))
        futures = self.door.fire_many([c for _, c in changes])
        done = await asyncio.gather(*futures)
        for (i, change), result in zip(changes, done, strict=True):
            acc = self.accounts.get(change.account_id)
            if (
                result is ItemResult.ILLEGAL
                and acc is not None
                and _destination(change.trigger) is acc.status
            ):
                result = ItemResult.DUPLICATE  # e.g. `verified` repeated while already online
            results[i] = result
        return [r if r is not None else ItemResult.ILLEGAL for r in results]

    # ---------------------------------------------------------------- heartbeats to the DB

    async def flush_heartbeats(self, *, force: bool = False) -> int:
        """Write the coalesced heartbeats to last_heartbeat_at; returns the rows written.

        Takes the oldest `FLUSH_SLICE` accounts off the queue at a time, one repository call
        each, up to as many as were queued when it began (newer ones wait for the next flush):

        - the repository groups a call's accounts by second before its first await, so one
          call for a million accounts held the event loop for about a second; a slice is
          milliseconds, and each statement's round trip lets the rest of the daemon run;
        - the queue is never swapped for a fresh dict, so a flush that the database makes slow
          does not keep a second million-entry dict alive beside the one filling up, and a
          heartbeat arriving meanwhile coalesces with the one still queued;
        - while a mass event is being committed it stops between slices (`_flush_gives_way`),
          except at shutdown (``force``).
        """
        dirty = self._dirty
        budget = len(dirty)
        if not budget:
            return 0
        started = time.perf_counter()
        written = 0
        piece: dict[str, float] = {}
        try:
            while budget > 0 and dirty:
                if not force and self._flush_gives_way():
                    break  # the rest stays queued, oldest first, for a later flush
                piece = dict(itertools.islice(dirty.items(), min(budget, FLUSH_SLICE)))
                for account_id in piece:
                    del dirty[account_id]
                budget -= len(piece)
                async with self.lane.bulk_step():
                    rows = await self.repo.write_heartbeats(piece)
                written += rows
                self.heartbeats_persisted += rows  # as it happens: a flush can take a while
                piece = {}
        except BaseException as exc:
            # Keep the failed slice for the next flush; rewriting a row that did get written
            # is harmless: the write never moves it back.
            self._requeue(piece)
            if isinstance(exc, Exception) and self.on_db_error is not None:
                self.on_db_error("platform")
            raise
        if self.on_db_time is not None:
            self.on_db_time("platform", "heartbeat_flush", time.perf_counter() - started)
        return written

    async def fold_journal(self, *, force: bool = False) -> int:
        """Fold the supervision journal into accountd_supervision; the journal rows folded.

        Slice by slice, each a short transaction; like the heartbeat flush it stops while a
        mass event is being committed (`_flush_gives_way`), except at start-up and shutdown
        (``force``): the journal exists to keep that work out of the mass event's way.
        """
        total = 0
        while force or self.door.journal_active:
            if not force and self._flush_gives_way():
                break
            started = time.perf_counter()
            async with self.lane.bulk_step():
                folded = await self.door.fold_journal(JOURNAL_SLICE)
            if self.on_db_time is not None:
                self.on_db_time("platform", "journal_fold", time.perf_counter() - started)
            if not folded:
                break
            total += folded
        return total

    @property
    def mass_under_way(self) -> bool:
        """A mass event's heartbeat losses are being re-checked, wait in the door's bulk lane or
        are being committed (each of these alone can be empty for a moment between rounds)."""
        return (
            bool(self._stale_mass)
            or self._mass_checking
            or self.door.bulk_pending > 0
            or self.door.bulk_in_flight > 0
        )

    def _flush_gives_way(self) -> bool:
        """Whether the flush stops here for a mass event, for at most one `persist_interval`.

        Both want the same event loop and the same database, and the status changes matter
        more: at a million accounts the flush took 13 % of the loop, and its 20,000-25,000
        rows a second about half of one core of the database server (the batched ceiling is
        about 44,000 rows/s), which a 100,000-account mass event then did not get. Holding it
        costs no memory (a queued heartbeat coalesces with the next) and leaves
        ``last_heartbeat_at`` at most one more interval behind. Detection decides from memory;
        after a restart, which reads the column, the start-up grace covers the lag.
        """
        if not self.mass_under_way:
            if self._flush_held_since is not None:
                log.info("heartbeat flush resumes: the mass event is committed")
                self._flush_held_since = None
            return False
        now = time.monotonic()
        if self._flush_held_since is None:
            self._flush_held_since = now
            log.info(
                "heartbeat flush gives way to a mass event for at most %gs (%d heartbeats queued)",
                self.persist_interval,
                len(self._dirty),
            )
        return now - self._flush_held_since < self.persist_interval

    def _requeue(self, beats: dict[str, float]) -> None:
        dirty = self._dirty
        for account_id, ts in beats.items():
            if dirty.get(account_id, 0.0) < ts:  # a newer heartbeat queued meanwhile wins
                dirty[account_id] = ts

    async def poll_db_heartbeats(self, since: float) -> float:
        """Pick up heartbeats other services wrote to last_heartbeat_at; return the watermark.

        Reads rows at or after `since` in pages of `POLL_PAGE` (at most `POLL_MAX` a call). At a
        million accounts our own flush writes tens of thousands of rows a second, and reading
        them back as one 100,000-row result held the event loop for half a second every poll
        (accountctl and /metrics waited behind it); a page is a few milliseconds, and every page
        is a database round trip where the rest of the daemon gets its turn. Each call starts
        again at the watermark's second, so rows written later within that second are not lost.

        While a mass event is being committed it reads nothing, like the flush
        (`_flush_gives_way`): at a million accounts its pages were 3 % of the event loop then,
        when the loop was what the mass event waited for. The next poll reads on from the same
        watermark, and the re-check before any heartbeat loss reads the database anyway.
        """
        if self._flush_gives_way():
            return since
        start = to_db_time(since) or datetime.min
        mark, after_id = start, ""
        newest = since
        accounts = self.accounts
        for _ in range(POLL_MAX // POLL_PAGE):
            async with self.lane.bulk_step():
                rows = await heartbeats_after(self.repo.engine, mark, after_id, POLL_PAGE)
                for account_id, ts in rows:
                    acc = accounts.get(account_id)
                    if acc is not None and (acc.last_heartbeat or 0.0) < ts:
                        acc.last_heartbeat = ts
            if rows:
                after_id, newest = rows[-1]
                mark = to_db_time(newest) or start
            if len(rows) < POLL_PAGE:
                break
        return max(since, newest)

    # ---------------------------------------------------------------- admin helpers

    def find(self, ref: str) -> Account | None:
        """An account by id or wework_guid."""
        acc = self.accounts.get(ref)
        if acc is None:
            # One get, not `in` then `[]`: the side loop calls this while rows come and go.
            account_id = self.by_guid.get(ref)
            acc = self.accounts.get(account_id) if account_id is not None else None
        return acc

    def snapshot_counts(self) -> dict[str, int]:
        return {str(s): self.counts[s] for s in State}

    async def set_paused(self, acc: Account, paused: bool, reason: str | None = None) -> bool:
        """Pause (maintenance) or resume one account; False when nothing changed.

        Paused means no automatic recovery and no alerts; the status itself does not change and
        worker events still apply. The flag is written to accountd_supervision (so a restart
        keeps it) by the door's committer, between batches: the one writer of supervision state,
        so no transition planned with the old flag can commit after it. Resuming re-arms the
        recovery of an offline or error account after the usual backoff.
        """
        return await self.door.exclusive(lambda: self._apply_pause(acc, paused, reason))

    async def _apply_pause(self, acc: Account, paused: bool, reason: str | None) -> bool:
        if acc.paused == paused and (not paused or self.paused_reasons.get(acc.id) == reason):
            return False
        now = self.clock.now()
        recovery = (RECOVER, RETRY_ERROR)
        next_action, next_action_at = acc.next_action, acc.next_action_at
        if paused and next_action in recovery:
            next_action = next_action_at = None
        elif not paused and acc.status in _RECOVERABLE and next_action in (None, *recovery):
            saved = acc.paused
            acc.paused = False  # _entry_action mutes recovery of paused accounts
            action = self.planner.entry_action(acc, acc.status, now)
            acc.paused = saved
            next_action = action.kind if action else None
            next_action_at = action.at if action else None
        row = self._supervision_row(acc)
        row.update(
            paused=paused,
            paused_reason=reason[:255] if paused and reason else None,
            next_action=next_action,
            next_action_at=to_db_time(next_action_at),
        )
        # Not ours to touch outside a transition: the door's last log row and the epoch.
        del row["last_log_id"], row["epoch"]
        await self.door.save_supervision([row])
        # Written: now memory follows.
        with self.view_lock:
            acc.paused = paused
            if paused and reason:
                self.paused_reasons[acc.id] = reason[:255]
            else:
                self.paused_reasons.pop(acc.id, None)
            acc.next_action, acc.next_action_at = next_action, next_action_at
            self._arm(acc, now)
        log.info("account %s %s: %s", acc.id, "paused" if paused else "resumed", reason or "-")
        return True


def _history(text: str | None) -> tuple[float, ...]:
    """``offline_history`` from its JSON text; ``[]`` (nearly every row) costs no parse."""
    if not text or text == "[]":
        return ()
    return tuple(float(x) for x in json.loads(text))


def _ts(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return from_db_time(value)
    return float(value)


_RECOVERABLE = frozenset({State.offline, State.error})

# Where each trigger (but `force`) leads, from the one table: to tell a repeated event
# (`verified` while already online) from a genuinely illegal one.
_DEST: dict[Trigger, State] = {
    Trigger(row["trigger"]): State(row["dest"])
    for row in TRANSITIONS
    if row["trigger"] != Trigger.force.value
}


def _destination(trigger: Trigger) -> State | None:
    return _DEST.get(trigger)
