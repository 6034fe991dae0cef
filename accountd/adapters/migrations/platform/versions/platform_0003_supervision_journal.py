"""accountd_supervision_journal: the supervision rows of large transition batches.

Revision ID: platform_0003
Revises: platform_0002
Create Date: 2026-12-04

A batch of hundreds of transitions (a mass event) writes one journal row with all their
supervision rows, in its transaction, instead of upserting hundreds of `accountd_supervision`
rows; the daemon folds the journal into `accountd_supervision` afterwards (see
`accountd.adapters.repository.AccountRepository.fold_journal`). The table is created from the
schema module's definition, as it stood when this revision was written.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.mysql import MEDIUMTEXT

from accountd.adapters.schema.types import DATETIME6, MYSQL_TABLE_OPTIONS

revision = "platform_0003"
down_revision: str | None = "platform_0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Frozen here (not taken from the MetaData), so a later change to the table is a later
    # revision's business.
    op.create_table(
        "accountd_supervision_journal",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
            comment="order of writing: folded in this order",
        ),
        sa.Column("row_count", sa.Integer, nullable=False, comment="supervision rows in entries"),
        sa.Column(
            "entries",
            sa.Text().with_variant(MEDIUMTEXT(), "mysql"),
            nullable=False,
            comment='JSON {"columns": [...], "rows": [[...], ...]} of accountd_supervision rows',
        ),
        sa.Column("created_at", DATETIME6, nullable=False, comment="when it was written (UTC)"),
        comment="accountd: supervision rows of large transition batches, not yet folded into "
        "accountd_supervision (one row per batch, written in the batch's transaction)",
        **MYSQL_TABLE_OPTIONS,
    )


def downgrade() -> None:
    op.drop_table("accountd_supervision_journal")
