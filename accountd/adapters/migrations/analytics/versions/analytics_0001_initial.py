"""Initial schema of monitor_analytics.

The seed's 3 tables; account_metrics is partitioned monthly on MySQL.

Revision ID: analytics_0001
Revises:
Create Date: 2025-01-01

The body is shared by the three first revisions (`accountd.adapters.migrations.create_initial`);
read its docstring before the first schema change: this revision must be frozen then.
"""

from __future__ import annotations

from accountd.adapters.migrations import create_initial, drop_initial

revision = "analytics_0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    create_initial("analytics")


def downgrade() -> None:
    drop_initial("analytics")
