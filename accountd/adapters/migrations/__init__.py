"""Alembic script directories, one per database: ``core/``, ``platform/``, ``analytics/``.

Each holds only ``versions/``: there is no ``env.py`` nor ``alembic.ini``, because
`accountd.adapters.migrate` drives Alembic programmatically on the daemon's own engines, and
each database keeps its own version table (``alembic_version_core`` …), so the three histories
stay independent even if two of them share one server schema.

Writing a new revision: add ``versions/<db>_NNNN_<what>.py`` by hand with ``revision =
"<db>_NNNN"`` and ``down_revision`` the previous head of *that* database, and use explicit
``op.*`` calls (never ``MetaData.create_all``: see the initial revisions), guarding
MySQL-only DDL with ``op.get_bind().dialect.name``. Revision ids carry the database name so a
bare id given to ``accountd db downgrade`` names one database unambiguously.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIGRATIONS_DIR = Path(__file__).resolve().parent


def script_location(database: str) -> Path:
    return MIGRATIONS_DIR / database


# Tables of the MetaData that a later revision creates: not part of the first revisions.
ADDED_LATER: dict[str, tuple[str, ...]] = {"platform": ("accountd_supervision_journal",)}


def _initial_tables(database: str) -> list[Any]:
    from accountd.adapters.schema import METADATA

    later = ADDED_LATER.get(database, ())
    return [t for t in METADATA[database].sorted_tables if t.name not in later]


def create_initial(database: str) -> None:
    """Body of each database's first revision: its seed tables (and ours), partitioned on MySQL.

    Creates the tables from `accountd.adapters.schema.METADATA[database]` as it stands, which
    is right only while that MetaData *is* the first revision: before the first schema change
    lands, the initial revisions must be frozen (``create_all`` replaced by the equivalent
    ``op.create_table`` calls), or a fresh database would get the new columns here and then
    fail in the revision that adds them. What a later revision removes is put back by the
    first revision's own ``upgrade`` (platform_0001 creates `supervision_next_action_at_index`
    for platform_0002 to drop), and a table a later revision adds is left out of it
    (`ADDED_LATER`), so both paths end in the same schema.
    """
    from datetime import UTC, datetime

    from alembic import op

    from accountd.adapters.partitions import (
        initial_partitions,
        partition_by_sql,
        partitioned_tables,
    )
    from accountd.adapters.schema import METADATA

    bind = op.get_bind()
    # checkfirst=False: a database that already holds these tables (say, from running the seed
    # by hand) must fail loudly rather than be adopted half-checked; ``alembic stamp`` is the
    # deliberate way to adopt one.
    METADATA[database].create_all(bind, tables=_initial_tables(database), checkfirst=False)
    if bind.dialect.name in ("mysql", "mariadb"):
        # Partitioned after CREATE TABLE, as the seed's strategy section asks; boundaries in UTC.
        today = datetime.now(UTC).date()
        for spec in partitioned_tables(database):
            op.execute(partition_by_sql(spec, initial_partitions(spec, today)))
    # SQLite: the updated_at triggers come with CREATE TABLE (DDL events on the tables).


def supervision_next_action_at_index() -> Any:
    """``idx_supervision_next_action_at``: created by platform_0001, dropped by platform_0002.

    No query ever read it (the daemon rebuilds its deadline queue in memory from a load keyed
    by account id), yet every status change rewrote it: ``next_action_at`` changes with almost
    every transition, so each supervision upsert also deleted and inserted an entry of this
    index. On MariaDB that was a third of the upsert's server time (46.7 → 30.4 µs a row,
    `bench.transition_parts`). Both revisions build it here, on a stand-in of the table
    holding just its column, so SQLite names it as `create_initial` used to
    (``<table>__<name>``, see `accountd.adapters.schema.types.index`).
    """
    import sqlalchemy as sa

    from accountd.adapters.schema.types import DATETIME6, index

    idx = index("idx_supervision_next_action_at", "next_action_at")
    sa.Table("accountd_supervision", sa.MetaData(), sa.Column("next_action_at", DATETIME6), idx)
    return idx


def drop_initial(database: str) -> None:
    """The seed's rollback: drop everything the first revision created (triggers included)."""
    from alembic import op

    from accountd.adapters.schema import METADATA

    METADATA[database].drop_all(op.get_bind(), tables=_initial_tables(database), checkfirst=True)
