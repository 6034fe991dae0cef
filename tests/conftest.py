"""Shared fixtures: real databases only.

SQLite always; MariaDB/MySQL over a real connection whenever ``ACCOUNTD_TEST_MYSQL_URL`` is set
(for example ``mysql+aiomysql://root@127.0.0.1:3306/``). When the variable is set and the server
cannot be reached the fixture *fails*: CI sets it and a missing MariaDB must not hide as a skip.
Each test gets its own freshly named databases and drops them afterwards; nothing else on the
server is touched.
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

MYSQL_ENV = "ACCOUNTD_TEST_MYSQL_URL"
DB_KEYS = ("core", "platform", "analytics")


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """Collect garbage once the test's other fixtures are torn down (its event loop closed),
    before pytest looks for unraisable exceptions: an object the test leaked (a database
    connection left open) then fails that very test, by name. Without it a leak surfaced at
    some later collection, in whatever test happened to trigger one; in a CI run on 2026-12-04
    that was a static check inside `ast.parse`, where CPython 3.11.7 turned the finalizer's
    warning into ``SystemError: AST constructor recursion depth mismatch``. It costs little:
    the whole suite ran in 551-598 s with a collection after each test, 563-576 s in earlier
    runs without it (different machines, the same day).
    """
    yield
    gc.collect()


def mysql_server_url() -> str | None:
    return os.environ.get(MYSQL_ENV) or None


def _pymysql_connect(url: str):  # type: ignore[no-untyped-def]
    import pymysql

    u = make_url(url)
    return pymysql.connect(
        host=u.host or "127.0.0.1",
        port=u.port or 3306,
        user=u.username or "root",
        password=u.password or "",
        autocommit=True,
        connect_timeout=5,
    )


def make_mysql_databases(prefix: str = "accountd_t") -> tuple[dict[str, str], list[str]]:
    """Create three uniquely named databases; return their async URLs and the names to drop."""
    server = mysql_server_url()
    assert server is not None
    tag = uuid.uuid4().hex[:10]
    names = {key: f"{prefix}_{tag}_{key}" for key in DB_KEYS}
    try:
        conn = _pymysql_connect(server)
    except Exception as exc:  # the boundary: turn "cannot connect" into a loud failure
        pytest.fail(f"{MYSQL_ENV} is set but MariaDB is unreachable: {exc}")
    with conn, conn.cursor() as cur:
        for name in names.values():
            cur.execute(
                f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            )
    base = make_url(server).set(drivername="mysql+aiomysql")
    urls = {
        key: base.set(database=name).render_as_string(hide_password=False)
        for key, name in names.items()
    }
    return urls, list(names.values())


def drop_mysql_databases(names: list[str]) -> None:
    server = mysql_server_url()
    assert server is not None
    conn = _pymysql_connect(server)
    with conn, conn.cursor() as cur:
        for name in names:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


def sqlite_urls(directory: Path) -> dict[str, str]:
    return {key: f"sqlite+aiosqlite:///{directory / (key + '.db')}" for key in DB_KEYS}


@pytest.fixture(params=["sqlite", "mysql"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "mysql" and mysql_server_url() is None:
        pytest.skip(f"MariaDB tests need {MYSQL_ENV} (e.g. mysql+aiomysql://root@127.0.0.1:3306/)")
    return str(request.param)


@pytest.fixture
def db_urls(backend: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """URLs of three empty databases (core, platform, analytics) on the chosen backend."""
    if backend == "sqlite":
        yield sqlite_urls(tmp_path)
        return
    urls, names = make_mysql_databases()
    try:
        yield urls
    finally:
        drop_mysql_databases(names)


@pytest.fixture
async def migrated_urls(db_urls: dict[str, str]) -> dict[str, str]:
    """``db_urls`` upgraded to the current schema (all three databases)."""
    from accountd.adapters import migrate

    await migrate.upgrade(db_urls)
    return db_urls
