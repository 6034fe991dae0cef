"""`accountd.adapters.migrate`: upgrade, downgrade REV, current, on SQLite and MariaDB."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.util import CommandError
from sqlalchemy.engine import Connection

from accountd.adapters import migrate
from accountd.adapters.db import make_engine
from accountd.adapters.partitions import (
    FUTURE_PARTITION,
    PARTITIONED_TABLES,
    initial_partitions,
    list_partitions,
)
from accountd.adapters.schema import DAEMON_TABLES, tenants
from tests.conftest import sqlite_urls
from tests.seed_sql import parse_seed

SEED = parse_seed()
HEADS = {"core": "core_0001", "platform": "platform_0003", "analytics": "analytics_0001"}


def _objects(conn: Connection) -> set[str]:
    """Every table, and on SQLite every index and trigger too."""
    names = set(sa.inspect(conn).get_table_names())
    if conn.dialect.name == "sqlite":
        names |= {
            f"{kind}:{name}"
            for kind, name in conn.exec_driver_sql(
                "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
            )
        }
    return names


async def objects(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_objects)
    finally:
        await engine.dispose()


async def tables(url: str) -> set[str]:
    return {name for name in await objects(url) if ":" not in name}


def expected_tables(db: str) -> set[str]:
    extra = set(DAEMON_TABLES) if db == "platform" else set()
    return set(SEED.tables_of(db)) | extra | {migrate.VERSION_TABLES[db]}


async def test_current_is_none_before_and_head_after_upgrade(db_urls: dict[str, str]) -> None:
    assert await migrate.current(db_urls) == dict.fromkeys(HEADS)
    await migrate.upgrade(db_urls)
    assert await migrate.current(db_urls) == HEADS
    assert await migrate.heads() == HEADS
    for db, url in db_urls.items():
        assert await tables(url) == expected_tables(db)


async def test_upgrade_twice_is_a_no_op(db_urls: dict[str, str]) -> None:
    await migrate.upgrade(db_urls)
    before = {db: await objects(url) for db, url in db_urls.items()}
    await migrate.upgrade(db_urls)
    assert {db: await objects(url) for db, url in db_urls.items()} == before


async def test_downgrade_to_base_leaves_nothing(db_urls: dict[str, str]) -> None:
    await migrate.upgrade(db_urls)
    await migrate.downgrade(db_urls, "base")
    for url in db_urls.values():
        assert await objects(url) == set()  # not even the version table, trigger or index
    assert await migrate.current(db_urls) == dict.fromkeys(HEADS)


async def test_upgrade_downgrade_upgrade_round_trips(db_urls: dict[str, str]) -> None:
    await migrate.upgrade(db_urls)
    first = {db: await objects(url) for db, url in db_urls.items()}
    engine = make_engine(db_urls["core"])
    try:
        async with engine.begin() as conn:
            await conn.execute(tenants.insert().values(id="t1", tenant_name="a", tenant_code="c"))
        await migrate.downgrade(db_urls, "base")
        await migrate.upgrade(db_urls)
        async with engine.connect() as conn:
            count = await conn.scalar(sa.select(sa.func.count()).select_from(tenants))
    finally:
        await engine.dispose()
    assert {db: await objects(url) for db, url in db_urls.items()} == first
    assert count == 0  # base really dropped the data
    assert await migrate.current(db_urls) == HEADS


async def test_downgrade_of_one_database_leaves_the_others_alone(
    db_urls: dict[str, str],
) -> None:
    await migrate.upgrade(db_urls)
    await migrate.downgrade(db_urls, "platform:base")
    assert await migrate.current(db_urls) == {**HEADS, "platform": None}
    assert await tables(db_urls["platform"]) == set()
    assert await tables(db_urls["core"]) == expected_tables("core")
    await migrate.downgrade(db_urls, "core:-1, analytics:base")
    assert await migrate.current(db_urls) == dict.fromkeys(HEADS)


async def test_a_bare_revision_id_names_its_own_database(db_urls: dict[str, str]) -> None:
    await migrate.upgrade(db_urls, "analytics_0001")
    assert await migrate.current(db_urls) == {
        "core": None,
        "platform": None,
        "analytics": HEADS["analytics"],
    }
    await migrate.upgrade(db_urls)
    await migrate.downgrade(db_urls, "core_0001")  # already there: nothing to do
    assert await migrate.current(db_urls) == HEADS


@pytest.mark.parametrize(
    "spec",
    ["", "nosuch", "web:head", "core:head,core:base", "core:", "core_0001,platform:base"],
)
async def test_malformed_revisions_are_value_errors(spec: str, tmp_path: Path) -> None:
    urls = sqlite_urls(tmp_path)
    with pytest.raises(ValueError):
        await migrate.upgrade(urls, spec)
    with pytest.raises(ValueError):
        await migrate.downgrade(urls, spec)
    assert not list(tmp_path.iterdir())  # refused before touching any database


async def test_unknown_revision_of_a_named_database_is_alembics_error(tmp_path: Path) -> None:
    with pytest.raises(CommandError):
        await migrate.upgrade(sqlite_urls(tmp_path), "core:deadbeef")


async def test_upgrade_refuses_to_adopt_existing_seed_tables(db_urls: dict[str, str]) -> None:
    engine = make_engine(db_urls["core"])
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("CREATE TABLE tenants (id VARCHAR(36) PRIMARY KEY)"))
    finally:
        await engine.dispose()
    with pytest.raises(sa.exc.DatabaseError):
        await migrate.upgrade(db_urls, "core:head")
    assert await migrate.current(db_urls) == dict.fromkeys(HEADS)


@pytest.mark.parametrize("backend", ["mysql"], indirect=True)
async def test_partitioned_tables_start_at_the_current_utc_period(
    db_urls: dict[str, str],
) -> None:
    today = datetime.now(UTC).date()
    await migrate.upgrade(db_urls)
    for spec in PARTITIONED_TABLES:
        engine = make_engine(db_urls[spec.database])
        try:
            async with engine.connect() as conn:
                found = await list_partitions(conn, spec.table)
                expression = await conn.scalar(
                    sa.text(
                        "SELECT DISTINCT PARTITION_EXPRESSION FROM information_schema.PARTITIONS "
                        "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :t"
                    ),
                    {"t": spec.table},
                )
        finally:
            await engine.dispose()
        want = initial_partitions(spec, today)
        assert [(p.name, p.bound) for p in found] == [
            *((p.name, p.bound) for p in want),
            (FUTURE_PARTITION, None),
        ]
        assert want[0].start <= today < want[0].end
        assert len(want) == (3 if spec.period == "month" else 2)
        assert expression == f"unix_timestamp(`{spec.column}`)"


async def _supervision_indexes(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda c: {
                    str(i["name"]) for i in sa.inspect(c).get_indexes("accountd_supervision")
                }
            )
    finally:
        await engine.dispose()


async def test_platform_0002_drops_the_unread_supervision_index_and_0001_has_it(
    db_urls: dict[str, str],
) -> None:
    """The fresh path (0001 then 0002) and the way back (0002 → 0001) agree on the schema."""
    scoped = "accountd_supervision__idx_supervision_next_action_at"
    name = scoped if db_urls["platform"].startswith("sqlite") else "idx_supervision_next_action_at"
    await migrate.upgrade(db_urls, "platform_0001")
    assert await _supervision_indexes(db_urls["platform"]) == {name}
    await migrate.upgrade(db_urls)
    assert await _supervision_indexes(db_urls["platform"]) == set()
    await migrate.downgrade(db_urls, "platform_0001")
    assert await _supervision_indexes(db_urls["platform"]) == {name}
    await migrate.upgrade(db_urls)
    assert await _supervision_indexes(db_urls["platform"]) == set()


async def _platform_tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def test_platform_0003_adds_the_supervision_journal_and_0001_does_not(
    db_urls: dict[str, str],
) -> None:
    """The first revision leaves the journal out (it builds from today's MetaData), 0003 adds
    it, and the way back drops it again."""
    journal = "accountd_supervision_journal"
    await migrate.upgrade(db_urls, "platform_0002")
    assert journal not in await _platform_tables(db_urls["platform"])
    await migrate.upgrade(db_urls)
    assert journal in await _platform_tables(db_urls["platform"])
    await migrate.downgrade(db_urls, "platform_0002")
    assert journal not in await _platform_tables(db_urls["platform"])
