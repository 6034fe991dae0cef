"""The monitoring tables: ``account_metrics`` snapshots and the daily ``performance_stats`` rollup.

Snapshots (every ``[monitoring] snapshot_interval`` seconds, 0 = off) write one row per account
and selected metric type into ``account_metrics``, all with the same ``recorded_at`` (UTC):

``heartbeat_age_seconds``  online accounts: seconds since the last heartbeat.
``online_seconds``         seconds the account was online during the interval (> 0 only).
``recoveries``             ``recovering → online`` in the interval (> 0 only).
``recovery_attempts``      entries into ``recovering`` in the interval (> 0 only).
``transitions``            status changes in the interval (> 0 only).

Interval counters come from the supervisor's transition listener, so a snapshot costs one pass
over the in-memory accounts plus the inserts, in chunks of ``snapshot_chunk`` rows, each its own
transaction (the event loop runs between chunks). Snapshots are samples: a chunk the database
refuses is logged and skipped, not queued (a queue of millions of rows during an outage would
eat the memory the alerts' outbox needs).

The rollup (once a day, after ``rollup_time`` UTC) computes per tenant and platform-wide
(``tenant_id`` NULL), from that day's ``account_status_logs``: ``availability_percent``,
``transitions``, ``recoveries``, ``recovery_attempts`` and ``mttr_seconds``; see `rollup_day`.
Partition upkeep is in `accountd.daemon.partition_upkeep`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    ColumnElement,
    String,
    and_,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    literal_column,
    select,
)
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from accountd.adapters.repository import to_db_time
from accountd.adapters.schema import (
    account_metrics,
    account_status_logs,
    performance_stats,
    wework_accounts,
)
from accountd.daemon import partition_upkeep
from accountd.daemon.alerts import AlertManager
from accountd.daemon.clock import Clock
from accountd.daemon.outbox import Outbox
from accountd.daemon.supervisor import Supervisor, TransitionEvent
from accountd.ids import uuid7
from accountd.settings import Settings
from accountd.statemachine import State

log = logging.getLogger(__name__)

Job = tuple[Callable[[], Awaitable[None]], float]

METRIC_TYPES: tuple[str, ...] = (
    "heartbeat_age_seconds",
    "online_seconds",
    "recoveries",
    "recovery_attempts",
    "transitions",
)
_UNITS: dict[str, str] = {
    "heartbeat_age_seconds": "s",
    "online_seconds": "s",
    "recoveries": "count",
    "recovery_attempts": "count",
    "transitions": "count",
}
ROLLUP_METRICS: tuple[str, ...] = (
    "availability_percent",
    "transitions",
    "recoveries",
    "recovery_attempts",
    "mttr_seconds",
)
# Days a rollup catches up after the daemon was down (older days are left to a manual run).
ROLLUP_CATCH_UP_DAYS = 7
_FOUR = Decimal("0.0001")


def _dec(value: float) -> Decimal:
    """DECIMAL(15,4) exactly: MySQL would round more digits with a warning."""
    return Decimal(repr(float(value))).quantize(_FOUR)


# ---------------------------------------------------------------------------------- snapshots


class Snapshots:
    """Counts per account between snapshots; writes them (and heartbeat ages) to account_metrics."""

    def __init__(
        self,
        supervisor: Supervisor,
        engine: AsyncEngine,
        clock: Clock,
        *,
        metrics: Sequence[str] = ("heartbeat_age_seconds", "online_seconds", "recoveries"),
        chunk: int = 1000,
    ) -> None:
        unknown = set(metrics) - set(METRIC_TYPES)
        if unknown:
            raise ValueError(f"unknown metric types {sorted(unknown)}; known: {METRIC_TYPES}")
        self.supervisor = supervisor
        self.engine = engine
        self.clock = clock
        self.metrics = tuple(metrics)
        self.chunk = chunk
        self.since = clock.now()
        self.written = 0
        self._online: dict[str, float] = defaultdict(float)
        self._counts: dict[str, Counter[str]] = {
            "recoveries": Counter(),
            "recovery_attempts": Counter(),
            "transitions": Counter(),
        }

    def on_transition(self, event: TransitionEvent) -> None:
        """Supervisor listener (committer task): counters only."""
        aid = event.account.id
        if event.old is State.online and "online_seconds" in self.metrics:
            # Only the part of the stretch inside the current interval.
            self._online[aid] += max(0.0, min(event.time_in_old, event.at - self.since))
        self._counts["transitions"][aid] += 1
        if event.new is State.recovering:
            self._counts["recovery_attempts"][aid] += 1
        if event.old is State.recovering and event.new is State.online:
            self._counts["recoveries"][aid] += 1

    def rows(self, now: float) -> Iterable[dict[str, Any]]:
        """This interval's rows (and reset the counters): a generator, consumed in chunks."""
        since, self.since = self.since, now
        online, self._online = self._online, defaultdict(float)
        counts = self._counts
        self._counts = {name: Counter() for name in counts}
        recorded_at = to_db_time(now)
        want = set(self.metrics)
        accounts = list(self.supervisor.accounts.values())

        def row(account_id: str, tenant: str, metric: str, value: float) -> dict[str, Any]:
            return {
                "id": uuid7(),
                "account_id": account_id,
                "metric_type": metric,
                "metric_value": _dec(value),
                "metric_unit": _UNITS[metric],
                "tags": {"tenant_id": tenant},
                "recorded_at": recorded_at,
            }

        for acc in accounts:
            is_online = acc.status is State.online
            if is_online and "heartbeat_age_seconds" in want:
                last = acc.last_heartbeat if acc.last_heartbeat is not None else acc.entered_at
                yield row(acc.id, acc.tenant_id, "heartbeat_age_seconds", max(0.0, now - last))
            if "online_seconds" in want:
                seconds = online.get(acc.id, 0.0)
                if is_online:
                    seconds += max(0.0, now - max(acc.entered_at, since))
                if seconds > 0:
                    yield row(acc.id, acc.tenant_id, "online_seconds", seconds)
            for metric in ("recoveries", "recovery_attempts", "transitions"):
                if metric in want:
                    n = counts[metric].get(acc.id, 0)
                    if n:
                        yield row(acc.id, acc.tenant_id, metric, n)

    async def snapshot(self) -> int:
        """Write one snapshot; return the number of rows written."""
        written = 0
        batch: list[dict[str, Any]] = []
        for r in self.rows(self.clock.now()):
            batch.append(r)
            if len(batch) >= self.chunk:
                written += await self._write(batch)
                batch = []
        if batch:
            written += await self._write(batch)
        self.written += written
        return written

    async def _write(self, batch: list[dict[str, Any]]) -> int:
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(account_metrics), batch)
        except (OperationalError, DBAPIError, OSError) as exc:
            log.warning(
                "snapshot: %d account_metrics rows not written: %s",
                len(batch),
                getattr(exc, "orig", exc),
            )
            return 0
        return len(batch)


