"""The daemon process: lifecycle, signals and periodic jobs.

`Daemon.run` builds every service inside one `contextlib.AsyncExitStack`, each registering its own
cleanup, so shutdown is the exact reverse of start-up: ingest stops taking input first, the
scheduler stops, the supervisor finishes in-flight transitions and flushes heartbeats, the worker
client closes, the lease is released, the engines are disposed. Signals have one owner (this
module); handlers only set flags. A second SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from accountd.adapters import migrate
from accountd.adapters.db import DATABASE_KEYS, Databases
from accountd.adapters.repository import AccountRepository
from accountd.adapters.worker import WorkerClient
from accountd.daemon import fastjson
from accountd.daemon.alerts import AlertManager
from accountd.daemon.clock import Clock, SystemClock
from accountd.daemon.control import ControlServer
from accountd.daemon.ingest import IngestServer, make_ingest_app
from accountd.daemon.jobs import PeriodicJobs
from accountd.daemon.lease import Lease, LeaseHeld, LeaseLost
from accountd.daemon.metrics import Metrics
from accountd.daemon.metrics_http import serve_metrics
from accountd.daemon.monitoring import Monitoring, start_monitoring
from accountd.daemon.notify import Notifier, Ticker, watchdog_interval
from accountd.daemon.outage import OutageGuard, wait_for_databases
from accountd.daemon.outbox import Outbox
from accountd.daemon.policy import PolicyConfig
from accountd.daemon.priority import AdminLane
from accountd.daemon.runtime_metrics import (
    GcPauses,
    HeartbeatsPersisted,
    MainLoopHolds,
    freeze_after_load,
    register,
)
from accountd.daemon.side_loop import SideLoop
from accountd.daemon.supervisor import Supervisor
from accountd.errors import ConfigError, DatabaseUnavailable
from accountd.logs import setup_logging
from accountd.settings import (
    DeadlinesSettings,
    LoggingSettings,
    RecoverySettings,
    Settings,
    load_settings,
)

log = logging.getLogger(__name__)


def policy_config(settings: Settings) -> PolicyConfig:
    """The policy numbers from the config sections (BRIEF §3 defaults live in settings)."""
    d, r = settings.deadlines, settings.recovery
    return PolicyConfig(
        heartbeat_timeout=settings.heartbeat.timeout,
        deadlines={
            "initializing": d.initializing,
            "waiting_qr": d.waiting_qr,
            "waiting_confirm": d.waiting_confirm,
            "verifying": d.verifying,
            "recovering": d.recovering,
        },
        qr_max_refreshes=d.qr_max_refreshes,
        base=r.base,
        cap=r.cap,
        max_attempts=r.max_attempts,
        reset_after=r.reset_after,
        error_retry_after=r.error_retry_after,
        max_in_flight=r.max_in_flight,
        start_rate=r.start_rate,
        flap_count=r.flap_count,
        flap_window=r.flap_window,
        mass_offline_ratio=r.mass_offline_ratio,
        mass_offline_window=r.mass_offline_window,
        mass_offline_cooldown=r.mass_offline_cooldown,
    )


# Settings that can change on SIGHUP without a restart: exactly what `Supervisor.reconfigure`
# and `setup_logging` consume. Everything else (databases, listen addresses, the control socket,
# intervals the scheduler was built with, ...) is reported and the running value kept.
LIVE_KEYS: frozenset[str] = frozenset(
    {
        "heartbeat.timeout",
        *(f"deadlines.{key}" for key in DeadlinesSettings.model_fields),
        *(f"recovery.{key}" for key in RecoverySettings.model_fields),
        *(f"logging.{key}" for key in LoggingSettings.model_fields),
    }
)
# systemd STATUS= refresh; each database ping inside it is bounded so a hung server cannot hold
# the line (the watchdog has its own task and never waits on a database).
STATUS_INTERVAL = 5.0
STATUS_DB_TIMEOUT = 2.0


class Daemon:
    """One accountd process."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        config_path: Path | None = None,
        on_ready: Callable[[Daemon], Awaitable[None]] | None = None,
        notifier: Notifier | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.notifier = notifier if notifier is not None else Notifier()
        self.clock = clock or SystemClock()
        self.config_path = config_path if config_path is not None else settings.source_path
        self.on_ready = on_ready
        self.supervisor: Supervisor | None = None
        self.outbox: Outbox | None = None
        self.alerts: AlertManager | None = None  # system_alerts; active_counts() for metrics
        self.monitoring: Monitoring | None = None  # snapshots, rollup, partition upkeep
        self.databases: Databases | None = None
        self.ingest_port: int | None = None
        self.started_at = self.clock.now()  # uptime in `accountctl status`
        self.control_socket: Path | None = None
        # One registry per daemon (tests pass a fresh one): never prometheus_client's global.
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics: Metrics | None = None
        self.metrics_port: int | None = None
        self.ready = False
        self.exit_code = 0
        # accountctl requests go ahead of heartbeat batches (shared by the two listeners).
        self.lane = AdminLane()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        # SIGHUP and `accountctl reload` may overlap: one reload at a time, each complete.
        self._reload_lock = asyncio.Lock()
        self._sigint_count = 0
        self.jobs = PeriodicJobs(log)
        self.outage: OutageGuard | None = None

    # ---------------------------------------------------------------- control

    def request_stop(self, code: int = 0) -> None:
        if code and not self.exit_code:
            self.exit_code = code
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def _on_sigint(self) -> None:
        self._sigint_count += 1
        if self._sigint_count > 1:
            log.warning("second interrupt: exiting now without a clean shutdown")
            os._exit(130)
        log.info("interrupt: shutting down (press Ctrl-C again to force)")
        self.request_stop()

    # ---------------------------------------------------------------- run

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGINT, self._on_sigint)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            installed = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
        try:
            async with contextlib.AsyncExitStack() as stack:
                await self._start(stack)
                await self._main_loop()
                log.info("shutting down")
                self.notifier.stopping("stopping: draining in-flight transitions")
        except (LeaseHeld, DatabaseUnavailable, ConfigError) as exc:
            log.error("%s", exc)
            return 1
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            self.notifier.close()
        return self.exit_code

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        s = self.settings
        # First in, last out: the loop pings systemd's watchdog through start-up and shutdown.
        interval = watchdog_interval()
        if interval is not None and self.notifier.enabled:
            watchdog = Ticker("sd-watchdog", interval, self._ping_watchdog)
            await watchdog.start()
            stack.push_async_callback(watchdog.stop)
        # The side loop (its own thread) serves the metrics listener and the control socket,
        # so both answer while a heartbeat flood keeps this loop busy (side_loop.py).
        side = SideLoop()
        await side.start()
        stack.push_async_callback(side.stop)
        # Metrics and health first, so /healthz answers while databases and accounts load.
        metrics = self.metrics = Metrics(
            self.registry,
            self.clock,
            s.metrics,
            is_ready=lambda: self.ready,
            alerts=lambda: self.alerts,
            lane=self.lane,
        )
        self.metrics_port = await serve_metrics(
            stack, metrics, s.metrics.host, s.metrics.port, side=side
        )
        dbs = Databases(s.database_urls(), s.pool())
        stack.push_async_callback(dbs.dispose)
        self.databases = dbs
        # A database that is down at start-up is waited for (one line per attempt, backing
        # off), then the daemon exits 1 with the last error (`[databases] startup_timeout`).
        await wait_for_databases(
            dbs.check_all, give_up_after=s.databases.startup_timeout, stop=self._stop
        )
        await metrics.watch(dbs)
        stack.push_async_callback(metrics.unwatch)  # before dbs.dispose: no ping after it
        await self._check_schema()

        lease = Lease(dbs.platform)
        await lease.acquire()
        stack.push_async_callback(lease.release)

        # Cross-database writes (operation_logs, system_alerts, metrics snapshots) that follow a
        # commit in wework_platform; stopped after the supervisor so its last writes get out.
        self.outbox = Outbox({"core": dbs.core, "analytics": dbs.analytics})
        await self.outbox.start()
        stack.push_async_callback(self.outbox.stop)

        worker = await stack.enter_async_context(
            WorkerClient(
                s.worker.url, timeout=s.worker.timeout, max_connections=s.worker.max_connections
            )
        )
        sup = Supervisor(
            AccountRepository(dbs.platform, reads=dbs.platform_reads),
            worker,
            policy_config(s),
            self.clock,
            rng=random.Random(),
            batch_size=s.supervisor.transition_batch,
            journal_min=s.supervisor.journal_min_batch,
            page_size=s.supervisor.load_page_size,
            persist_interval=s.heartbeat.persist_interval,
            startup_grace=s.heartbeat.startup_grace,
        )
        self.supervisor = sup
        sup.door.max_pending = s.supervisor.max_pending_changes
        metrics.attach(supervisor=sup, outbox=self.outbox)
        await sup.load()
        # Alerts (loaded and reconciled with the accounts) and monitoring subscribe before the
        # supervisor starts, so no transition goes unseen; their jobs join the scheduler below.
        self.monitoring = await start_monitoring(s, dbs.engines, sup, self.outbox, self.clock)
        self.alerts = self.monitoring.alerts
        # The loaded accounts live as long as the process: move them out of the collector's
        # generations so a full collection does not walk a million objects (~0.45 s at 1M).
        stack.callback(gc.set_threshold, *gc.get_threshold())  # as found, when we stop
        frozen, full_gc = freeze_after_load()
        log.info(
            "gc: %d objects frozen after the load; a full collection now takes %.1f ms",
            frozen,
            full_gc * 1000,
        )
        gc_pauses = GcPauses()
        gc_pauses.install()
        stack.callback(gc_pauses.remove)
        persisted = HeartbeatsPersisted(lambda: sup.heartbeats_persisted)
        stack.callback(register(self.registry, gc_pauses, persisted))
        # Stalls (SIGSTOP) and platform outages: checks that fell while the daemon was deaf
        # are moved, not fired. Started before the supervisor's deadline runner.
        guard = self.outage = OutageGuard(
            self.clock,
            stall_after=s.heartbeat.stall_after,
            # Back means answering *and* committing again (the door's last batch went through).
            # Not "the door is idle": a busy door is the normal state during a mass event.
            db_up=lambda: metrics.db_up("platform") and sup.door.db_healthy,
            detect_lag=s.metrics.ping_interval,
        )
        sup.outage = guard
        sup.lane = self.lane
        await guard.start()
        stack.push_async_callback(guard.stop)
        await sup.start()
        stack.push_async_callback(sup.stop, s.supervisor.shutdown_timeout)

        scheduler = self._scheduler(sup, lease)
        scheduler.start()
        stack.push_async_callback(self.jobs.stop, scheduler)

        assert s.ingest.token is not None  # require_runnable() checked it
        ingest = IngestServer(
            make_ingest_app(
                sup,
                token=s.ingest.token.get_secret_value(),
                max_batch=s.ingest.max_batch,
                max_body_bytes=s.ingest.max_body_bytes,
                request_timeout=s.ingest.request_timeout,
                lane=self.lane,
            )
        )
        self.ingest_port = await ingest.start(s.ingest.host, s.ingest.port)
        stack.push_async_callback(ingest.stop)

        # Admin input (accountctl): once the accounts are loaded; stopped before the supervisor.
        control = ControlServer(
            self, s.control, lane=self.lane, main_loop=asyncio.get_running_loop()
        )
        self.control_socket = await side.run(control.start())
        stack.push_async_callback(side.call, control.stop)
        if control.hold is not None:
            stack.callback(register(self.registry, MainLoopHolds(control.hold)))

        self.ready = True
        stack.callback(metrics.mark_stopping)  # first thing at shutdown: /readyz says 503
        log.info(
            "ready: %d accounts, ingest on %s:%d, worker %s",
            len(sup.accounts),
            s.ingest.host,
            self.ingest_port,
            s.worker.url,
        )
        self.notifier.ready(await self.status_line())
        if self.notifier.enabled:
            status = Ticker("sd-status", STATUS_INTERVAL, self._send_status)
            await status.start()
            stack.push_async_callback(status.stop)
        if self.on_ready is not None:
            await self.on_ready(self)

    async def _check_schema(self) -> None:
        assert self.databases is not None
        versions = await migrate.current(self.settings.database_urls())
        heads = await migrate.heads()
        behind = [k for k, v in versions.items() if v != heads[k]]
        if behind:
            raise ConfigError(
                f"database schema not up to date for {', '.join(behind)} "
                f"(at {', '.join(str(versions[k]) for k in behind)}): run `accountd db upgrade`"
            )

    async def _main_loop(self) -> None:
        while not self._stop.is_set():
            stop = asyncio.ensure_future(self._stop.wait())
            reload = asyncio.ensure_future(self._reload.wait())
            try:
                await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in (stop, reload):
                    fut.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fut
            if self._reload.is_set() and not self._stop.is_set():
                self._reload.clear()
                await self.reload()

    # ---------------------------------------------------------------- reload

    async def reload(self) -> list[str]:
        """Re-read the config; apply what can change live, report the rest. Returns notes.

        A config that does not load is refused as a whole (the running one stays); otherwise
        the live keys are applied together and every other changed key is reported by name
        (never by value: URLs carry passwords) and kept at its running value.
        """
        async with self._reload_lock:
            self.notifier.reloading("reloading the configuration")
            try:
                return await self._reload_config()
            finally:
                self.notifier.ready(await self.status_line())

    async def _reload_config(self) -> list[str]:
        try:
            # load_settings reads the file: blocking I/O stays off the event loop.
            new = await asyncio.to_thread(load_settings, self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return [str(exc)]
        old = self.settings
        changed = changed_keys(old, new)
        live = [key for key in changed if key in LIVE_KEYS]
        notes = [
            f"{key}: changed, needs a restart to apply; the running value is kept"
            for key in changed
            if key not in LIVE_KEYS
        ]
        updates: dict[str, dict[str, Any]] = {}
        for key in live:
            section, _, name = key.partition(".")
            updates.setdefault(section, {})[name] = getattr(getattr(new, section), name)
        self.settings = old.model_copy(
            update={
                section: getattr(old, section).model_copy(update=values)
                for section, values in updates.items()
            }
        )
        if self.supervisor is not None:
            self.supervisor.reconfigure(policy_config(self.settings))
        if any(key.startswith("logging.") for key in live):
            setup_logging(self.settings.logging.level, self.settings.logging.format)
        for note in notes:
            log.warning("reload: %s", note)
        log.info("reload: applied %s", ", ".join(live) if live else "nothing (no live key changed)")
        return notes

    # ---------------------------------------------------------------- systemd

    async def status_line(self) -> str:
        """The STATUS= line for `systemctl status`: accounts per state, database reachability.

        A database that is down makes it start with ``degraded:``. Health comes from the metrics'
        pings and the last real writes (`Metrics.db_up`), so the line costs no I/O and a hung
        server cannot hold it; without metrics (never in `run`) each database is pinged.
        """
        sup, dbs = self.supervisor, self.databases
        if sup is None or dbs is None or not self.ready:
            return "starting"
        per_state = " ".join(f"{state}={n}" for state, n in sup.snapshot_counts().items() if n)
        down: list[str] = []
        for key in DATABASE_KEYS:
            if self.metrics is not None:
                if not self.metrics.db_up(key):
                    down.append(key)
                continue
            try:
                async with asyncio.timeout(STATUS_DB_TIMEOUT):
                    await dbs.ping(key)
            except (DatabaseUnavailable, TimeoutError):
                down.append(key)
        counts = f"{len(sup.accounts)} accounts: {per_state or 'none'}"
        if down:
            return f"degraded: database {', '.join(down)} unreachable; {counts}"
        return f"{counts}; db ok"

    async def _send_status(self) -> None:
        self.notifier.status(await self.status_line())

    async def _ping_watchdog(self) -> None:
        self.notifier.watchdog()

    # ---------------------------------------------------------------- periodic jobs

    def _scheduler(self, sup: Supervisor, lease: Lease) -> AsyncIOScheduler:
        s = self.settings
        scheduler = AsyncIOScheduler(timezone="UTC")
        watermark = {"since": self.clock.now() - s.heartbeat.timeout}

        async def pick_up() -> None:
            sup.adopt_new(await sup.repo.find_created())

        async def flush() -> None:
            await sup.flush_heartbeats()
            await sup.fold_journal()

        async def poll_heartbeats() -> None:
            watermark["since"] = await sup.poll_db_heartbeats(watermark["since"])

        async def removed_rows() -> None:
            present: set[str] = set()
            async for ids in sup.repo.all_ids():
                present.update(ids)
            gone = [a for a in list(sup.accounts) if a not in present]
            if gone:
                sup.forget(gone)

        async def renew() -> None:
            try:
                await lease.renew()
            except LeaseLost as exc:
                log.error("%s; stopping so that two daemons never write together", exc)
                self.request_stop(1)

        jobs: list[tuple[Callable[[], Awaitable[None]], float]] = [
            (pick_up, s.supervisor.poll_interval),
            (flush, s.heartbeat.flush_interval),
            (poll_heartbeats, s.heartbeat.db_poll_interval),
            (removed_rows, 300.0),
            (renew, lease.ttl / 3),
        ]
        if self.monitoring is not None:
            jobs.extend(self.monitoring.jobs())
        for fn, seconds in jobs:
            self.jobs.add(scheduler, fn, seconds)
        return scheduler


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """Dotted keys (``section.key``, or a top-level key) whose values differ."""
    changed: list[str] = []
    for name in type(old).model_fields:
        a, b = getattr(old, name), getattr(new, name)
        if isinstance(a, BaseModel) and isinstance(b, BaseModel):
            changed.extend(
                f"{name}.{key}"
                for key in type(a).model_fields
                if getattr(a, key) != getattr(b, key)
            )
        elif a != b:
            changed.append(name)
    return changed


def run_daemon(settings: Settings) -> int:
    """`accountd run`: the daemon in the foreground until SIGTERM/SIGINT."""
    settings.require_runnable()
    # orjson and msgspec come with the `fast` extra; uvloop was measured too and did not pay
    # (ingest is bound by the Python work per heartbeat, not by the event loop):
    # docs/benchmarks.md.
    log.info(
        "JSON for ingest: %s (heartbeat batches: %s)", fastjson.BACKEND, fastjson.HEARTBEATS_BACKEND
    )
    return asyncio.run(Daemon(settings).run())
