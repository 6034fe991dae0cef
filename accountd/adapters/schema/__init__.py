"""The schema of the three seed databases, one `MetaData` each, plus the daemon's own tables.

``CORE`` is ``saas_unified_core`` (11 tables), ``PLATFORM`` is ``wework_platform`` (the seed's 10
tables plus ``accountd_supervision`` and ``accountd_leases``), ``ANALYTICS`` is
``monitor_analytics`` (3 tables). Table objects are exported under their table names. See
docs/schema.md for what each table is and every deviation from the seed.
"""

from __future__ import annotations

import sqlalchemy as sa

from accountd.adapters.schema.analytics import (
    ANALYTICS,
    account_metrics,
    performance_stats,
    system_alerts,
)
from accountd.adapters.schema.core import (
    CORE,
    dictionaries,
    operation_logs,
    permissions,
    role_permissions,
    roles,
    system_configs,
    tenant_configs,
    tenant_quota_usage,
    tenants,
    user_roles,
    users,
)
from accountd.adapters.schema.daemon import (
    accountd_leases,
    accountd_supervision,
    accountd_supervision_journal,
)
from accountd.adapters.schema.platform import (
    ACCOUNT_STATUSES,
    PLATFORM,
    account_status_logs,
    contacts,
    file_resources,
    file_usage_records,
    groups,
    message_callbacks,
    message_records,
    message_tasks,
    message_templates,
    wework_accounts,
)

METADATA: dict[str, sa.MetaData] = {"core": CORE, "platform": PLATFORM, "analytics": ANALYTICS}

# The tables this project adds to the seed's 24 (all in wework_platform).
DAEMON_TABLES: tuple[str, ...] = (
    "accountd_supervision",
    "accountd_leases",
    "accountd_supervision_journal",
)

__all__ = [
    "ACCOUNT_STATUSES",
    "ANALYTICS",
    "CORE",
    "DAEMON_TABLES",
    "METADATA",
    "PLATFORM",
    "account_metrics",
    "account_status_logs",
    "accountd_leases",
    "accountd_supervision",
    "accountd_supervision_journal",
    "contacts",
    "dictionaries",
    "file_resources",
    "file_usage_records",
    "groups",
    "message_callbacks",
    "message_records",
    "message_tasks",
    "message_templates",
    "operation_logs",
    "performance_stats",
    "permissions",
    "role_permissions",
    "roles",
    "system_alerts",
    "system_configs",
    "tenant_configs",
    "tenant_quota_usage",
    "tenants",
    "user_roles",
    "users",
    "wework_accounts",
]
