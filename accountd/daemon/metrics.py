"""Prometheus metrics (BRIEF §6): what the daemon is doing, readable by the operator's Prometheus.

`Metrics` is one custom collector registered on a `CollectorRegistry` that the caller passes in
(the daemon makes one per process, each test its own), in the manner of prometheus/client_python:
no module-level registry and no global switches. Every series is produced at scrape time from
plain Python state, which keeps both the update path and the scrape cheap:

* Counters and histograms that follow transitions (`accountd_transitions_total`,
  `accountd_state_duration_seconds`, `accountd_recoveries_total`) are updated by
  `on_transition`, a supervisor listener that runs in the committer task after each commit:
  a dict increment and a bisect, nothing that allocates per account.
* Gauges are read from what the supervisor already keeps: `accountd_accounts{state}` from
  ``Supervisor.counts`` (nine numbers, not a walk over the accounts).
* `accountd_heartbeat_age_seconds` describes *now*, so it cannot be counted incrementally
  without a hook in the heartbeat hot path. A background refresh recomputes it every
  ``[metrics] refresh_interval`` seconds from at most ``heartbeat_sample`` accounts (an evenly
  spaced sample whose offset rotates; the buckets are scaled to the exact number of online
  accounts), and the scrape serves the last result. The cost is bounded per refresh and the
  scrape does not depend on the number of accounts at all.
* `accountd_db_up{database}` combines a periodic ``SELECT 1`` per database with what the door
  (platform) and the outbox (core, analytics) last saw; `accountd_db_latency_seconds` is fed by
  timing hooks on the door's commits, the heartbeat flushes, the load and the pings.

Series are never labelled by account: the largest label set is the transition table, and the
per-tenant series (``[metrics] per_tenant``) grow with tenants, not accounts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from accountd.adapters.db import DATABASE_KEYS
from accountd.daemon.priority import AdminLane
from accountd.daemon.runtime_metrics import LoopLag
from accountd.errors import DatabaseUnavailable
from accountd.statemachine import Account, State, Trigger, all_pairs, is_legal, next_state

if TYPE_CHECKING:
    from accountd.adapters.db import Databases
    from accountd.daemon.clock import Clock
    from accountd.daemon.outbox import Outbox
    from accountd.daemon.supervisor import Supervisor, TransitionEvent
    from accountd.settings import MetricsSettings

log = logging.getLogger(__name__)

# Bucket bounds, in seconds. Heartbeats arrive every 15 s and the default timeout is 45 s, so the
# age buckets are dense up to a minute; state durations span a QR scan (seconds) to a week online.
HEARTBEAT_AGE_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 300, 600)
STATE_DURATION_BUCKETS: tuple[float, ...] = (
    1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 10800, 21600, 43200, 86400, 259200, 604800,
)  # fmt: skip
DB_LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)  # fmt: skip

# How a stay in `recovering` ended (accountd_recoveries_total{outcome}); see `recovery_outcome`.
RECOVERY_OUTCOMES: tuple[str, ...] = ("success", "relogin", "failed", "error", "forced")
# The levels of monitor_analytics.system_alerts.alert_level (the seed's ENUM).
ALERT_LEVELS: tuple[str, ...] = ("info", "warning", "error", "critical")
# Operations timed into accountd_db_latency_seconds, and the database each one touches.
DB_OPERATIONS: tuple[tuple[str, str], ...] = (
    ("platform", "transition"),
    ("platform", "heartbeat_flush"),
    ("platform", "journal_fold"),
    ("platform", "load"),
    *((key, "ping") for key in DATABASE_KEYS),
)
PING_TIMEOUT = 5.0

DbTimer = Callable[[str, str, float], None]


class AlertCounts(Protocol):
    """What the alert manager exposes: active alerts per level (`accountd.daemon.alerts`)."""

    def active_counts(self) -> Mapping[str, int]: ...


def recovery_outcome(new: State, trigger: Trigger) -> str:
    """How a recovery attempt ended, given where the account went from `recovering`.

    ``success``: the session resumed (``recovered`` → online). ``relogin``: it could not resume
    and a QR login began (``relogin_required`` → initializing, or a ``qr_ready`` straight to
    waiting_qr). ``failed``: the attempt timed out or the session was logged out (→ offline; the
    policy backs off and tries again). ``error``: the worker failed it or the policy gave up
    (→ error). ``forced``: an admin moved the account out of recovering.
    """
    if trigger is Trigger.force:
        return "forced"
    if new is State.online:
        return "success"
    if new is State.error:
        return "error"
    if new is State.offline:
        return "failed"
    return "relogin"


def build_version() -> str:
    try:
        return metadata.version("accountd")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


class _Histogram:
    """A cumulative histogram as plain numbers; `HistogramMetricFamily` renders it."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus `le`).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self, scale: float = 1.0) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            le = "+Inf" if bound == math.inf else repr(float(bound))  # Go style: 1.0, 0.005
            out.append((le, float(round(running * scale))))
        return out