# ---------------------------------------------------------------------------------- rollup


@dataclass(slots=True)
class DayStats:
    """One tenant's (or the platform's) day, in account-seconds and counts."""

    online_seconds: float = 0.0
    observed_seconds: float = 0.0
    transitions: int = 0
    recoveries: int = 0
    recovery_attempts: int = 0
    ttr_count: int = 0
    ttr_sum: float = 0.0
    ttr_min: float | None = None
    ttr_max: float | None = None

    @property
    def availability_percent(self) -> float | None:
        if self.observed_seconds <= 0:
            return None
        return 100.0 * self.online_seconds / self.observed_seconds

    @property
    def mttr_seconds(self) -> float | None:
        return self.ttr_sum / self.ttr_count if self.ttr_count else None

    def add(self, other: DayStats) -> None:
        self.online_seconds += other.online_seconds
        self.observed_seconds += other.observed_seconds
        self.transitions += other.transitions
        self.recoveries += other.recoveries
        self.recovery_attempts += other.recovery_attempts
        self._add_ttr(other.ttr_count, other.ttr_sum, other.ttr_min, other.ttr_max)

    def _add_ttr(self, n: int, total: float, low: float | None, high: float | None) -> None:
        if not n:
            return
        self.ttr_count += n
        self.ttr_sum += total
        self.ttr_min = low if self.ttr_min is None or low is None else min(self.ttr_min, low)
        self.ttr_max = high if self.ttr_max is None or high is None else max(self.ttr_max, high)


def _seconds(conn: AsyncConnection, start: Any, end: Any) -> ColumnElement[Any]:
    """``end - start`` in seconds, in the dialect's words."""
    if conn.dialect.name == "mysql":
        return func.timestampdiff(literal_column("SECOND"), start, end)
    # julianday() is a double of ~2.46e6 days: about 40 µs of noise; round it to milliseconds.
    return func.round((func.julianday(end) - func.julianday(start)) * 86400.0, 3)


