"""The seed's SQL as written, run on MariaDB: where it fails, and that each correction is needed.

docs/schema.md quotes the error codes asserted here. The corrected schema itself (what our
migrations create) is checked in test_schema.py and test_migrations.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from accountd.adapters.db import make_engine
from accountd.adapters.partitions import PARTITIONED_TABLES, initial_partitions, partition_by_sql
from tests.seed_sql import parse_seed

pytestmark = pytest.mark.parametrize("backend", ["mysql"], indirect=True)

SEED = parse_seed()
TODAY_SPEC = {spec.table: spec for spec in PARTITIONED_TABLES}


async def run(conn: AsyncConnection, sql: str) -> tuple[int, str] | None:
    """Execute `sql`; the server's (code, message) if it refuses."""
    try:
        await conn.exec_driver_sql(sql)
    except DBAPIError as exc:
        code, message = exc.orig.args[:2]  # type: ignore[union-attr]
        return int(code), str(message)
    return None


def statement_key(sql: str) -> str:
    m = re.match(r"CREATE (?:TABLE|INDEX)\s+(\w+)", sql)
    assert m, sql
    return m.group(1)


async def run_seed_as_written(conn: AsyncConnection) -> dict[str, tuple[int, str]]:
    failures: dict[str, tuple[int, str]] = {}
    for statement in SEED.statements:
        refused = await run(conn, statement.sql)
        if refused:
            failures[statement_key(statement.sql)] = refused
    return failures


@pytest.fixture
async def conn(db_urls: dict[str, str]) -> AsyncIterator[AsyncConnection]:
    # One scratch database for all 24 tables: the seed's names do not collide.
    engine = make_engine(db_urls["core"])
    try:
        async with engine.connect() as c:
            yield await c.execution_options(isolation_level="AUTOCOMMIT")
    finally:
        await engine.dispose()


# --- text surgery on the seed's statements, one correction at a time ---------------------------


def comment_before_partition(sql: str) -> str:
    m = re.search(r"\)\s*(COMMENT='[^']*')\s*$", sql)
    assert m, sql
    sql = sql[: m.start()] + ")"
    return sql.replace("PARTITION BY", m.group(1) + "\nPARTITION BY", 1)


def time_in_primary_key(sql: str, column: str) -> str:
    assert "id VARCHAR(36) PRIMARY KEY" in sql
    sql = sql.replace("id VARCHAR(36) PRIMARY KEY", "id VARCHAR(36)", 1)
    return re.sub(r"(\n\s*)INDEX ", rf"\1PRIMARY KEY (id, {column}),\1INDEX ", sql, count=1)


def without_foreign_keys(sql: str) -> str:
    out = re.sub(r",\s*FOREIGN KEY \([^)]*\) REFERENCES \w+\(\w+\)(?: ON DELETE \w+)?", "", sql)
    assert "FOREIGN KEY" not in out
    return out


def code(refused: tuple[int, str] | None) -> int | None:
    return refused[0] if refused else None


# --- the tests ----------------------------------------------------------------------------------


async def test_the_seed_as_written_fails_on_5_tables_and_2_indexes(conn: AsyncConnection) -> None:
    failures = await run_seed_as_written(conn)
    assert {key: c for key, (c, _) in failures.items()} == {
        "message_records": 1064,  # COMMENT= after PARTITION BY: syntax error
        "message_callbacks": 1005,  # FK to message_records, which does not exist (errno 150)
        "file_resources": 1291,  # storage_type has duplicated value 'oss' in ENUM
        "file_usage_records": 1005,  # FK to file_resources, which does not exist
        "account_metrics": 1064,  # COMMENT= after PARTITION BY
        "idx_account_status_sent": 1146,  # on message_records: doesn't exist
        "idx_account_metric_time": 1146,  # on account_metrics: doesn't exist
    }
    assert "near 'COMMENT='消息发送记录表''" in failures["message_records"][1]
    assert "duplicated value 'oss' in ENUM" in failures["file_resources"][1]
    assert "errno: 150" in failures["message_callbacks"][1]
    # `groups` unquoted is accepted by MariaDB (reserved only in MySQL 8.0.2+).
    assert await run(conn, "SELECT COUNT(*) FROM `groups`") is None


async def test_partitioned_message_records_needs_every_correction(conn: AsyncConnection) -> None:
    await run_seed_as_written(conn)
    seed = SEED.tables["message_records"].sql
    moved = comment_before_partition(seed)
    # Comment fixed: partitioned tables cannot hold foreign keys (with or without the key fix).
    assert code(await run(conn, moved)) == 1506
    assert code(await run(conn, time_in_primary_key(moved, "created_at"))) == 1506
    # Foreign keys dropped: the primary key lacks the partition column.
    assert code(await run(conn, without_foreign_keys(moved))) == 1503
    assert await run(conn, time_in_primary_key(without_foreign_keys(moved), "created_at")) is None
    # Nor be the target of one: the seed's message_callbacks still fails, and passes without.
    callbacks = SEED.tables["message_callbacks"].sql
    assert code(await run(conn, callbacks)) == 1005
    assert await run(conn, without_foreign_keys(callbacks)) is None
    extra = next(s.sql for s in SEED.statements if "idx_account_status_sent ON" in s.sql)
    assert await run(conn, extra) is None


async def test_partitioned_account_metrics_and_its_duplicate_index(conn: AsyncConnection) -> None:
    await run_seed_as_written(conn)
    moved = comment_before_partition(SEED.tables["account_metrics"].sql)
    assert code(await run(conn, moved)) == 1503
    assert await run(conn, time_in_primary_key(moved, "recorded_at")) is None
    # The optimisation section declares idx_account_metric_time again.
    again = next(s.sql for s in SEED.statements if "idx_account_metric_time ON" in s.sql)
    assert code(await run(conn, again)) == 1061  # Duplicate key name


async def test_operation_logs_can_only_be_partitioned_without_its_foreign_keys(
    conn: AsyncConnection,
) -> None:
    await run_seed_as_written(conn)
    spec = TODAY_SPEC["operation_logs"]
    partition = partition_by_sql(spec, initial_partitions(spec, datetime.now(UTC).date()))
    # As the seed creates it: MariaDB refuses on the foreign keys first (1217).
    assert code(await run(conn, partition)) == 1217
    seed = SEED.tables["operation_logs"].sql
    await conn.exec_driver_sql("DROP TABLE operation_logs")
    await conn.exec_driver_sql(without_foreign_keys(seed))
    assert code(await run(conn, partition)) == 1503  # PK (id) lacks created_at
    await conn.exec_driver_sql("DROP TABLE operation_logs")
    await conn.exec_driver_sql(time_in_primary_key(without_foreign_keys(seed), "created_at"))
    assert await run(conn, partition) is None


async def test_file_resources_with_s3_creates_and_so_does_file_usage_records(
    conn: AsyncConnection,
) -> None:
    await run_seed_as_written(conn)
    fixed = SEED.tables["file_resources"].sql.replace("'cos', 'oss')", "'cos', 's3')")
    assert fixed != SEED.tables["file_resources"].sql
    assert await run(conn, fixed) is None
    assert await run(conn, SEED.tables["file_usage_records"].sql) is None
