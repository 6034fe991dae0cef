"""`accountd demo`: the real daemon on embedded SQLite with the built-in worker simulator.

Everything is real except the WeCom side: three SQLite databases under ``./var/demo`` created by
the migrations, N demo accounts inserted as ``created`` rows (as other platform services would),
the worker simulator serving the worker protocol on loopback and pushing events and heartbeats to
the daemon's ingest over HTTP, with failure rates high enough that sessions drop, logins stall
and recoveries happen within a minute or two. Timings are shortened so the lifecycle is visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
import socket
import uuid
from pathlib import Path

from sqlalchemy import insert

from accountd.adapters import migrate
from accountd.adapters.db import open_databases
from accountd.adapters.schema import tenants, wework_accounts
from accountd.daemon.app import Daemon
from accountd.daemon.simulator import WorkerSimulator
from accountd.daemon.simulator_sessions import SimulatorConfig
from accountd.daemon.supervisor import TransitionEvent, TransitionListener
from accountd.logs import register_secret
from accountd.settings import Settings

log = logging.getLogger("accountd.demo")

DEMO_DIR = Path("var/demo")
TENANTS = ("acme", "globex", "initech")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metrics_listen(base: Settings) -> str:
    """The configured metrics address if it is free, else any free loopback port."""
    host, port = base.metrics.host, base.metrics.port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return "127.0.0.1:0"
    return base.metrics.listen


def demo_settings(
    base: Settings, state_dir: Path, ingest_port: int, worker_url: str, token: str
) -> Settings:
    """The user's settings with the demo's databases, listeners and shortened timings."""
    return Settings.model_validate(
        {
            **base.model_dump(mode="python", exclude={"databases", "state_dir", "control"}),
            "state_dir": state_dir,
            "ingest": {"listen": f"127.0.0.1:{ingest_port}", "token": token},
            "metrics": {**base.metrics.model_dump(), "listen": _metrics_listen(base)},
            "worker": {"url": worker_url, "timeout": 2},
            "heartbeat": {"timeout": 6, "persist_interval": 3, "startup_grace": 6},
            "deadlines": {
                "initializing": 8,
                "waiting_qr": 12,
                "waiting_confirm": 10,
                "verifying": 8,
                "recovering": 8,
                "qr_max_refreshes": 2,
            },
            "recovery": {
                "base": 1,
                "cap": 15,
                "max_attempts": 5,
                "reset_after": 60,
                "error_retry_after": 45,
                "flap_count": 5,
                "flap_window": 120,
                "mass_offline_window": 10,
                "mass_offline_cooldown": 15,
            },
        }
    )


async def seed(urls: dict[str, str], accounts: int) -> None:
    """Tenants in saas_unified_core and ``created`` accounts in wework_platform."""
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    tenant_rows = [
        {"id": str(uuid.uuid4()), "tenant_name": name.title(), "tenant_code": name}
        for name in TENANTS
    ]
    account_rows = [
        {
            "id": str(uuid.uuid4()),
            "tenant_id": tenant_rows[i % len(tenant_rows)]["id"],
            "account_name": f"demo-{i:04d}",
            "wework_guid": f"demo-guid-{i:04d}",
            "wework_corp_id": f"corp-{tenant_rows[i % len(tenant_rows)]['tenant_code']}",
            "wework_secret": secrets.token_hex(16),
            "status": "created",
            "device_info": {"model": "simulated", "n": i},
            "created_at": now,
        }
        for i in range(accounts)
    ]
    async with open_databases(urls) as dbs:
        async with dbs.core.begin() as conn:
            await conn.execute(insert(tenants), tenant_rows)
        async with dbs.platform.begin() as conn:
            await conn.execute(insert(wework_accounts), account_rows)


def _transition_printer(names: dict[str, str]) -> TransitionListener:
    def show(ev: TransitionEvent) -> None:
        name = names.get(ev.account.id, ev.account.id[:8])
        log.info("%-10s %-15s → %-15s (%s)", name, ev.old, ev.new, ev.trigger)

    return show


def _prepare(state_dir: Path, token: str) -> Path:
    """Fresh demo databases every run, and the ingest token in a file only we can read."""
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in ("core", "platform", "analytics"):
        for suffix in (".db", ".db-wal", ".db-shm"):
            (state_dir / f"{name}{suffix}").unlink(missing_ok=True)
    token_file = state_dir / "ingest.token"
    token_file.unlink(missing_ok=True)
    token_file.touch(mode=0o600)
    token_file.write_text(token + "\n")
    return token_file


async def _demo(accounts: int, base: Settings, state_dir: Path, token: str) -> int:
    token_file = state_dir / "ingest.token"
    ingest_port = _free_port()
    sim = WorkerSimulator(
        SimulatorConfig(
            ingest_url=f"http://127.0.0.1:{ingest_port}",
            token=token,
            step_latency_min=0.3,
            step_latency_max=1.5,
            scan_latency_min=1.0,
            scan_latency_max=6.0,
            heartbeat_interval=2.0,
            qr_refresh_interval=5.0,
            qr_max_refreshes=3,
            p_qr_never_scanned=0.1,
            p_session_drop=0.004,
            p_logout=0.002,
            p_resume_fail=0.2,
            p_5xx=0.05,
            p_fail=0.01,
        )
    )
    worker_url = await sim.start()
    settings = demo_settings(base, state_dir, ingest_port, worker_url, token)
    urls = settings.database_urls()
    await migrate.upgrade(urls)
    await seed(urls, accounts)

    async def on_ready(daemon: Daemon) -> None:
        assert daemon.supervisor is not None
        names = {a.id: f"{a.wework_guid[-9:]}" for a in daemon.supervisor.accounts.values()}
        daemon.supervisor.listeners.append(_transition_printer(names))
        print(
            "\naccountd demo is running (Ctrl-C to stop)\n"
            f"  databases      {state_dir}/{{core,platform,analytics}}.db (SQLite)\n"
            f"  ingest         http://127.0.0.1:{daemon.ingest_port}  "
            f"(bearer token in {token_file})\n"
            f"  worker sim     {worker_url}  (GET /sim/sessions, POST /sim/sessions/ID/drop)\n"
            f"  metrics        http://127.0.0.1:{daemon.metrics_port}/metrics  (and /readyz)\n"
            f"  control socket {daemon.control_socket}  (try: .venv/bin/accountctl status)\n"
            f"  accounts       {accounts} across tenants {', '.join(TENANTS)}\n",
            flush=True,
        )

    daemon = Daemon(settings, on_ready=on_ready)
    reporter = asyncio.create_task(_report(daemon), name="accountd-demo-report")
    try:
        return await daemon.run()
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        await sim.stop()


async def _report(daemon: Daemon) -> None:
    """A line of counts per state every few seconds, so the lifecycle is visible at a glance."""
    while True:
        await asyncio.sleep(5)
        sup = daemon.supervisor
        if sup is None:
            continue
        counts = "  ".join(f"{s}={n}" for s, n in sup.snapshot_counts().items() if n)
        log.info("states: %s | transitions committed: %d", counts, sup.door.stats.committed)


def run_demo(accounts: int = 20, settings: Settings | None = None) -> int:
    base = settings or Settings()
    token = secrets.token_urlsafe(24)
    register_secret(token)
    state_dir = DEMO_DIR.absolute()
    _prepare(state_dir, token)
    return asyncio.run(_demo(accounts, base, state_dir, token))