def _instant(conn: AsyncConnection, value: dt.datetime) -> ColumnElement[Any]:
    """A naive UTC datetime as a SQL value comparable with the stored column.

    SQLite keeps datetimes as text; rows written with the server default have no fraction
    (``2025-01-02 00:00:00``) while SQLAlchemy's bind would add one (``.000000``), and the
    shorter string sorts first. A bare ``YYYY-MM-DD HH:MM:SS`` compares right with both forms.
    """
    if conn.dialect.name == "mysql":
        return literal(value)
    return literal(value.strftime("%Y-%m-%d %H:%M:%S"), String)


async def rollup_day(platform: AsyncEngine, day: dt.date) -> dict[str | None, DayStats]:
    """The day's figures per tenant, plus the platform (key None), from account_status_logs.

    - availability: online account-seconds / supervised account-seconds, where an account's
      day is cut into segments by its log rows (the status before its first row of the day is
      that row's ``old_status``; an account without rows that day spent it in the status it
      had next, i.e. the ``old_status`` of its first later row, else its current status).
      Time in ``created`` is not supervised time.
    - transitions: log rows of the day; recoveries: ``recovering → online``; recovery_attempts:
      entries into ``recovering``.
    - mean time to recover: for each return to ``online`` that day, the time since the account
      last left ``online`` (looking back before the day when the outage began earlier); a first
      login is no recovery. Rows are ordered by id (UUIDv7, commit order), not by the
      second-resolution ``created_at``.
    """
    lg, a = account_status_logs, wework_accounts
    start = dt.datetime(day.year, day.month, day.day)
    end = start + dt.timedelta(days=1)
    async with platform.connect() as conn:
        d0, d1 = _instant(conn, start), _instant(conn, end)
        in_day = and_(lg.c.created_at >= d0, lg.c.created_at < d1)
        r = (
            select(
                lg.c.account_id,
                lg.c.old_status,
                lg.c.new_status,
                lg.c.created_at,
                func.row_number().over(partition_by=lg.c.account_id, order_by=lg.c.id).label("rn"),
                func.lead(lg.c.created_at)
                .over(partition_by=lg.c.account_id, order_by=lg.c.id)
                .label("next_at"),
                func.max(case((lg.c.old_status == "online", lg.c.created_at)))
                .over(partition_by=lg.c.account_id, order_by=lg.c.id, rows=(None, 0))
                .label("left_online_at"),
            )
            .where(in_day)
            .subquery("r")
        )
        seg_end = func.coalesce(r.c.next_at, d1)
        first = and_(r.c.rn == 1, r.c.old_status.is_not(None), r.c.old_status != "created")
        online = case(
            (r.c.new_status == "online", _seconds(conn, r.c.created_at, seg_end)), else_=0
        ) + case(
            (and_(first, r.c.old_status == "online"), _seconds(conn, d0, r.c.created_at)),
            else_=0,
        )
        observed = case(
            (r.c.new_status != "created", _seconds(conn, r.c.created_at, seg_end)), else_=0
        ) + case((first, _seconds(conn, d0, r.c.created_at)), else_=0)
        l2 = account_status_logs.alias("l2")
        left_before = (
            select(func.max(l2.c.created_at))
            .where(
                l2.c.account_id == r.c.account_id,
                l2.c.old_status == "online",
                l2.c.created_at < d0,
            )
            .scalar_subquery()
        )
        returns = and_(r.c.new_status == "online", r.c.old_status != "online")
        ttr_start = case((r.c.left_online_at.is_not(None), r.c.left_online_at), else_=left_before)
        ttr = case((returns, _seconds(conn, ttr_start, r.c.created_at)))
        per_row = (
            select(
                a.c.tenant_id.label("tenant_id"),
                online.label("online"),
                observed.label("observed"),
                case(
                    (and_(r.c.old_status == "recovering", r.c.new_status == "online"), 1), else_=0
                ).label("recovered"),
                case((r.c.new_status == "recovering", 1), else_=0).label("attempt"),
                ttr.label("ttr"),
            )
            .select_from(r.join(a, a.c.id == r.c.account_id))
            .subquery("p")
        )
        p = per_row.c
        grouped = select(
            p.tenant_id,
            func.sum(p.online),
            func.sum(p.observed),
            func.count(),
            func.sum(p.recovered),
            func.sum(p.attempt),
            func.count(p.ttr),
            func.sum(p.ttr),
            func.min(p.ttr),
            func.max(p.ttr),
        ).group_by(p.tenant_id)
        stats: dict[str | None, DayStats] = defaultdict(DayStats)
        for row in (await conn.execute(grouped)).all():
            s = stats[row[0]]
            s.online_seconds += float(row[1] or 0)
            s.observed_seconds += float(row[2] or 0)
            s.transitions += int(row[3] or 0)
            s.recoveries += int(row[4] or 0)
            s.recovery_attempts += int(row[5] or 0)
            if row[6]:
                s._add_ttr(int(row[6]), float(row[7]), float(row[8]), float(row[9]))

        # Accounts with no row that day: the whole day in one status.
        later = (
            select(
                lg.c.account_id,
                lg.c.old_status,
                func.row_number().over(partition_by=lg.c.account_id, order_by=lg.c.id).label("rn"),
            )
            .where(lg.c.created_at >= d1)
            .subquery("later")
        )
        status = func.coalesce(later.c.old_status, a.c.status).label("st")
        quiet = (
            select(a.c.tenant_id, status, func.count())
            .select_from(a.outerjoin(later, and_(later.c.account_id == a.c.id, later.c.rn == 1)))
            .where(
                ~exists().where(lg.c.account_id == a.c.id, in_day),
                func.coalesce(a.c.created_at, d0) < d1,
            )
            .group_by(a.c.tenant_id, status)
        )
        for tenant, st, n in (await conn.execute(quiet)).all():
            if st == "created":
                continue
            s = stats[tenant]
            s.observed_seconds += 86400.0 * int(n)
            if st == "online":
                s.online_seconds += 86400.0 * int(n)
    platform_wide = DayStats()
    for s in stats.values():
        platform_wide.add(s)
    out: dict[str | None, DayStats] = dict(stats)
    out[None] = platform_wide
    return out


