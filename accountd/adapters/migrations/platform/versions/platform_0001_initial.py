"""Initial schema of wework_platform.

The seed's 10 tables plus accountd_supervision and accountd_leases; message_records is
partitioned monthly on MySQL.

Revision ID: platform_0001
Revises:
Create Date: 2025-01-01

The body is shared by the three first revisions (`accountd.adapters.migrations.create_initial`);
read its docstring before the first schema change: this revision must be frozen then.
"""

from __future__ import annotations

from alembic import op

from accountd.adapters.migrations import (
    create_initial,
    drop_initial,
    supervision_next_action_at_index,
)

revision = "platform_0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    create_initial("platform")
    # Part of this revision's schema, though no longer of the MetaData that `create_initial`
    # builds from: platform_0002 drops it.
    supervision_next_action_at_index().create(op.get_bind())


def downgrade() -> None:
    drop_initial("platform")
