"""The daemon's own tables, in ``wework_platform`` next to ``wework_accounts``.

``wework_accounts.updated_at`` moves on every write (heartbeats included), so it cannot tell
when a status was entered. What supervision needs to resume exactly where it stopped after a
restart lives here instead, one row per account, written only by the daemon's single door
together with the status change it belongs to. ``accountd_leases`` lets a second daemon on the
same database notice the first and refuse to run; its ``epoch`` is the fencing token that
later multi-instance writers will carry.

Times are naive UTC ``DATETIME(6)`` (microseconds; unlike ``TIMESTAMP`` no 2038 limit and no
session-time-zone conversion).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import MEDIUMTEXT

from accountd.adapters.schema.platform import PLATFORM
from accountd.adapters.schema.types import DATETIME6, FALSE, MYSQL_TABLE_OPTIONS, default

accountd_supervision = sa.Table(
    "accountd_supervision",
    PLATFORM,
    sa.Column(
        "account_id",
        sa.String(36),
        sa.ForeignKey("wework_accounts.id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
        comment="wework_accounts.id this row supervises",
    ),
    sa.Column(
        "status",
        sa.String(32),
        nullable=False,
        comment="status the daemon last committed (cross-check with wework_accounts.status)",
    ),
    sa.Column(
        "entered_at", DATETIME6, nullable=False, comment="when the current status was entered (UTC)"
    ),
    sa.Column(
        "attempts",
        sa.Integer,
        nullable=False,
        server_default=default(0),
        comment="recovery attempts in the current outage",
    ),
    sa.Column(
        "qr_refreshes",
        sa.Integer,
        nullable=False,
        server_default=default(0),
        comment="QR codes issued in the current login",
    ),
    sa.Column(
        "next_action",
        sa.String(32),
        comment="what fires next: timeout, recover, retry_error, heartbeat, ...",
    ),
    sa.Column("next_action_at", DATETIME6, comment="when next_action fires (UTC)"),
    sa.Column("online_since", DATETIME6, comment="when the account last went online (UTC)"),
    sa.Column(
        "offline_history", sa.JSON, comment="recent offline transition times (flapping detection)"
    ),
    sa.Column(
        "paused",
        sa.Boolean,
        nullable=False,
        server_default=FALSE,
        comment="an admin paused supervision of this account",
    ),
    sa.Column("paused_reason", sa.String(255), comment="why it was paused"),
    sa.Column(
        "last_log_id", sa.String(36), comment="id of the last account_status_logs row written"
    ),
    sa.Column(
        "epoch",
        sa.BigInteger,
        nullable=False,
        server_default=default(0),
        comment="fencing epoch of the writer",
    ),
    sa.Column("updated_at", DATETIME6, nullable=False, comment="last write of this row (UTC)"),
    comment="accountd: supervision state of each account, survives restarts",
    **MYSQL_TABLE_OPTIONS,
)

accountd_supervision_journal = sa.Table(
    "accountd_supervision_journal",
    PLATFORM,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),  # SQLite: INTEGER PRIMARY KEY
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

accountd_leases = sa.Table(
    "accountd_leases",
    PLATFORM,
    sa.Column("name", sa.String(64), primary_key=True, comment="what the lease guards"),
    sa.Column("holder", sa.String(255), nullable=False, comment="host:pid:uuid of the holder"),
    sa.Column(
        "epoch", sa.BigInteger, nullable=False, comment="fencing epoch, bumped on every takeover"
    ),
    sa.Column("acquired_at", DATETIME6, nullable=False, comment="when the holder took it (UTC)"),
    sa.Column("renewed_at", DATETIME6, nullable=False, comment="last renewal (UTC)"),
    sa.Column("expires_at", DATETIME6, nullable=False, comment="free for others after this (UTC)"),
    comment="accountd: single-writer lease (a second daemon is detected and refused)",
    **MYSQL_TABLE_OPTIONS,
)
