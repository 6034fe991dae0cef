"""Alerts in ``monitor_analytics.system_alerts``: raised once, resolved when the condition clears.

What raises an alert (``alert_type``, ``alert_level`` from the seed's ENUM):

==========================  ==========  ===================  ===================================
alert_type                  level       resource             resolved when
==========================  ==========  ===================  ===================================
``account_error``           error       account              the account leaves ``error``
``recovery_exhausted``      error       account              the account is ``online`` again
``flapping``                warning     account              the account is ``online`` again
``qr_not_scanned``          warning     account              the account is ``online`` again
``mass_offline``            critical    tenant               its recovery cool-down has ended
``database_unreachable``    critical    database             a ping succeeds again
==========================  ==========  ===================  ===================================

Deduplication: at most one *open* alert (``active``, ``acknowledged`` or ``suppressed``: an
operator's acknowledgement must not make us raise it again) per ``(resource_type, resource_id,
alert_type)``. The open set lives in memory (loaded from the table at start, so a restart does
not raise twice) and is enforced by the database too: an open alert's id is derived from its key
(`open_alert_id`, a UUIDv5), so a second open row for the key would be a second row with the same
primary key, which neither backend allows, whatever the timing. Resolving gives the row a fresh
id, freeing the key for the next episode; a resolved alert therefore keeps its id only while it is
open. Writes go through the `Outbox` (retried until ``monitor_analytics`` takes them, in order:
a raise and its resolve never swap).

Muting: nothing is raised for a paused account (``accountctl pause``: maintenance). Pausing does
not resolve alerts already open (the problem is still there; the operator can acknowledge them),
and they still resolve on their own when the condition clears.

`AlertManager.on_transition` and `AlertManager.on_group` are supervisor listeners: they run in the
committer task, so they only update memory and queue outbox writes; they never await.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from accountd.adapters.db import ensure_reachable
from accountd.adapters.repository import to_db_time
from accountd.adapters.schema import system_alerts
from accountd.daemon.clock import Clock
from accountd.daemon.outbox import Outbox
from accountd.daemon.supervisor import GroupEvent, TransitionEvent
from accountd.errors import DatabaseUnavailable
from accountd.ids import uuid7
from accountd.statemachine import State
from accountd.statemachine.account import Account

log = logging.getLogger(__name__)

LEVELS: tuple[str, ...] = ("info", "warning", "error", "critical")  # the seed's ENUM, in order
OPEN_STATUSES: tuple[str, ...] = ("active", "acknowledged", "suppressed")

ACCOUNT_ERROR = "account_error"
RECOVERY_EXHAUSTED = "recovery_exhausted"
FLAPPING = "flapping"
QR_NOT_SCANNED = "qr_not_scanned"
MASS_OFFLINE = "mass_offline"
DATABASE_UNREACHABLE = "database_unreachable"

ALERT_LEVELS: dict[str, str] = {
    ACCOUNT_ERROR: "error",
    RECOVERY_EXHAUSTED: "error",
    FLAPPING: "warning",
    QR_NOT_SCANNED: "warning",
    MASS_OFFLINE: "critical",
    DATABASE_UNREACHABLE: "critical",
}
# Account alerts that a decision of the recovery policy raises (TransitionEvent.alert) and that
# clear once the account is back online.
RESOLVED_ONLINE: frozenset[str] = frozenset({RECOVERY_EXHAUSTED, FLAPPING, QR_NOT_SCANNED})

_TITLES: dict[str, str] = {
    ACCOUNT_ERROR: "Account {id} entered error",
    RECOVERY_EXHAUSTED: "Recovery of account {id} given up",
    FLAPPING: "Account {id} is flapping",
    QR_NOT_SCANNED: "Login QR code of account {id} not scanned",
    MASS_OFFLINE: "Mass offline in tenant {id}",
    DATABASE_UNREACHABLE: "Database {id} unreachable",
}

# Namespace of the ids of open alerts (see `open_alert_id`). Never change it: a restart would
# stop recognising the open rows written before.
_NAMESPACE = uuid.UUID("5b0c1d7e-2f4a-4c55-9a51-7d3a0c9e8b21")


@dataclass(frozen=True, slots=True)
class AlertKey:
    """What deduplication is over: one open alert per resource and type."""

    resource_type: str
    resource_id: str
    alert_type: str


@dataclass(slots=True)
class OpenAlert:
    id: str
    level: str
    tenant_id: str | None
    until: float | None = None  # mass_offline: the end of the cool-down, when it resolves


def open_alert_id(key: AlertKey) -> str:
    """The primary key an open alert for ``key`` has: the same for every writer and restart."""
    name = f"{key.resource_type}\x1f{key.resource_id}\x1f{key.alert_type}"
    return str(uuid.uuid5(_NAMESPACE, name))


class AlertManager:
    """Raises, deduplicates and resolves alerts; writes them through the outbox."""

    def __init__(
        self,
        outbox: Outbox,
        clock: Clock,
        *,
        enabled: bool = True,
        db_down_after: float = 30.0,
        mass_offline_cooldown: float = 300.0,
        outbox_key: str = "analytics",
        ping_timeout: float = 5.0,
    ) -> None:
        self.outbox = outbox
        self.clock = clock
        self.enabled = enabled
        self.db_down_after = db_down_after
        self.mass_offline_cooldown = mass_offline_cooldown
        self.outbox_key = outbox_key
        self.ping_timeout = ping_timeout
        self.raised = 0
        self.resolved = 0
        self._open: dict[AlertKey, OpenAlert] = {}
        self._db_down_since: dict[str, float] = {}

    # ---------------------------------------------------------------- reading

    def active_counts(self) -> dict[str, int]:
        """Open alerts per level, every level present (``accountd_alerts_active{level}``)."""
        # list(): a scrape runs this on the side loop's thread while alerts open and close.
        return level_counts(list(self._open.values()))

    def is_open(self, key: AlertKey) -> bool:
        return key in self._open

    def open_alerts(self) -> dict[AlertKey, OpenAlert]:
        return dict(self._open)

    # ---------------------------------------------------------------- start-up

    async def load(self, engine: AsyncEngine) -> int:
        """Read the open alerts (so a restart does not raise them again); return how many."""
        t = system_alerts
        stmt = select(
            t.c.id,
            t.c.alert_type,
            t.c.alert_level,
            t.c.resource_type,
            t.c.resource_id,
            t.c.tenant_id,
        ).where(t.c.status.in_(OPEN_STATUSES), t.c.resource_type.is_not(None))
        now = self.clock.now()
        async with engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        for row in rows:
            if row.resource_id is None:
                continue
            key = AlertKey(row.resource_type, row.resource_id, row.alert_type)
            alert = OpenAlert(row.id, row.alert_level, row.tenant_id)
            if key.alert_type == MASS_OFFLINE:
                # The detector's cool-down did not survive the restart: give it a fresh one.
                alert.until = now + self.mass_offline_cooldown
            known = self._open.get(key)
            # Two open rows for one key can only come from another writer; prefer ours.
            if known is None or row.id == open_alert_id(key):
                self._open[key] = alert
        log.info("alerts: %d open alerts loaded", len(self._open))
        return len(self._open)

    def reconcile(self, accounts: Mapping[str, Account]) -> None:
        """After loading accounts: resolve what cleared while we were down, raise what is due.

        An account that entered ``error`` while no daemon ran (or whose alert write was lost at
        a crash) gets its alert now; one that is fine again gets its alert resolved. Every
        database answered at start, so database alerts are resolved too.
        """
        for key in list(self._open):
            if key.resource_type == "database":
                self.resolve(key, "the daemon connected at start")
            elif key.resource_type == "account":
                acc = accounts.get(key.resource_id)
                if acc is None:
                    self.resolve(key, "the account is no longer supervised")
                elif key.alert_type == ACCOUNT_ERROR and acc.status is not State.error:
                    self.resolve(key, f"the account is {acc.status}")
                elif key.alert_type in RESOLVED_ONLINE and acc.status is State.online:
                    self.resolve(key, "the account is online")
        for acc in accounts.values():
            self.refresh_account(acc)

    def refresh_account(self, acc: Account) -> None:
        """Raise ``account_error`` for an unpaused account in ``error`` that has none open
        (start-up, or after ``accountctl resume`` of an account that failed while paused)."""
        if acc.status is State.error and not acc.paused:
            self._raise_account(acc, ACCOUNT_ERROR, "the account is in error")

    # ---------------------------------------------------------------- listeners

    def on_transition(self, event: TransitionEvent) -> None:
        """Supervisor listener (committer task): memory and outbox queue only."""
        acc = event.account
        if event.old is State.error and event.new is not State.error:
            self.resolve(self._account_key(acc, ACCOUNT_ERROR), f"{event.trigger} to {event.new}")
        if event.new is State.online:
            for alert_type in RESOLVED_ONLINE:
                self.resolve(self._account_key(acc, alert_type), f"{event.trigger}: online")
        if acc.paused:
            return  # muted: maintenance
        if event.alert is not None:
            self._raise_account(acc, event.alert, event.reason)
        if event.new is State.error and event.old is not State.error:
            self._raise_account(acc, ACCOUNT_ERROR, event.reason)

    def on_group(self, event: GroupEvent) -> None:
        """Supervisor group listener: one critical alert per mass-offline episode of a tenant."""
        if event.kind != MASS_OFFLINE:
            return
        key = AlertKey("tenant", event.group, MASS_OFFLINE)
        known = self._open.get(key)
        if known is not None:
            # A new episode while the last one is still open: same alert, longer cool-down.
            known.until = max(known.until or event.until, event.until)
            return
        content = (
            f"A large share of tenant {event.group}'s accounts went offline at once; their "
            f"recovery is paused until {to_db_time(event.until)} UTC."
        )
        self.raise_alert(key, ALERT_LEVELS[MASS_OFFLINE], content, tenant_id=event.group)
        if key in self._open:
            self._open[key].until = event.until

    def observe_database(self, key: str, up: bool, now: float | None = None) -> None:
        """A database health observation: alert once it has been down ``db_down_after`` s."""
        now = self.clock.now() if now is None else now
        alert_key = AlertKey("database", key, DATABASE_UNREACHABLE)
        if up:
            self._db_down_since.pop(key, None)
            self.resolve(alert_key, "reachable again")
            return
        since = self._db_down_since.setdefault(key, now)
        if now - since >= self.db_down_after:
            content = (
                f"Database {key} has not answered since {to_db_time(since)} UTC "
                f"({now - since:.0f}s); writes to it are queued and retried."
            )
            self.raise_alert(alert_key, ALERT_LEVELS[DATABASE_UNREACHABLE], content)

    def expire(self, now: float | None = None) -> int:
        """Resolve mass-offline alerts whose cool-down is over; return how many."""
        now = self.clock.now() if now is None else now
        done = [k for k, a in self._open.items() if a.until is not None and a.until <= now]
        for key in done:
            self.resolve(key, "the recovery cool-down ended")
        return len(done)

    # ---------------------------------------------------------------- raise / resolve

    def raise_alert(
        self,
        key: AlertKey,
        level: str,
        content: str,
        *,
        title: str | None = None,
        tenant_id: str | None = None,
    ) -> bool:
        """Open an alert for ``key`` unless one is open; True when a row was queued."""
        if level not in LEVELS:
            raise ValueError(f"alert level must be one of {LEVELS}, got {level!r}")
        if not self.enabled or key in self._open:
            return False
        alert_id = open_alert_id(key)
        self._open[key] = OpenAlert(alert_id, level, tenant_id)
        title = title or _TITLES.get(key.alert_type, "{type} on {id}").format(
            id=key.resource_id, type=key.alert_type
        )
        row = {
            "id": alert_id,
            "alert_type": key.alert_type,
            "alert_level": level,
            "alert_title": title[:200],
            "alert_content": content,
            "resource_type": key.resource_type,
            "resource_id": key.resource_id,
            "tenant_id": tenant_id,
            "status": "active",
            "created_at": to_db_time(self.clock.now()),
        }
        self.outbox.submit(
            self.outbox_key, f"raise {key.alert_type} {key.resource_id}", _opener(row)
        )
        self.raised += 1
        log.warning("alert raised: %s (%s) %s: %s", key.alert_type, level, key.resource_id, title)
        return True

    def resolve(self, key: AlertKey, why: str) -> bool:
        """Resolve the open alert for ``key``, if any; True when an update was queued."""
        alert = self._open.pop(key, None)
        if alert is None:
            return False
        values: dict[str, Any] = {
            "status": "resolved",
            "resolved_at": to_db_time(self.clock.now()),
        }
        if alert.id == open_alert_id(key):
            values["id"] = uuid7()  # frees the key's id for the next episode
        self.outbox.submit(
            self.outbox_key,
            f"resolve {key.alert_type} {key.resource_id}",
            _closer(alert.id, values),
        )
        self.resolved += 1
        log.info("alert resolved: %s %s: %s", key.alert_type, key.resource_id, why)
        return True

    def _account_key(self, acc: Account, alert_type: str) -> AlertKey:
        return AlertKey("account", acc.id, alert_type)

    def _raise_account(self, acc: Account, alert_type: str, reason: str) -> None:
        level = ALERT_LEVELS.get(alert_type, "warning")
        content = (
            f"Account {acc.id} (wework_guid {acc.wework_guid}, tenant {acc.tenant_id}): {reason}"
        )
        self.raise_alert(
            self._account_key(acc, alert_type), level, content, tenant_id=acc.tenant_id
        )

    # ---------------------------------------------------------------- periodic job

    def jobs(
        self, engines: Mapping[str, AsyncEngine], interval: float
    ) -> list[tuple[Callable[[], Awaitable[None]], float]]:
        """The scheduler job (``fn, seconds``): database health and cool-down expiry."""

        async def alert_checks() -> None:
            await self.check_databases(engines)
            self.expire()

        return [(alert_checks, interval)]

    async def check_databases(self, engines: Mapping[str, AsyncEngine]) -> dict[str, bool]:
        """Ping every database (bounded) and feed `observe_database`; return who answered."""
        seen: dict[str, bool] = {}
        for key, engine in engines.items():
            try:
                async with asyncio.timeout(self.ping_timeout):
                    await ensure_reachable(key, engine)
            except (DatabaseUnavailable, TimeoutError):
                seen[key] = False
            else:
                seen[key] = True
            self.observe_database(key, seen[key])
        return seen


def _opener(row: Mapping[str, Any]) -> Callable[[AsyncConnection], Awaitable[None]]:
    """The write that opens an alert, idempotent and safe against a second writer.

    If a row already holds the key's id but was resolved by someone else (a UI setting
    ``status='resolved'``), it is moved to a fresh id first; then the insert either creates the
    open row or finds one there (open already: nothing to do).
    """
    payload = dict(row)

    async def write(conn: AsyncConnection) -> None:
        t = system_alerts
        await conn.execute(
            update(t)
            .where(t.c.id == payload["id"], t.c.status.not_in(OPEN_STATUSES))
            .values(id=uuid7())
        )
        if conn.dialect.name == "mysql":
            stmt = mysql.insert(t).values(payload)
            await conn.execute(stmt.on_duplicate_key_update(id=stmt.inserted.id))
        else:
            await conn.execute(sqlite.insert(t).values(payload).on_conflict_do_nothing())

    return write


def _closer(
    alert_id: str, values: Mapping[str, Any]
) -> Callable[[AsyncConnection], Awaitable[None]]:
    payload = dict(values)

    async def write(conn: AsyncConnection) -> None:
        t = system_alerts
        await conn.execute(
            update(t).where(t.c.id == alert_id, t.c.status.in_(OPEN_STATUSES)).values(payload)
        )

    return write


def level_counts(alerts: Iterable[OpenAlert]) -> dict[str, int]:
    counts = dict.fromkeys(LEVELS, 0)
    for alert in alerts:
        counts[alert.level] = counts.get(alert.level, 0) + 1
    return counts
