"""``saas_unified_core``: tenants, users and permissions, configuration, the operation log.

Table by table the seed's DDL (docs/seed/database-design.md §1), with one correction:
``operation_logs`` is partitioned by quarter on MySQL (the seed's partition strategy), so its
primary key is ``(id, created_at)`` and its foreign keys to ``tenants``/``users`` are gone
(InnoDB partitioned tables cannot have foreign keys; ``accountd db verify`` checks them).
"""

from __future__ import annotations

import sqlalchemy as sa

from accountd.adapters.schema.types import (
    FALSE,
    MYSQL_TABLE_OPTIONS,
    TRUE,
    created_at,
    default,
    enum,
    id_column,
    index,
    keep_updated_at_fresh,
    new_metadata,
    timestamp,
    updated_at,
)

CORE = new_metadata()

_CONFIG_TYPES = ("string", "number", "boolean", "json")

tenants = keep_updated_at_fresh(
    sa.Table(
        "tenants",
        CORE,
        id_column("租户ID"),
        sa.Column("tenant_name", sa.String(100), nullable=False, comment="租户名称"),
        sa.Column("tenant_code", sa.String(50), nullable=False, comment="租户编码"),
        sa.Column("contact_email", sa.String(100), comment="联系邮箱"),
        sa.Column("contact_phone", sa.String(20), comment="联系电话"),
        sa.Column(
            "status",
            enum("active", "inactive", "suspended"),
            server_default=default("active"),
            comment="状态",
        ),
        sa.Column("quota_accounts", sa.Integer, server_default=default(100), comment="账号配额"),
        sa.Column(
            "quota_messages", sa.BigInteger, server_default=default(1000000), comment="消息配额"
        ),
        created_at(),
        updated_at(),
        # ``tenant_code ... UNIQUE``: MySQL names an inline unique key after its column.
        sa.UniqueConstraint("tenant_code", name="tenant_code"),
        index("idx_tenant_code", "tenant_code"),
        index("idx_status", "status"),
        index("idx_created_at", "created_at"),
        comment="租户表",
        **MYSQL_TABLE_OPTIONS,
    )
)

users = keep_updated_at_fresh(
    sa.Table(
        "users",
        CORE,
        id_column("用户ID"),
        sa.Column(
            "tenant_id",
            sa.String(36),
            sa.ForeignKey("tenants.id"),
            nullable=False,
            comment="租户ID",
        ),
        sa.Column("username", sa.String(50), nullable=False, comment="用户名"),
        sa.Column("password", sa.String(255), nullable=False, comment="密码(加密)"),
        sa.Column("real_name", sa.String(50), comment="真实姓名"),
        sa.Column("email", sa.String(100), comment="邮箱"),
        sa.Column("phone", sa.String(20), comment="手机号"),
        sa.Column("avatar_url", sa.String(255), comment="头像URL"),
        sa.Column(
            "status",
            enum("active", "inactive", "locked"),
            server_default=default("active"),
            comment="状态",
        ),
        timestamp("last_login_at", "最后登录时间"),
        created_at(),
        updated_at(),
        sa.UniqueConstraint("tenant_id", "username", name="uk_tenant_username"),
        index("idx_tenant_id", "tenant_id"),
        index("idx_email", "email"),
        index("idx_status", "status"),
        comment="用户表",
        **MYSQL_TABLE_OPTIONS,
    )
)

roles = keep_updated_at_fresh(
    sa.Table(
        "roles",
        CORE,
        id_column("角色ID"),
        sa.Column(
            "tenant_id",
            sa.String(36),
            sa.ForeignKey("tenants.id"),
            nullable=False,
            comment="租户ID",
        ),
        sa.Column("role_name", sa.String(50), nullable=False, comment="角色名称"),
        sa.Column("role_code", sa.String(50), nullable=False, comment="角色编码"),
        sa.Column("description", sa.Text, comment="角色描述"),
        sa.Column("is_system", sa.Boolean, server_default=FALSE, comment="是否系统角色"),
        created_at(),
        updated_at(),
        sa.UniqueConstraint("tenant_id", "role_code", name="uk_tenant_role_code"),
        index("idx_tenant_id", "tenant_id"),
        comment="角色表",
        **MYSQL_TABLE_OPTIONS,
    )
)

