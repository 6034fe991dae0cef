"""Initial schema of monitor_analytics.

The seed's 3 tables; account_metrics is partitioned monthly on MySQL.

Revision ID: analytics_0001
Revises:
Create Date: 2025-01-01

This first revision creates the tables from `accountd.adapters.schema.ANALYTICS` as it stands.
That is right only while the MetaData *is* this revision: every later schema change must be a
new revision with explicit ``op.*`` calls, and before the first such change lands this file must
be frozen (its ``create_all`` replaced by the equivalent ``op.create_table`` calls), or a fresh
database would get the new columns here and then fail in the revision that adds them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import op

from accountd.adapters.partitions import initial_partitions, partition_by_sql, partitioned_tables
from accountd.adapters.schema import ANALYTICS

revision = "analytics_0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    bind = op.get_bind()
    # checkfirst=False: a database that already holds these tables (say, from running the seed
    # by hand) must fail loudly rather than be adopted half-checked; ``alembic stamp`` is the
    # deliberate way to adopt one.
    ANALYTICS.create_all(bind, checkfirst=False)
    if bind.dialect.name in ("mysql", "mariadb"):
        # Partitioned after CREATE TABLE, as the seed's strategy section asks; boundaries in UTC.
        today = datetime.now(UTC).date()
        for spec in partitioned_tables("analytics"):
            op.execute(partition_by_sql(spec, initial_partitions(spec, today)))
    # SQLite: the updated_at triggers come with CREATE TABLE (DDL events on the tables).


def downgrade() -> None:
    # The seed's rollback: drop everything this revision created (triggers go with their tables).
    ANALYTICS.drop_all(op.get_bind(), checkfirst=True)