class Metrics(Collector):
    """All of accountd's series, collected at scrape time from the daemon's own state."""

    def __init__(
        self,
        registry: CollectorRegistry,
        clock: Clock,
        settings: MetricsSettings,
        *,
        is_ready: Callable[[], bool] = lambda: False,
        alerts: Callable[[], AlertCounts | None] = lambda: None,
        version: str | None = None,
        lane: AdminLane | None = None,
    ) -> None:
        self.registry = registry
        # The periodic refresh is bulk work: it gives way to admin requests.
        self.lane = lane if lane is not None else AdminLane()
        self.clock = clock
        self.settings = settings
        self.per_tenant = settings.per_tenant
        self.is_ready = is_ready
        self.alerts = alerts
        self.version = version or build_version()
        self.supervisor: Supervisor | None = None
        self.outbox: Outbox | None = None
        self.databases: Databases | None = None
        self.stopping = False

        # Pre-seeded with every legal edge so that rate() sees a series from its first sample;
        # `force` edges (any → any) appear when they happen.
        self.transitions: dict[tuple[str, str, str], int] = {
            (str(s), str(next_state(s, t)), str(t)): 0
            for s, t in all_pairs()
            if t is not Trigger.force and is_legal(s, t)
        }
        self.state_duration = {str(s): _Histogram(STATE_DURATION_BUCKETS) for s in State}
        self.recoveries = dict.fromkeys(RECOVERY_OUTCOMES, 0)
        self.db_latency = {op: _Histogram(DB_LATENCY_BUCKETS) for op in DB_OPERATIONS}
        self.db_errors = dict.fromkeys(DATABASE_KEYS, 0)  # besides the door's own count
        self.ping_ok: dict[str, bool | None] = dict.fromkeys(DATABASE_KEYS, None)
        self.tenant_transitions: dict[tuple[str, str], int] = {}
        # Results of the last refresh (heartbeat ages, per-tenant counts).
        # (histogram, scale) as one value: a scrape on the side loop reads both at once.
        self._ages = (_Histogram(HEARTBEAT_AGE_BUCKETS), 1.0)
        self.tenant_accounts: dict[tuple[str, str], int] = {}
        self._sample_offset = 0
        self._started = time.monotonic()
        self._refresh_task: asyncio.Task[None] | None = None
        self._ping_task: asyncio.Task[None] | None = None
        self.loop_lag = LoopLag()
        registry.register(self)

    # ---------------------------------------------------------------- wiring

    def attach(self, *, supervisor: Supervisor | None = None, outbox: Outbox | None = None) -> None:
        """Connect the parts as the daemon builds them; scrapes before that report zeros."""
        if outbox is not None:
            self.outbox = outbox
            outbox.on_error = self.db_error
        if supervisor is not None:
            self.supervisor = supervisor
            supervisor.listeners.append(self.on_transition)
            supervisor.on_db_time = self.observe_db
            supervisor.on_db_error = self.db_error
            supervisor.door.on_db_time = self.observe_db

    async def start(self) -> None:
        """Start the periodic refresh and the loop-lag timer, on the main loop (stopped by
        `stop`)."""
        assert self._refresh_task is None
        self._refresh_task = asyncio.create_task(
            self._refresh_loop(), name="accountd-metrics-refresh"
        )
        self.loop_lag.start()

    async def stop(self) -> None:
        self.loop_lag.stop()
        await _cancel(self._refresh_task)
        self._refresh_task = None

    async def watch(self, databases: Databases) -> None:
        """Ping ``databases`` now and then every ``ping_interval`` (stopped by `unwatch`, which
        must run before the engines are disposed: a ping after that would open a new pool)."""
        assert self._ping_task is None
        self.databases = databases
        await self.ping_databases()
        self._ping_task = asyncio.create_task(self._ping_loop(), name="accountd-metrics-ping")

    async def unwatch(self) -> None:
        await _cancel(self._ping_task)
        self._ping_task = None

    @property
    def heartbeat_ages(self) -> _Histogram:
        """The last refresh's heartbeat-age histogram (of a sample above heartbeat_sample)."""
        return self._ages[0]

    def uptime(self) -> float:
        return time.monotonic() - self._started

    def mark_stopping(self) -> None:
        """Shutdown began: /readyz turns 503 so load balancers and probes look elsewhere."""
        self.stopping = True

    # ---------------------------------------------------------------- updates

    def on_transition(self, event: TransitionEvent) -> None:
        """Supervisor listener: called after every committed transition (committer task)."""
        old, new = str(event.old), str(event.new)
        key = (old, new, str(event.trigger))
        self.transitions[key] = self.transitions.get(key, 0) + 1
        self.state_duration[old].observe(event.time_in_old)
        if event.old is State.recovering:
            outcome = recovery_outcome(event.new, event.trigger)
            self.recoveries[outcome] += 1
        if self.per_tenant:
            tkey = (event.account.tenant_id, new)
            self.tenant_transitions[tkey] = self.tenant_transitions.get(tkey, 0) + 1

    def observe_db(self, database: str, operation: str, seconds: float) -> None:
        """Timing hook: one database operation took ``seconds``."""
        hist = self.db_latency.get((database, operation))
        if hist is None:
            hist = self.db_latency[(database, operation)] = _Histogram(DB_LATENCY_BUCKETS)
        hist.observe(seconds)

    def db_error(self, database: str) -> None:
        """A database operation failed (outbox write, heartbeat flush, ping)."""
        self.db_errors[database] = self.db_errors.get(database, 0) + 1

    # ---------------------------------------------------------------- periodic work

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # boundary: a failed refresh is logged; the next one tries again
                log.exception("metrics: refresh failed")
            await asyncio.sleep(self.settings.refresh_interval)

    async def refresh(self) -> None:
        """Recompute the heartbeat-age histogram (and per-tenant counts when enabled)."""
        async with self.lane.bulk_step():
            self.refresh_heartbeat_ages()
        if self.per_tenant:
            await self.refresh_tenants()

    def refresh_heartbeat_ages(self) -> None:
        sup = self.supervisor
        hist = _Histogram(HEARTBEAT_AGE_BUCKETS)
        if sup is None:
            self._ages = (hist, 1.0)
            return
        now = self.clock.now()
        accounts: Iterable[Account] = sup.accounts.values()
        total = len(sup.accounts)
        cap = self.settings.heartbeat_sample
        if total > cap:
            # Every `step`-th account, starting at a rotating offset: islice skips in C, so the
            # Python loop below runs over at most `cap` accounts whatever the total.
            step = math.ceil(total / cap)
            self._sample_offset = (self._sample_offset + 1) % step
            accounts = itertools.islice(sup.accounts.values(), self._sample_offset, None, step)
        online = State.online
        for acc in accounts:
            if acc.status is online:
                last = acc.last_heartbeat or acc.entered_at
                hist.observe(max(0.0, now - last))
        seen = hist.count
        exact = sup.counts[State.online]
        # Scale the sample to the exact number of online accounts; the +Inf bucket and _count
        # then agree with accountd_accounts{state="online"}.
        self._ages = (hist, exact / seen if seen and total > cap else 1.0)

    async def refresh_tenants(self, chunk: int = 20_000) -> None:
        """Accounts per (tenant, state): a full walk, in chunks that yield to the loop."""
        sup = self.supervisor
        if sup is None:
            return
        snapshot = list(sup.accounts.values())  # a C-level copy of references; stable to walk
        counts: dict[tuple[str, str], int] = {}
        for start in range(0, len(snapshot), chunk):
            for acc in snapshot[start : start + chunk]:
                key = (acc.tenant_id, str(acc.status))
                counts[key] = counts.get(key, 0) + 1
            await asyncio.sleep(0)
        self.tenant_accounts = counts

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.ping_interval)
            try:
                await self.ping_databases()
            except Exception:  # boundary: logged; the next round tries again
                log.exception("metrics: database ping round failed")

    async def ping_databases(self) -> None:
        """``SELECT 1`` on every database, concurrently; record up/down and the latency."""
        if self.databases is None:
            return
        await asyncio.gather(*(self._ping(key) for key in DATABASE_KEYS))

    async def _ping(self, key: str) -> None:
        assert self.databases is not None
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self.databases.ping(key), PING_TIMEOUT)
        except (DatabaseUnavailable, TimeoutError) as exc:
            if self.ping_ok[key] is not False:
                log.warning("metrics: database %s does not answer: %s", key, exc or "timeout")
            self.ping_ok[key] = False
            self.db_error(key)
            return
        if self.ping_ok[key] is False:
            log.info("metrics: database %s answers again", key)
        self.ping_ok[key] = True
        self.observe_db(key, "ping", time.perf_counter() - started)

    # ---------------------------------------------------------------- health

    def db_up(self, key: str) -> bool:
        """The last ping answered and the last real write to that database went through."""
        if self.ping_ok.get(key) is not True:
            return False
        if (
            key == "platform"
            and self.supervisor is not None
            and not self.supervisor.door.db_healthy
        ):
            return False
        return not (self.outbox is not None and not self.outbox.healthy.get(key, True))

    def not_ready(self) -> list[str]:
        """Why the daemon is not ready (empty: ready). Used by /readyz and accountd_ready."""
        if self.stopping:
            return ["shutting down"]
        reasons: list[str] = []
        if self.databases is None:
            reasons.append("databases not opened yet")
        else:
            for key in DATABASE_KEYS:
                ok = self.ping_ok[key]
                if ok is None:
                    reasons.append(f"database {key} not checked yet")
                elif not self.db_up(key):
                    reasons.append(f"database {key} unreachable")
        if self.supervisor is None or not self.supervisor.loaded:
            reasons.append("accounts not loaded yet")
        elif not self.is_ready():
            reasons.append("starting")
        return reasons

    # ---------------------------------------------------------------- Collector

    def describe(self) -> Iterable[Metric]:
        # Names only, so that the registry refuses a second collector with the same series.
        return [*self._families(empty=True), self.loop_lag.family()]

    def collect(self) -> Iterable[Metric]:
        # Scrapes run on the side loop's thread while the main thread changes these numbers.
        # Every dict the main thread may grow is copied in one C call (`list(d.items())`)
        # before it is walked; a value read mid-change is at most one event behind.
        return [*self._families(empty=False), self.loop_lag.family()]

    def _families(self, *, empty: bool) -> Iterator[Metric]:
        sup = self.supervisor
        counts: Mapping[State, int] = (
            sup.counts if sup is not None and not empty else dict.fromkeys(State, 0)
        )

        accounts = GaugeMetricFamily(
            "accountd_accounts", "Accounts per state (all nine states).", labels=["state"]
        )
        transitions = CounterMetricFamily(
            "accountd_transitions",
            "Committed status changes.",
            labels=["from_state", "to_state", "trigger"],
        )
        heartbeats = CounterMetricFamily(
            "accountd_heartbeats_received", "Heartbeat items received from workers."
        )
        ages = HistogramMetricFamily(
            "accountd_heartbeat_age_seconds",
            "Seconds since the last heartbeat of each online account (a snapshot, refreshed "
            "every refresh_interval; estimated from a sample above heartbeat_sample accounts).",
        )
        durations = HistogramMetricFamily(
            "accountd_state_duration_seconds",
            "Seconds spent in a state, observed when the account leaves it.",
            labels=["state"],
        )
        recoveries = CounterMetricFamily(
            "accountd_recoveries",
            "Ends of stays in recovering: success, relogin, failed, error, forced.",
            labels=["outcome"],
        )
        in_flight = GaugeMetricFamily(
            "accountd_recoveries_in_flight", "Accounts in recovering right now."
        )
        db_up = GaugeMetricFamily(
            "accountd_db_up", "1 when the database answers and the last write went through.",
            labels=["database"],
        )  # fmt: skip
        db_errors = CounterMetricFamily(
            "accountd_db_errors", "Failed database operations.", labels=["database"]
        )
        db_latency = HistogramMetricFamily(
            "accountd_db_latency_seconds",
            "Duration of database operations: transition commits, heartbeat flushes, load, ping.",
            labels=["database", "operation"],
        )
        alerts = GaugeMetricFamily(
            "accountd_alerts_active", "Active system alerts per level.", labels=["level"]
        )
        build = GaugeMetricFamily(
            "accountd_build_info", "Always 1; the version is the label.", labels=["version"]
        )
        ready = GaugeMetricFamily(
            "accountd_ready", "1 when databases are reachable and the accounts are loaded."
        )
        pending = GaugeMetricFamily(
            "accountd_transitions_pending", "Status changes queued at the door, not yet committed."
        )
        outbox_pending = GaugeMetricFamily(
            "accountd_outbox_pending",
            "Cross-database writes queued and not yet written.",
            labels=["database"],
        )
        outbox_dropped = CounterMetricFamily(
            "accountd_outbox_dropped", "Cross-database writes given up (full queue or refused)."
        )
        families: list[Metric] = [
            accounts, transitions, heartbeats, ages, durations, recoveries, in_flight, db_up,
            db_errors, db_latency, alerts, build, ready, pending, outbox_pending, outbox_dropped,
        ]  # fmt: skip
        tenant_accounts = GaugeMetricFamily(
            "accountd_tenant_accounts", "Accounts per tenant and state.", labels=["tenant", "state"]
        )
        tenant_transitions = CounterMetricFamily(
            "accountd_tenant_transitions",
            "Committed status changes per tenant, by destination state.",
            labels=["tenant", "to_state"],
        )
        if self.per_tenant:
            families += [tenant_accounts, tenant_transitions]
        if empty:
            yield from families
            return

        for state in State:
            accounts.add_metric([str(state)], counts[state])
        for (old, new, trigger), n in list(self.transitions.items()):
            transitions.add_metric([old, new, trigger], n)
        heartbeats.add_metric([], sup.heartbeats_received if sup is not None else 0)
        hb, scale = self._ages
        ages.add_metric([], hb.buckets(scale), sum_value=hb.total * scale)
        for state_name, hist in list(self.state_duration.items()):
            durations.add_metric([state_name], hist.buckets(), sum_value=hist.total)
        for outcome, n in list(self.recoveries.items()):
            recoveries.add_metric([outcome], n)
        in_flight.add_metric([], counts[State.recovering])
        door_errors = sup.door.stats.db_errors if sup is not None else 0
        for key in DATABASE_KEYS:
            db_up.add_metric([key], 1.0 if self.db_up(key) else 0.0)
            extra = door_errors if key == "platform" else 0
            db_errors.add_metric([key], self.db_errors.get(key, 0) + extra)
        for (database, operation), hist in list(self.db_latency.items()):
            db_latency.add_metric([database, operation], hist.buckets(), sum_value=hist.total)
        source = self.alerts()
        active = source.active_counts() if source is not None else {}
        for level in ALERT_LEVELS:
            alerts.add_metric([level], active.get(level, 0))
        build.add_metric([self.version], 1)
        ready.add_metric([], 0.0 if self.not_ready() else 1.0)
        pending.add_metric([], sup.door.pending if sup is not None else 0)
        if self.outbox is not None:
            for key in self.outbox.engines:
                outbox_pending.add_metric([key], self.outbox.pending(key))
        outbox_dropped.add_metric([], self.outbox.dropped if self.outbox is not None else 0)
        if self.per_tenant:
            for (tenant, state_name), n in list(self.tenant_accounts.items()):
                tenant_accounts.add_metric([tenant, state_name], n)
            for (tenant, new), n in list(self.tenant_transitions.items()):
                tenant_transitions.add_metric([tenant, new], n)
        yield from families


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