permissions = sa.Table(
    "permissions",
    CORE,
    id_column("权限ID"),
    sa.Column("permission_name", sa.String(100), nullable=False, comment="权限名称"),
    sa.Column("permission_code", sa.String(100), nullable=False, comment="权限编码"),
    sa.Column("resource_type", sa.String(50), nullable=False, comment="资源类型"),
    sa.Column("action_type", sa.String(50), nullable=False, comment="操作类型"),
    sa.Column("description", sa.Text, comment="权限描述"),
    created_at(),
    sa.UniqueConstraint("permission_code", name="permission_code"),
    index("idx_permission_code", "permission_code"),
    index("idx_resource_type", "resource_type"),
    comment="权限表",
    **MYSQL_TABLE_OPTIONS,
)

user_roles = sa.Table(
    "user_roles",
    CORE,
    id_column("ID"),
    sa.Column(
        "user_id",
        sa.String(36),
        sa.ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        comment="用户ID",
    ),
    sa.Column(
        "role_id",
        sa.String(36),
        sa.ForeignKey("roles.id", ondelete="CASCADE"),
        nullable=False,
        comment="角色ID",
    ),
    created_at("分配时间", name="assigned_at"),
    sa.UniqueConstraint("user_id", "role_id", name="uk_user_role"),
    index("idx_user_id", "user_id"),
    index("idx_role_id", "role_id"),
    comment="用户角色关联表",
    **MYSQL_TABLE_OPTIONS,
)

role_permissions = sa.Table(
    "role_permissions",
    CORE,
    id_column("ID"),
    sa.Column(
        "role_id",
        sa.String(36),
        sa.ForeignKey("roles.id", ondelete="CASCADE"),
        nullable=False,
        comment="角色ID",
    ),
    sa.Column(
        "permission_id",
        sa.String(36),
        sa.ForeignKey("permissions.id", ondelete="CASCADE"),
        nullable=False,
        comment="权限ID",
    ),
    created_at("分配时间", name="assigned_at"),
    sa.UniqueConstraint("role_id", "permission_id", name="uk_role_permission"),
    index("idx_role_id", "role_id"),
    index("idx_permission_id", "permission_id"),
    comment="角色权限关联表",
    **MYSQL_TABLE_OPTIONS,
)

system_configs = keep_updated_at_fresh(
    sa.Table(
        "system_configs",
        CORE,
        id_column("配置ID"),
        sa.Column("config_key", sa.String(100), nullable=False, comment="配置键"),
        sa.Column("config_value", sa.Text, nullable=False, comment="配置值"),
        sa.Column(
            "config_type",
            enum(*_CONFIG_TYPES),
            server_default=default("string"),
            comment="配置类型",
        ),
        sa.Column("description", sa.Text, comment="配置描述"),
        sa.Column("is_encrypted", sa.Boolean, server_default=FALSE, comment="是否加密"),
        created_at(),
        updated_at(),
        sa.UniqueConstraint("config_key", name="config_key"),
        index("idx_config_key", "config_key"),
        comment="系统配置表",
        **MYSQL_TABLE_OPTIONS,
    )
)

tenant_configs = keep_updated_at_fresh(
    sa.Table(
        "tenant_configs",
        CORE,
        id_column("配置ID"),
        sa.Column(
            "tenant_id",
            sa.String(36),
            sa.ForeignKey("tenants.id"),
            nullable=False,
            comment="租户ID",
        ),
        sa.Column("config_key", sa.String(100), nullable=False, comment="配置键"),
        sa.Column("config_value", sa.Text, nullable=False, comment="配置值"),
        sa.Column(
            "config_type",
            enum(*_CONFIG_TYPES),
            server_default=default("string"),
            comment="配置类型",
        ),
        sa.Column("description", sa.Text, comment="配置描述"),
        created_at(),
        updated_at(),
        sa.UniqueConstraint("tenant_id", "config_key", name="uk_tenant_config_key"),
        index("idx_tenant_id", "tenant_id"),
        comment="租户配置表",
        **MYSQL_TABLE_OPTIONS,
    )
)

