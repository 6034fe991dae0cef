"""What the benchmarks share: their databases, bulk seeding, process figures and the table.

Every run gets its own databases and removes them afterwards: three SQLite files in a temporary
directory (the default), or three uniquely named MariaDB/MySQL databases on the server named by
``ACCOUNTD_BENCH_MYSQL_URL`` (default ``mysql+aiomysql://root@127.0.0.1:3306/``) with ``--db
mysql``. Nothing else on the server is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from accountd.adapters import migrate
from accountd.adapters.db import make_engine
from accountd.adapters.schema import accountd_supervision, tenants, wework_accounts

MYSQL_ENV = "ACCOUNTD_BENCH_MYSQL_URL"
DEFAULT_MYSQL = "mysql+aiomysql://root@127.0.0.1:3306/"
DB_KEYS = ("core", "platform", "analytics")
SEED_CHUNK = 5000


def add_db_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        choices=("sqlite", "mysql"),
        default="sqlite",
        help=f"sqlite (temporary directory) or mysql (server from ${MYSQL_ENV}, "
        f"default {DEFAULT_MYSQL}); own databases, dropped afterwards",
    )


def mysql_server() -> str:
    return os.environ.get(MYSQL_ENV) or DEFAULT_MYSQL


@contextlib.asynccontextmanager
async def bench_databases(
    kind: str, prefix: str = "accountd_bench"
) -> AsyncIterator[dict[str, str]]:
    """Three fresh databases migrated to the current schema; removed on exit."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix=f"{prefix}_") as tmp:
            urls = {k: f"sqlite+aiosqlite:///{Path(tmp) / (k + '.db')}" for k in DB_KEYS}
            await migrate.upgrade(urls)
            yield urls
        return
    server = make_url(mysql_server()).set(drivername="mysql+aiomysql", database=None)
    tag = uuid.uuid4().hex[:8]
    names = {k: f"{prefix}_{tag}_{k}" for k in DB_KEYS}
    admin = create_async_engine(server, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            for name in names.values():
                await conn.execute(
                    text(
                        f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                    )
                )
        urls = {
            k: server.set(database=n).render_as_string(hide_password=False)
            for k, n in names.items()
        }
        try:
            await migrate.upgrade(urls)
            yield urls
        finally:
            async with admin.connect() as conn:
                for name in names.values():
                    await conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
    finally:
        await admin.dispose()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class Group:
    """A slice of the seeded accounts: how many, in which status."""

    name: str
    count: int
    status: str
    # Seconds from now at which the supervision row says the next action is due.
    next_action_in: float = 600.0


async def seed(
    urls: dict[str, str], groups: Sequence[Group], tenants_n: int = 10
) -> dict[str, list[str]]:
    """Bulk-insert accounts (with supervision rows, so the daemon restores rather than repairs).

    Returns the ids of each group. Ids are random UUIDs, as other services create them.
    """
    now = utcnow()
    tenant_ids = [str(uuid.uuid4()) for _ in range(tenants_n)]
    core = make_engine(urls["core"])
    try:
        async with core.begin() as conn:
            await conn.execute(
                insert(tenants),
                [
                    {"id": t, "tenant_name": f"bench {i}", "tenant_code": f"bench{i}"}
                    for i, t in enumerate(tenant_ids)
                ],
            )
    finally:
        await core.dispose()
    out: dict[str, list[str]] = {}
    engine = make_engine(urls["platform"])
    serial = 0
    try:
        for group in groups:
            ids = [str(uuid.uuid4()) for _ in range(group.count)]
            out[group.name] = ids
            for start in range(0, len(ids), SEED_CHUNK):
                chunk = ids[start : start + SEED_CHUNK]
                accounts = []
                supervision = []
                for account_id in chunk:
                    serial += 1
                    accounts.append(
                        {
                            "id": account_id,
                            "tenant_id": tenant_ids[serial % tenants_n],
                            "account_name": f"bench-{serial}",
                            "wework_guid": f"bench-guid-{serial}",
                            "status": group.status,
                            "last_heartbeat_at": now if group.status == "online" else None,
                            "created_at": now,
                        }
                    )
                    supervision.append(
                        {
                            "account_id": account_id,
                            "status": group.status,
                            "entered_at": now,
                            "attempts": 0,
                            "qr_refreshes": 0,
                            "next_action": "heartbeat" if group.status == "online" else "timeout",
                            "next_action_at": now + dt.timedelta(seconds=group.next_action_in),
                            "online_since": now if group.status == "online" else None,
                            "offline_history": [],
                            "paused": False,
                            "epoch": 0,
                            "updated_at": now,
                        }
                    )
                async with engine.begin() as conn:
                    await conn.execute(insert(wework_accounts), accounts)
                    if group.status != "created":
                        await conn.execute(insert(accountd_supervision), supervision)
    finally:
        await engine.dispose()
    return out


# ---------------------------------------------------------------- figures


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def machine() -> dict[str, str]:
    mem = ""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


async def server_version(url: str) -> str:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                version = (await conn.execute(text("select sqlite_version()"))).scalar()
                return f"SQLite {version} (aiosqlite, WAL, synchronous=NORMAL)"
            row = (
                await conn.execute(
                    text(
                        "select version(), @@innodb_flush_log_at_trx_commit, "
                        "@@innodb_buffer_pool_size"
                    )
                )
            ).one()
            return (
                f"{row[0]} (aiomysql; innodb_flush_log_at_trx_commit={row[1]}, "
                f"buffer pool {int(row[2]) // 2**20} MiB)"
            )
    finally:
        await engine.dispose()


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]], out: Any = None) -> None:
    """A Markdown table (so it can be pasted into docs/benchmarks.md as printed)."""
    out = out or sys.stdout
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    print(line(cells[0]), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for r in cells[1:]:
        print(line(r), file=out)
    out.flush()


def dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))