def stats_rows(day: dt.date, stats: Mapping[str | None, DayStats]) -> list[dict[str, Any]]:
    """``performance_stats`` rows for the day (availability/MTTR only where defined)."""
    rows: list[dict[str, Any]] = []

    def add(
        tenant: str | None,
        name: str,
        value: float,
        count: int = 1,
        low: float | None = None,
        high: float | None = None,
        avg: float | None = None,
    ) -> None:
        rows.append(
            {
                "id": uuid7(),
                "stat_date": day,
                "tenant_id": tenant,
                "metric_name": name,
                "metric_value": _dec(value),
                "metric_count": count,
                "min_value": None if low is None else _dec(low),
                "max_value": None if high is None else _dec(high),
                "avg_value": None if avg is None else _dec(avg),
            }
        )

    for tenant, s in stats.items():
        availability = s.availability_percent
        if availability is not None:
            add(tenant, "availability_percent", availability, avg=availability)
        add(tenant, "transitions", s.transitions, s.transitions)
        add(tenant, "recoveries", s.recoveries, s.recoveries)
        add(tenant, "recovery_attempts", s.recovery_attempts, s.recovery_attempts)
        mttr = s.mttr_seconds
        if mttr is not None:
            add(tenant, "mttr_seconds", mttr, s.ttr_count, s.ttr_min, s.ttr_max, mttr)
    return rows


async def write_rollup(
    analytics: AsyncEngine, day: dt.date, rows: Sequence[dict[str, Any]]
) -> None:
    """Replace the day's rollup rows in one transaction (a re-run is idempotent).

    Delete-then-insert rather than an upsert on ``uk_date_tenant_metric``: the platform-wide
    rows have ``tenant_id`` NULL, and NULLs never collide in a unique key (MySQL and SQLite), so
    an upsert would add a second platform row on every re-run.
    """
    t = performance_stats
    async with analytics.begin() as conn:
        await conn.execute(
            delete(t).where(t.c.stat_date == day, t.c.metric_name.in_(ROLLUP_METRICS))
        )
        if rows:
            await conn.execute(insert(t), list(rows))


async def last_rolled_up(analytics: AsyncEngine) -> dt.date | None:
    """The last day with a platform-wide rollup (its ``transitions`` row is always written)."""
    t = performance_stats
    stmt = select(func.max(t.c.stat_date)).where(
        t.c.tenant_id.is_(None), t.c.metric_name == "transitions"
    )
    async with analytics.connect() as conn:
        value = (await conn.execute(stmt)).scalar()
    if value is None:
        return None
    if isinstance(value, str):  # SQLite returns MAX() of a DATE column as text
        return dt.date.fromisoformat(value)
    return value if isinstance(value, dt.date) else None


def due_days(
    now: float, rollup_at: dt.time, done: dt.date | None, catch_up: int = ROLLUP_CATCH_UP_DAYS
) -> list[dt.date]:
    """The days to roll up at ``now``: complete days after ``done``, once past ``rollup_at``."""
    current = dt.datetime.fromtimestamp(now, dt.UTC)
    latest = current.date() - dt.timedelta(days=1)
    if current.time().replace(tzinfo=None) < rollup_at:
        latest -= dt.timedelta(days=1)
    first = latest - dt.timedelta(days=catch_up - 1)
    if done is not None:
        first = max(first, done + dt.timedelta(days=1))
    elif catch_up > 1:
        first = latest  # never rolled up: start with the last complete day only
    days: list[dt.date] = []
    day = first
    while day <= latest:
        days.append(day)
        day += dt.timedelta(days=1)
    return days