# Partitioned quarterly on MySQL: PK (id, created_at), no FKs to tenants/users (see docstring).
operation_logs = sa.Table(
    "operation_logs",
    CORE,
    id_column("日志ID"),
    sa.Column("tenant_id", sa.String(36), comment="租户ID"),
    sa.Column("user_id", sa.String(36), comment="用户ID"),
    sa.Column("operation_type", sa.String(50), nullable=False, comment="操作类型"),
    sa.Column("resource_type", sa.String(50), nullable=False, comment="资源类型"),
    sa.Column("resource_id", sa.String(36), comment="资源ID"),
    sa.Column("operation_desc", sa.Text, comment="操作描述"),
    sa.Column("request_data", sa.JSON, comment="请求数据"),
    sa.Column("response_data", sa.JSON, comment="响应数据"),
    sa.Column("ip_address", sa.String(45), comment="IP地址"),
    sa.Column("user_agent", sa.Text, comment="用户代理"),
    sa.Column("status", enum("success", "failed"), nullable=False, comment="操作状态"),
    sa.Column("error_message", sa.Text, comment="错误信息"),
    created_at(primary_key=True),
    index("idx_tenant_id", "tenant_id"),
    index("idx_user_id", "user_id"),
    index("idx_operation_type", "operation_type"),
    index("idx_created_at", "created_at"),
    comment="操作日志表",
    **MYSQL_TABLE_OPTIONS,
)

tenant_quota_usage = keep_updated_at_fresh(
    sa.Table(
        "tenant_quota_usage",
        CORE,
        id_column("ID"),
        sa.Column(
            "tenant_id",
            sa.String(36),
            sa.ForeignKey("tenants.id"),
            nullable=False,
            comment="租户ID",
        ),
        sa.Column("resource_type", sa.String(50), nullable=False, comment="资源类型"),
        sa.Column("quota_limit", sa.BigInteger, nullable=False, comment="配额限制"),
        sa.Column("quota_used", sa.BigInteger, server_default=default(0), comment="已使用配额"),
        sa.Column("period_type", enum("day", "month", "year"), nullable=False, comment="周期类型"),
        sa.Column("period_start", sa.Date, nullable=False, comment="周期开始日期"),
        sa.Column("period_end", sa.Date, nullable=False, comment="周期结束日期"),
        updated_at(),
        sa.UniqueConstraint(
            "tenant_id", "resource_type", "period_start", name="uk_tenant_resource_period"
        ),
        index("idx_tenant_id", "tenant_id"),
        index("idx_period", "period_start", "period_end"),
        comment="租户配额使用表",
        **MYSQL_TABLE_OPTIONS,
    )
)

dictionaries = keep_updated_at_fresh(
    sa.Table(
        "dictionaries",
        CORE,
        id_column("字典ID"),
        sa.Column("dict_code", sa.String(50), nullable=False, comment="字典编码"),
        sa.Column("dict_name", sa.String(100), nullable=False, comment="字典名称"),
        sa.Column("parent_id", sa.String(36), comment="父级ID"),
        sa.Column("dict_value", sa.String(255), comment="字典值"),
        sa.Column("sort_order", sa.Integer, server_default=default(0), comment="排序"),
        sa.Column("is_enabled", sa.Boolean, server_default=TRUE, comment="是否启用"),
        sa.Column("description", sa.Text, comment="描述"),
        created_at(),
        updated_at(),
        index("idx_dict_code", "dict_code"),
        index("idx_parent_id", "parent_id"),
        index("idx_sort_order", "sort_order"),
        comment="字典表",
        **MYSQL_TABLE_OPTIONS,
    )
)
