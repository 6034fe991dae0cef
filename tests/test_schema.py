"""The migrated schema against the seed's SQL, parsed from docs/seed/database-design.md.

Every expectation comes from the seed text except the corrections of BRIEF §5, which are
spelled out below (and each one is shown necessary on MariaDB in test_seed_on_mariadb.py).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.schema import CreateTable

from accountd.adapters import migrate
from accountd.adapters.db import make_engine
from accountd.adapters.schema import (
    DAEMON_TABLES,
    METADATA,
    accountd_supervision,
    groups,
    tenants,
    wework_accounts,
)
from accountd.adapters.schema.types import sqlite_index_name, updated_at_trigger_name
from tests.seed_sql import Seed, SeedColumn, SeedIndex, parse_seed

SEED = parse_seed()

# BRIEF §5 corrections, as data.
PARTITION_COLUMN = {
    "message_records": "created_at",
    "account_metrics": "recorded_at",
    "operation_logs": "created_at",
}
ENUM_FIXES = {("file_resources", "storage_type"): ("local", "oss", "cos", "s3")}
# Foreign keys from or to a partitioned table: (table, referred table).
DROPPED_FKS = {
    ("message_records", "message_tasks"),
    ("message_records", "wework_accounts"),
    ("message_callbacks", "message_records"),
    ("operation_logs", "tenants"),
    ("operation_logs", "users"),
}


# --- what the seed says, corrected ----------------------------------------------------------


def expected_type(table: str, col: SeedColumn) -> tuple[str, ...]:
    if col.type == "ENUM":
        return ("ENUM", *ENUM_FIXES.get((table, col.name), col.args))
    family = {"INT": "INT", "INTEGER": "INT", "BOOL": "BOOLEAN"}.get(col.type, col.type)
    return (family, *col.args)


def expected_nullable(table: str, col: SeedColumn) -> bool:
    # The partition column joins the primary key, which makes it NOT NULL.
    return col.nullable and PARTITION_COLUMN.get(table) != str(col.name)


def expected_primary_key(table: str) -> tuple[str, ...]:
    pk = SEED.tables[table].primary_key
    return (*pk, PARTITION_COLUMN[table]) if table in PARTITION_COLUMN else pk


def expected_indexes(seed: Seed, table: str) -> dict[str, tuple[tuple[str, ...], bool]]:
    out = {i.name: (i.columns, i.unique) for i in seed.tables[table].indexes}
    for t, idx in seed.extra_indexes:
        if t != table:
            continue
        if idx.name in out:
            # idx_account_metric_time: declared twice, identically; created once.
            assert out[idx.name] == (idx.columns, idx.unique)
        out[idx.name] = (idx.columns, idx.unique)
    return out


def implicit_fk_indexes(table: str) -> dict[str, tuple[tuple[str, ...], bool]]:
    """MySQL adds an index, named after the column, for a foreign key no index covers."""
    seed_table = SEED.tables[table]
    covering = [seed_table.primary_key] + [i.columns for i in seed_table.indexes]
    return {
        fk.columns[0]: (fk.columns, False)
        for fk in seed_table.foreign_keys
        if (table, fk.ref_table) not in DROPPED_FKS
        and not any(cols[: len(fk.columns)] == fk.columns for cols in covering)
    }


def expected_fks(table: str) -> set[tuple[tuple[str, ...], str, tuple[str, ...], str | None]]:
    return {
        (fk.columns, fk.ref_table, fk.ref_columns, fk.on_delete)
        for fk in SEED.tables[table].foreign_keys
        if (table, fk.ref_table) not in DROPPED_FKS
    }


def normalize_default(text: str | None) -> str | None:
    if text is None:
        return None
    s = re.sub(r"\s+ON UPDATE\s+.*$", "", text.strip(), flags=re.I).lower()
    s = s.replace("current_timestamp()", "current_timestamp")
    if len(s) >= 2 and s[0] == s[-1] == "'":
        s = s[1:-1]
    return {"false": "0", "true": "1"}.get(s, s)


# --- what the database says -------------------------------------------------------------------


def _gather(conn: Connection) -> dict[str, dict[str, Any]]:
    insp = sa.inspect(conn)
    out: dict[str, dict[str, Any]] = {}
    for t in insp.get_table_names():
        info: dict[str, Any] = {
            "columns": {c["name"]: c for c in insp.get_columns(t)},
            "pk": tuple(insp.get_pk_constraint(t)["constrained_columns"]),
            "indexes": insp.get_indexes(t),
            "uniques": insp.get_unique_constraints(t),
            "fks": insp.get_foreign_keys(t),
            "checks": insp.get_check_constraints(t),
        }
        if conn.dialect.name == "mysql":
            info["comment"] = insp.get_table_comment(t)["text"]
            info["options"] = insp.get_table_options(t)
            # MariaDB's JSON is LONGTEXT + CHECK (json_valid(col)), a column-level check that
            # SQLAlchemy does not reflect.
            info["json_columns"] = {
                m.group(1)
                for (clause,) in conn.execute(
                    sa.text(
                        "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS "
                        "WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME = :t"
                    ),
                    {"t": t},
                )
                if (m := re.fullmatch(r"json_valid\(`(\w+)`\)", clause))
            }
        else:
            info["triggers"] = {
                row[0]
                for row in conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?", (t,)
                )
            }
        out[t] = info
    return out


async def reflect(url: str) -> dict[str, dict[str, Any]]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_gather)
    finally:
        await engine.dispose()


@pytest.fixture
async def schema(db_urls: dict[str, str]) -> dict[str, dict[str, dict[str, Any]]]:
    """The three databases upgraded to head, reflected: {db: {table: info}}."""
    await migrate.upgrade(db_urls)
    return {key: await reflect(url) for key, url in db_urls.items()}


def actual_type(info: dict[str, Any], column: dict[str, Any]) -> tuple[str, ...]:
    t = column["type"]
    json_checked = column["name"] in info.get("json_columns", ())
    if isinstance(t, mysql.ENUM):
        return ("ENUM", *t.enums)
    if isinstance(t, sa.JSON) or (isinstance(t, mysql.LONGTEXT) and json_checked):
        return ("JSON",)
    if isinstance(t, sa.Boolean) or (isinstance(t, mysql.TINYINT) and t.display_width == 1):
        return ("BOOLEAN",)
    if isinstance(t, sa.BigInteger):
        return ("BIGINT",)
    if isinstance(t, sa.Integer):
        return ("INT",)
    if isinstance(t, sa.TIMESTAMP):
        return ("TIMESTAMP",)
    if isinstance(t, sa.Numeric):
        return ("DECIMAL", str(t.precision), str(t.scale))
    if isinstance(t, sa.Date):
        return ("DATE",)
    if isinstance(t, sa.Text):
        return ("TEXT",)
    if isinstance(t, sa.String):
        return ("VARCHAR", str(t.length))
    raise AssertionError(f"unexpected reflected type {t!r}")


def sqlite_enum_values(info: dict[str, Any], column: str) -> tuple[str, ...] | None:
    for check in info["checks"]:
        m = re.fullmatch(rf"\s*{column} IN \((.*)\)\s*", check["sqltext"], re.S)
        if m:
            return tuple(re.findall(r"'([^']*)'", m.group(1)))
    return None


def actual_indexes(table: str, info: dict[str, Any], backend: str) -> dict[str, Any]:
    if backend == "mysql":
        return {i["name"]: (tuple(i["column_names"]), bool(i["unique"])) for i in info["indexes"]}
    out: dict[str, Any] = {}
    for i in info["indexes"]:
        prefix = sqlite_index_name(table, "")
        assert i["name"].startswith(prefix), i["name"]
        out[i["name"][len(prefix) :]] = (tuple(i["column_names"]), bool(i["unique"]))
    for u in info["uniques"]:
        out[u["name"]] = (tuple(u["column_names"]), True)
    return out


# --- the seed as parsed ------------------------------------------------------------------------


def test_seed_defines_24_tables_split_11_10_3() -> None:
    assert {db: len(SEED.tables_of(db)) for db in METADATA} == {
        "core": 11,
        "platform": 10,
        "analytics": 3,
    }
    assert [(t, i.name) for t, i in SEED.extra_indexes] == [
        ("wework_accounts", "idx_tenant_status_created"),
        ("message_records", "idx_account_status_sent"),
        ("message_tasks", "idx_tenant_type_created"),
        ("account_metrics", "idx_account_metric_time"),
    ]


def test_only_message_tasks_template_id_gets_an_implicit_index() -> None:
    found = {t: implicit_fk_indexes(t) for t in SEED.tables if implicit_fk_indexes(t)}
    assert found == {"message_tasks": {"template_id": (("template_id",), False)}}


def test_corrections_refer_to_what_the_seed_really_says() -> None:
    assert SEED.tables["file_resources"].columns["storage_type"].args == (
        "local",
        "oss",
        "cos",
        "oss",
    )
    seed_fks = {(t.name, fk.ref_table) for t in SEED.tables.values() for fk in t.foreign_keys}
    assert seed_fks >= DROPPED_FKS
    assert {t: PARTITION_COLUMN.get(t) for t, s in SEED.tables.items() if s.partition_by} == {
        "message_records": "created_at",
        "account_metrics": "recorded_at",
    }
    assert SEED.tables["account_metrics"].indexes[-1] == SeedIndex(
        "idx_account_metric_time", ("account_id", "metric_type", "recorded_at"), False
    )


def test_metadata_holds_the_seed_tables_per_database_plus_the_daemon_tables() -> None:
    for db, metadata in METADATA.items():
        extra = set(DAEMON_TABLES) if db == "platform" else set()
        assert set(metadata.tables) == set(SEED.tables_of(db)) | extra


def test_groups_table_is_always_quoted() -> None:
    for dialect in (mysql.dialect(), sqlite.dialect()):
        ddl = str(CreateTable(groups).compile(dialect=dialect))
        assert re.match(r"\s*CREATE TABLE [`\"]groups[`\"] \(", ddl), ddl
    query = str(sa.select(groups.c.id).compile(dialect=mysql.dialect()))
    assert "FROM `groups`" in query


# --- the migrated databases ---------------------------------------------------------------------


async def test_upgrade_creates_each_seed_table_in_its_database(
    schema: dict[str, dict[str, Any]],
) -> None:
    for db, tables in schema.items():
        extra = {migrate.VERSION_TABLES[db]}
        if db == "platform":
            extra |= set(DAEMON_TABLES)
        assert set(tables) == set(SEED.tables_of(db)) | extra


async def test_every_seed_column_has_the_seed_type_nullability_and_default(
    schema: dict[str, dict[str, Any]], backend: str
) -> None:
    checked = 0
    for db, tables in schema.items():
        for name, seed_table in SEED.tables_of(db).items():
            info = tables[name]
            assert list(info["columns"]) == list(seed_table.columns), name
            for col in seed_table.columns.values():
                actual = info["columns"][col.name]
                where = f"{name}.{col.name}"
                want = expected_type(name, col)
                got = actual_type(info, actual)
                if want[0] == "ENUM" and backend == "sqlite":
                    assert got == ("VARCHAR", str(max(len(v) for v in want[1:]))), where
                    assert sqlite_enum_values(info, col.name) == want[1:], where
                else:
                    assert got == want, where
                assert actual["nullable"] is expected_nullable(name, col), where
                assert normalize_default(actual["default"]) == normalize_default(col.default), where
                if backend == "mysql":
                    assert actual["comment"] == col.comment, where
                    on_update = "ON UPDATE" in (actual["default"] or "").upper()
                    assert on_update is (col.on_update == "CURRENT_TIMESTAMP"), where
                elif col.on_update:
                    assert updated_at_trigger_name(name) in info["triggers"], where
                checked += 1
    assert checked == sum(len(t.columns) for t in SEED.tables.values())


async def test_keys_and_indexes_are_as_written(
    schema: dict[str, dict[str, Any]], backend: str
) -> None:
    for db, tables in schema.items():
        for name in SEED.tables_of(db):
            info = tables[name]
            assert info["pk"] == expected_primary_key(name), name
            want = expected_indexes(SEED, name)
            if backend == "mysql":
                want |= implicit_fk_indexes(name)
            assert actual_indexes(name, info, backend) == want, name
            fks = {
                (
                    tuple(fk["constrained_columns"]),
                    fk["referred_table"],
                    tuple(fk["referred_columns"]),
                    fk["options"].get("ondelete"),
                )
                for fk in info["fks"]
            }
            assert fks == expected_fks(name), name
            if backend == "mysql":
                # Unnamed in the seed: MySQL's own names, numbered in declaration order.
                names = sorted(fk["name"] for fk in info["fks"])
                assert names == [f"{name}_ibfk_{n}" for n in range(1, len(names) + 1)], name


@pytest.mark.parametrize("backend", ["mysql"], indirect=True)
async def test_tables_are_innodb_utf8mb4_with_the_seed_comments(
    schema: dict[str, dict[str, Any]],
) -> None:
    for db, tables in schema.items():
        for name, seed_table in SEED.tables_of(db).items():
            info = tables[name]
            assert info["comment"] == seed_table.comment, name
            assert info["options"]["mysql_engine"] == "InnoDB", name
            assert info["options"]["mysql_default charset"] == "utf8mb4", name


# --- the daemon's own tables --------------------------------------------------------------------

DAEMON_COLUMNS = {
    "accountd_supervision": [
        ("account_id", ("VARCHAR", "36"), False),
        ("status", ("VARCHAR", "32"), False),
        ("entered_at", ("DATETIME",), False),
        ("attempts", ("INT",), False),
        ("qr_refreshes", ("INT",), False),
        ("next_action", ("VARCHAR", "32"), True),
        ("next_action_at", ("DATETIME",), True),
        ("online_since", ("DATETIME",), True),
        ("offline_history", ("JSON",), True),
        ("paused", ("BOOLEAN",), False),
        ("paused_reason", ("VARCHAR", "255"), True),
        ("last_log_id", ("VARCHAR", "36"), True),
        ("epoch", ("BIGINT",), False),
        ("updated_at", ("DATETIME",), False),
    ],
    "accountd_leases": [
        ("name", ("VARCHAR", "64"), False),
        ("holder", ("VARCHAR", "255"), False),
        ("epoch", ("BIGINT",), False),
        ("acquired_at", ("DATETIME",), False),
        ("renewed_at", ("DATETIME",), False),
        ("expires_at", ("DATETIME",), False),
    ],
    "accountd_supervision_journal": [
        ("id", ("BIGINT",), False),  # SQLite: INTEGER, its rowid (see `daemon_type`)
        ("row_count", ("INT",), False),
        ("entries", ("MEDIUMTEXT",), False),  # SQLite: TEXT
        ("created_at", ("DATETIME",), False),
    ],
}


def daemon_type(info: dict[str, Any], column: dict[str, Any], backend: str) -> tuple[str, ...]:
    t = column["type"]
    if isinstance(t, sa.DateTime) and not isinstance(t, sa.TIMESTAMP):
        if backend == "mysql":
            assert isinstance(t, mysql.DATETIME) and t.fsp == 6, column
        return ("DATETIME",)
    if column["name"] == "entries" and backend == "sqlite" and isinstance(t, sa.Text):
        return ("MEDIUMTEXT",)  # the MySQL variant of the journal's column
    if isinstance(t, mysql.MEDIUMTEXT):
        return ("MEDIUMTEXT",)
    if column["name"] == "id" and backend == "sqlite" and isinstance(t, sa.Integer):
        return ("BIGINT",)  # the MySQL variant; SQLite's INTEGER PRIMARY KEY is its rowid
    return actual_type(info, column)


async def test_daemon_tables_have_the_agreed_columns(
    schema: dict[str, dict[str, Any]], backend: str
) -> None:
    platform = schema["platform"]
    for table, columns in DAEMON_COLUMNS.items():
        info = platform[table]
        got = [
            (c["name"], daemon_type(info, c, backend), c["nullable"])
            for c in info["columns"].values()
        ]
        assert got == columns, table
        if backend == "mysql":
            assert info["comment"], table
            assert all(c["comment"] for c in info["columns"].values()), table
    sup = platform["accountd_supervision"]
    assert sup["pk"] == ("account_id",)
    # No secondary index: platform_0002 dropped the one on next_action_at, which no query read
    # and every status change rewrote.
    assert actual_indexes("accountd_supervision", sup, backend) == {}
    assert [
        (fk["referred_table"], fk["referred_columns"], fk["options"].get("ondelete"))
        for fk in sup["fks"]
    ] == [("wework_accounts", ["id"], "CASCADE")]
    assert platform["accountd_leases"]["pk"] == ("name",)
    defaults = {c["name"]: normalize_default(c["default"]) for c in sup["columns"].values()}
    assert (defaults["attempts"], defaults["qr_refreshes"], defaults["paused"]) == ("0", "0", "0")
    assert defaults["epoch"] == "0"


# --- behaviour ----------------------------------------------------------------------------------


async def test_updated_at_refreshes_on_update_and_an_explicit_value_wins(
    db_urls: dict[str, str],
) -> None:
    await migrate.upgrade(db_urls)
    engine = make_engine(db_urls["core"])
    old = datetime(2020, 1, 1)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                tenants.insert().values(id="t1", tenant_name="a", tenant_code="c1", updated_at=old)
            )
            await conn.execute(tenants.update().where(tenants.c.id == "t1").values(tenant_name="b"))
            refreshed = (await conn.execute(sa.select(tenants.c.updated_at))).scalar_one()
            explicit = datetime(2021, 6, 1, 12, 0, 0)
            await conn.execute(
                tenants.update()
                .where(tenants.c.id == "t1")
                .values(tenant_name="c", updated_at=explicit)
            )
            kept = (await conn.execute(sa.select(tenants.c.updated_at))).scalar_one()
    finally:
        await engine.dispose()
    now = datetime.now(UTC).replace(tzinfo=None)
    assert abs(refreshed - now) < timedelta(minutes=1)  # UTC, fresh
    assert kept == explicit


async def test_enum_columns_reject_values_outside_the_seed_list(
    db_urls: dict[str, str], backend: str
) -> None:
    await migrate.upgrade(db_urls)
    engine = make_engine(db_urls["platform"])
    try:
        async with engine.begin() as conn:
            await conn.execute(
                wework_accounts.insert().values(
                    id="a1", tenant_id="t", account_name="n", wework_guid="g1", status="online"
                )
            )
        # Bypass SQLAlchemy's own Enum validation: the database must refuse it (MySQL: in
        # strict mode, the server default since 5.7/10.2.4; SQLite: the CHECK constraint).
        with pytest.raises(DataError if backend == "mysql" else IntegrityError):
            async with engine.begin() as conn:
                await conn.exec_driver_sql(
                    "UPDATE wework_accounts SET status = 'sleeping' WHERE id = 'a1'"
                )
    finally:
        await engine.dispose()


async def test_supervision_row_goes_with_its_account(db_urls: dict[str, str]) -> None:
    await migrate.upgrade(db_urls)
    engine = make_engine(db_urls["platform"])
    now = datetime(2025, 1, 1, 0, 0, 0, 123456)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                wework_accounts.insert().values(
                    id="a1", tenant_id="t", account_name="n", wework_guid="g1"
                )
            )
            await conn.execute(
                accountd_supervision.insert().values(
                    account_id="a1",
                    status="created",
                    entered_at=now,
                    updated_at=now,
                    offline_history=["2025-01-01T00:00:00Z"],
                )
            )
            row = (await conn.execute(sa.select(accountd_supervision))).one()
            assert row.entered_at == now  # microseconds survive (DATETIME(6))
            assert (row.attempts, row.qr_refreshes, row.paused, row.epoch) == (0, 0, False, 0)
            assert row.offline_history == ["2025-01-01T00:00:00Z"]
            await conn.execute(wework_accounts.delete().where(wework_accounts.c.id == "a1"))
            left = await conn.execute(sa.select(sa.func.count()).select_from(accountd_supervision))
            assert left.scalar_one() == 0
    finally:
        await engine.dispose()
