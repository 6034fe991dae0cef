"""Engines: clear, password-free errors when a database cannot be reached."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from accountd.adapters.db import Databases, safe_url
from accountd.errors import DatabaseUnavailable


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_mysql_raises_database_unavailable_without_password(
    tmp_path: Path,
) -> None:
    port = closed_port()
    url = f"mysql+aiomysql://accountd:hunter2-secret@127.0.0.1:{port}/wework_platform"
    dbs = Databases(
        {
            "core": f"sqlite+aiosqlite:///{tmp_path / 'core.db'}",
            "platform": url,
            "analytics": f"sqlite+aiosqlite:///{tmp_path / 'analytics.db'}",
        }
    )
    try:
        await dbs.ping("core")
        with pytest.raises(DatabaseUnavailable) as info:
            await dbs.check_all()
        message = str(info.value)
        assert "platform" in message and str(port) in message
        assert "hunter2-secret" not in message
        assert "***" in message
    finally:
        await dbs.dispose()


def test_safe_url_masks_the_password() -> None:
    assert safe_url("mysql+aiomysql://u:p%40ss@h/db") == "mysql+aiomysql://u:***@h/db"


def test_cli_reports_an_unreachable_database_in_one_line(tmp_path: Path) -> None:
    port = closed_port()
    config = tmp_path / "accountd.toml"
    config.write_text(
        f'[databases]\nplatform = "mysql+aiomysql://accountd:hunter2-secret@127.0.0.1:{port}/p"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "accountd.cli", "db", "current", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "hunter2-secret" not in proc.stderr + proc.stdout


async def test_admin_reads_survive_a_connection_the_server_closed(
    migrated_urls: dict[str, str], backend: str
) -> None:
    # Admin reads use a pool without pre-ping (one round trip less per read under load); a
    # pooled connection the server killed must cost a retry, not an error.
    from sqlalchemy import text

    from accountd.adapters.db import fetch_all
    from accountd.adapters.repository import AccountRepository

    dbs = Databases(migrated_urls)
    try:
        reads = dbs.platform_reads
        repo = AccountRepository(dbs.platform, reads=reads)
        assert await repo.history("nobody") == []
        if backend == "sqlite":
            assert reads is dbs.platform  # nothing to gain on SQLite: same engine
            return
        assert reads is not dbs.platform
        assert reads.pool.size() <= 3
        (row,) = await fetch_all(reads, text("SELECT CONNECTION_ID()"))
        async with dbs.platform.connect() as conn:
            await conn.execute(text(f"KILL {int(row[0])}"))
        # The next read gets the dead connection from the pool, fails once, and is retried.
        assert await repo.history("nobody") == []
        (again,) = await fetch_all(reads, text("SELECT CONNECTION_ID()"))
        assert again[0] != row[0]
        # One round trip a read: autocommit, so the pool sends no ROLLBACK on return (one
        # connection in the pool since the KILL, so these ran on the one SHOW asks about).
        for _ in range(3):
            await repo.history("nobody")
        rollbacks = await fetch_all(reads, text("SHOW SESSION STATUS LIKE 'Com_rollback'"))
        assert [tuple(r) for r in rollbacks] == [("Com_rollback", "0")]
        # The side loop's engine (Databases.read_engine) is built the same way.
        side = dbs.read_engine()
        try:
            assert side.dialect.name == "mysql" and side.pool.size() <= 3
            (one,) = await fetch_all(side, text("SELECT @@autocommit"))
            assert one[0] == 1
        finally:
            await side.dispose()
    finally:
        await dbs.dispose()
