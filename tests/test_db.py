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
