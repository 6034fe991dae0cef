"""Initial schema of saas_unified_core.

The seed's 11 tables; operation_logs is partitioned quarterly on MySQL.

Revision ID: core_0001
Revises:
Create Date: 2025-01-01

The body is shared by the three first revisions (`accountd.adapters.migrations.create_initial`);
read its docstring before the first schema change: this revision must be frozen then.
"""

from __future__ import annotations

from accountd.adapters.migrations import create_initial, drop_initial

revision = "core_0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    create_initial("core")


def downgrade() -> None:
    drop_initial("core")
