"""Drop idx_supervision_next_action_at: never read, rewritten by every status change.

Revision ID: platform_0002
Revises: platform_0001
Create Date: 2026-12-03

See `accountd.adapters.migrations.supervision_next_action_at_index` for why.
"""

from __future__ import annotations

from alembic import op

from accountd.adapters.migrations import supervision_next_action_at_index

revision = "platform_0002"
down_revision: str | None = "platform_0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    supervision_next_action_at_index().drop(op.get_bind())


def downgrade() -> None:
    supervision_next_action_at_index().create(op.get_bind())