async def rollup(platform: AsyncEngine, analytics: AsyncEngine, day: dt.date) -> int:
    """Roll ``day`` up and write it; return the number of performance_stats rows."""
    rows = stats_rows(day, await rollup_day(platform, day))
    await write_rollup(analytics, day, rows)
    log.info("rollup of %s: %d performance_stats rows", day, len(rows))
    return len(rows)


def parse_hhmm(value: str) -> dt.time:
    hours, _, minutes = value.partition(":")
    return dt.time(int(hours), int(minutes))


# ---------------------------------------------------------------------------------- wiring


class Monitoring:
    """Alerts, snapshots, rollup and partition upkeep of one daemon, and their scheduler jobs."""

    def __init__(
        self,
        settings: Settings,
        engines: Mapping[str, AsyncEngine],
        supervisor: Supervisor,
        alerts: AlertManager,
        clock: Clock,
    ) -> None:
        m = settings.monitoring
        self.settings = settings
        self.engines = dict(engines)
        self.supervisor = supervisor
        self.alerts = alerts
        self.clock = clock
        self.snapshots = Snapshots(
            supervisor,
            self.engines["analytics"],
            clock,
            metrics=m.snapshot_metrics,
            chunk=m.snapshot_chunk,
        )
        self.rollup_at = parse_hhmm(m.rollup_time)
        self._upkeep_noted = False

    def attach(self) -> None:
        """Subscribe to the supervisor (before it starts, so no transition is missed)."""
        self.supervisor.listeners.append(self.alerts.on_transition)
        self.supervisor.group_listeners.append(self.alerts.on_group)
        if self.settings.monitoring.snapshot_interval > 0:
            self.supervisor.listeners.append(self.snapshots.on_transition)

    async def snapshot(self) -> None:
        rows = await self.snapshots.snapshot()
        log.debug("snapshot: %d account_metrics rows", rows)

    async def rollup(self) -> None:
        done = await last_rolled_up(self.engines["analytics"])
        for day in due_days(self.clock.now(), self.rollup_at, done):
            await rollup(self.engines["platform"], self.engines["analytics"], day)

    async def partition_upkeep(self) -> None:
        r = self.settings.retention
        today = dt.datetime.fromtimestamp(self.clock.now(), dt.UTC).date()
        results = await partition_upkeep.upkeep(
            self.engines,
            today,
            ahead=r.partitions_ahead,
            retention=r.model_dump(),
        )
        skipped = [x for x in results if x.skipped]
        if skipped and not self._upkeep_noted:
            self._upkeep_noted = True  # once: on SQLite this is every run
            for x in skipped:
                log.info("partition upkeep: %s: not applicable (%s)", x.table, x.skipped)

    def jobs(self) -> list[Job]:
        """``(fn, seconds)`` pairs for the daemon's scheduler; switched-off parts are absent."""
        m = self.settings.monitoring
        jobs: list[Job] = []
        if self.alerts.enabled:
            jobs.extend(self.alerts.jobs(self.engines, m.db_check_interval))
        if m.snapshot_interval > 0:
            jobs.append((self.snapshot, m.snapshot_interval))
        if m.rollup:
            jobs.append((self.rollup, m.rollup_check_interval))
        if m.partition_upkeep_interval > 0:
            jobs.append((self.partition_upkeep, m.partition_upkeep_interval))
        return jobs


async def start_monitoring(
    settings: Settings,
    engines: Mapping[str, AsyncEngine],
    supervisor: Supervisor,
    outbox: Outbox,
    clock: Clock,
) -> Monitoring:
    """Build alerts and monitoring after `Supervisor.load` and before `Supervisor.start`.

    Loads the open alerts, reconciles them with the loaded accounts and subscribes to the
    supervisor. The caller adds `Monitoring.jobs` to its scheduler.
    """
    m = settings.monitoring
    alerts = AlertManager(
        outbox,
        clock,
        enabled=m.alerts,
        db_down_after=m.db_down_after,
        mass_offline_cooldown=settings.recovery.mass_offline_cooldown,
    )
    if m.alerts:
        await alerts.load(engines["analytics"])
        alerts.reconcile(supervisor.accounts)
    monitoring = Monitoring(settings, engines, supervisor, alerts, clock)
    monitoring.attach()
    return monitoring
