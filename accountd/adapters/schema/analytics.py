"""``monitor_analytics``: account metrics, system alerts, performance statistics.

The seed's DDL (docs/seed/database-design.md §3) with its corrections (docs/schema.md):
``account_metrics`` is partitioned by month on MySQL, so its primary key is
``(id, recorded_at)``; ``idx_account_metric_time`` is declared once (the seed repeats it in its
index-optimisation section). ``account_id``/``tenant_id`` point into other databases and so
cannot be foreign keys; ``accountd db verify`` checks them.
"""

from __future__ import annotations

import sqlalchemy as sa

from accountd.adapters.schema.types import (
    MYSQL_TABLE_OPTIONS,
    created_at,
    default,
    enum,
    id_column,
    index,
    new_metadata,
    timestamp,
)

ANALYTICS = new_metadata()

account_metrics = sa.Table(
    "account_metrics",
    ANALYTICS,
    id_column("指标ID"),
    sa.Column("account_id", sa.String(36), nullable=False, comment="账号ID"),
    sa.Column("metric_type", sa.String(50), nullable=False, comment="指标类型"),
    sa.Column("metric_value", sa.DECIMAL(15, 4), nullable=False, comment="指标值"),
    sa.Column("metric_unit", sa.String(20), comment="指标单位"),
    sa.Column("tags", sa.JSON, comment="标签"),
    sa.Column(
        "recorded_at",
        sa.TIMESTAMP(),
        primary_key=True,
        nullable=False,
        comment="记录时间",
    ),
    index("idx_account_id", "account_id"),
    index("idx_metric_type", "metric_type"),
    index("idx_recorded_at", "recorded_at"),
    index("idx_account_metric_time", "account_id", "metric_type", "recorded_at"),
    comment="账号监控数据表",
    **MYSQL_TABLE_OPTIONS,
)

system_alerts = sa.Table(
    "system_alerts",
    ANALYTICS,
    id_column("告警ID"),
    sa.Column("alert_type", sa.String(50), nullable=False, comment="告警类型"),
    sa.Column(
        "alert_level",
        enum("info", "warning", "error", "critical"),
        nullable=False,
        comment="告警级别",
    ),
    sa.Column("alert_title", sa.String(200), nullable=False, comment="告警标题"),
    sa.Column("alert_content", sa.Text, nullable=False, comment="告警内容"),
    sa.Column("resource_type", sa.String(50), comment="资源类型"),
    sa.Column("resource_id", sa.String(36), comment="资源ID"),
    sa.Column("tenant_id", sa.String(36), comment="租户ID"),
    sa.Column(
        "status",
        enum("active", "acknowledged", "resolved", "suppressed"),
        server_default=default("active"),
        comment="告警状态",
    ),
    sa.Column("acknowledged_by", sa.String(36), comment="确认人"),
    timestamp("acknowledged_at", "确认时间"),
    timestamp("resolved_at", "解决时间"),
    created_at(),
    index("idx_alert_type", "alert_type"),
    index("idx_alert_level", "alert_level"),
    index("idx_status", "status"),
    index("idx_tenant_id", "tenant_id"),
    index("idx_created_at", "created_at"),
    comment="系统告警表",
    **MYSQL_TABLE_OPTIONS,
)

performance_stats = sa.Table(
    "performance_stats",
    ANALYTICS,
    id_column("统计ID"),
    sa.Column("stat_date", sa.Date, nullable=False, comment="统计日期"),
    sa.Column("tenant_id", sa.String(36), comment="租户ID"),
    sa.Column("metric_name", sa.String(100), nullable=False, comment="指标名称"),
    sa.Column("metric_value", sa.DECIMAL(15, 4), nullable=False, comment="指标值"),
    sa.Column("metric_count", sa.BigInteger, server_default=default(1), comment="指标次数"),
    sa.Column("min_value", sa.DECIMAL(15, 4), comment="最小值"),
    sa.Column("max_value", sa.DECIMAL(15, 4), comment="最大值"),
    sa.Column("avg_value", sa.DECIMAL(15, 4), comment="平均值"),
    created_at(),
    sa.UniqueConstraint("stat_date", "tenant_id", "metric_name", name="uk_date_tenant_metric"),
    index("idx_stat_date", "stat_date"),
    index("idx_tenant_id", "tenant_id"),
    index("idx_metric_name", "metric_name"),
    comment="性能统计表",
    **MYSQL_TABLE_OPTIONS,
)
