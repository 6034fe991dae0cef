"""``wework_platform``: WeCom accounts and their status log, contacts, groups, messages, files.

The seed's DDL (docs/seed/database-design.md §2) with its corrections (docs/schema.md):

* ``groups`` is a reserved word in MySQL 8: the table name is always quoted;
* ``message_records`` is partitioned by month on MySQL: primary key ``(id, created_at)``, and no
  foreign keys from it (to ``message_tasks``, ``wework_accounts``) nor to it (from
  ``message_callbacks``), since InnoDB partitioned tables support neither;
* ``file_resources.storage_type`` lists ``'oss'`` twice: ``('local','oss','cos','s3')``;
* ``idx_account_status_sent``/``idx_tenant_status_created``/``idx_tenant_type_created`` come from
  the seed's index-optimisation section.

The daemon's own tables live in this database too, in `accountd.adapters.schema.daemon`.
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

PLATFORM = new_metadata()

ACCOUNT_STATUSES: tuple[str, ...] = (
    "created",
    "initializing",
    "waiting_qr",
    "waiting_confirm",
    "verifying",
    "online",
    "offline",
    "error",
    "recovering",
)
_MESSAGE_TYPES = ("text", "image", "file", "video", "card", "link")


def _account_fk(*, cascade: bool = True) -> sa.ForeignKey:
    return sa.ForeignKey("wework_accounts.id", ondelete="CASCADE" if cascade else None)


wework_accounts = keep_updated_at_fresh(
    sa.Table(
        "wework_accounts",
        PLATFORM,
        id_column("账号ID"),
        sa.Column("tenant_id", sa.String(36), nullable=False, comment="租户ID"),
        sa.Column("account_name", sa.String(100), nullable=False, comment="账号名称"),
        sa.Column("wework_guid", sa.String(100), nullable=False, comment="企微GUID"),
        sa.Column("wework_corp_id", sa.String(100), comment="企业ID"),
        sa.Column("wework_secret", sa.String(255), comment="企业密钥"),
        sa.Column("account_config", sa.JSON, comment="账号配置"),
        sa.Column(
            "status",
            enum(*ACCOUNT_STATUSES),
            server_default=default("created"),
            comment="账号状态",
        ),
        timestamp("last_heartbeat_at", "最后心跳时间"),
        sa.Column("error_message", sa.Text, comment="错误信息"),
        sa.Column("login_qr_code", sa.Text, comment="登录二维码"),
        sa.Column("device_info", sa.JSON, comment="设备信息"),
        sa.Column("proxy_config", sa.JSON, comment="代理配置"),
        created_at(),
        updated_at(),
        sa.UniqueConstraint("wework_guid", name="wework_guid"),
        index("idx_tenant_id", "tenant_id"),
        index("idx_wework_guid", "wework_guid"),
        index("idx_status", "status"),
        index("idx_last_heartbeat", "last_heartbeat_at"),
        # From the seed's index-optimisation section.
        index("idx_tenant_status_created", "tenant_id", "status", "created_at"),
        comment="企微账号表",
        **MYSQL_TABLE_OPTIONS,
    )
)

account_status_logs = sa.Table(
    "account_status_logs",
    PLATFORM,
    id_column("记录ID"),
    sa.Column("account_id", sa.String(36), _account_fk(), nullable=False, comment="账号ID"),
    sa.Column("old_status", sa.String(50), comment="原状态"),
    sa.Column("new_status", sa.String(50), nullable=False, comment="新状态"),
    sa.Column("change_reason", sa.String(255), comment="变更原因"),
    sa.Column("error_details", sa.Text, comment="错误详情"),
    sa.Column("operator_id", sa.String(36), comment="操作人ID"),
    created_at(),
    index("idx_account_id", "account_id"),
    index("idx_new_status", "new_status"),
    index("idx_created_at", "created_at"),
    comment="账号状态变更记录表",
    **MYSQL_TABLE_OPTIONS,
)

contacts = keep_updated_at_fresh(
    sa.Table(
        "contacts",
        PLATFORM,
        id_column("联系人ID"),
        sa.Column("account_id", sa.String(36), _account_fk(), nullable=False, comment="账号ID"),
        sa.Column("contact_wework_id", sa.String(100), nullable=False, comment="企微联系人ID"),
        sa.Column("contact_name", sa.String(100), comment="联系人姓名"),
        sa.Column("contact_alias", sa.String(100), comment="联系人备注"),
        sa.Column(
            "contact_type", enum("user", "group", "external"), nullable=False, comment="联系人类型"
        ),
        sa.Column("contact_avatar", sa.String(255), comment="头像URL"),
        sa.Column("phone_number", sa.String(20), comment="手机号"),
        sa.Column("email", sa.String(100), comment="邮箱"),
        sa.Column("department", sa.String(100), comment="部门"),
        sa.Column("is_friend", sa.Boolean, server_default=FALSE, comment="是否好友"),
        sa.Column("is_blocked", sa.Boolean, server_default=FALSE, comment="是否被拉黑"),
        sa.Column("tags", sa.JSON, comment="标签"),
        timestamp("last_active_at", "最后活跃时间"),
        created_at(),
        updated_at(),
        sa.UniqueConstraint("account_id", "contact_wework_id", name="uk_account_contact"),
        index("idx_account_id", "account_id"),
        index("idx_contact_type", "contact_type"),
        index("idx_contact_name", "contact_name"),
        comment="联系人表",
        **MYSQL_TABLE_OPTIONS,
    )
)

# ``groups`` became a reserved word in MySQL 8.0.2 (window functions): always quoted.
groups = keep_updated_at_fresh(
    sa.Table(
        "groups",
        PLATFORM,
        id_column("群聊ID"),
        sa.Column("account_id", sa.String(36), _account_fk(), nullable=False, comment="账号ID"),
        sa.Column("group_wework_id", sa.String(100), nullable=False, comment="企微群ID"),
        sa.Column("group_name", sa.String(100), nullable=False, comment="群名称"),
        sa.Column("group_notice", sa.Text, comment="群公告"),
        sa.Column("member_count", sa.Integer, server_default=default(0), comment="成员数量"),
        sa.Column("is_owner", sa.Boolean, server_default=FALSE, comment="是否群主"),
        sa.Column("is_admin", sa.Boolean, server_default=FALSE, comment="是否管理员"),
        sa.Column("group_avatar", sa.String(255), comment="群头像"),
        created_at(),
        updated_at(),
        sa.UniqueConstraint("account_id", "group_wework_id", name="uk_account_group"),
        index("idx_account_id", "account_id"),
        index("idx_group_name", "group_name"),
        comment="群聊表",
        quote=True,
        **MYSQL_TABLE_OPTIONS,
    )
)

message_templates = keep_updated_at_fresh(
    sa.Table(
        "message_templates",
        PLATFORM,
        id_column("模板ID"),
        sa.Column("tenant_id", sa.String(36), nullable=False, comment="租户ID"),
        sa.Column("template_name", sa.String(100), nullable=False, comment="模板名称"),
        sa.Column("template_type", enum(*_MESSAGE_TYPES), nullable=False, comment="模板类型"),
        sa.Column("template_content", sa.JSON, nullable=False, comment="模板内容"),
        sa.Column("variables", sa.JSON, comment="变量配置"),
        sa.Column("tags", sa.JSON, comment="标签"),
        sa.Column("is_active", sa.Boolean, server_default=TRUE, comment="是否激活"),
        sa.Column("usage_count", sa.BigInteger, server_default=default(0), comment="使用次数"),
        sa.Column("created_by", sa.String(36), comment="创建者ID"),
        created_at(),
        updated_at(),
        index("idx_tenant_id", "tenant_id"),
        index("idx_template_type", "template_type"),
        index("idx_template_name", "template_name"),
        index("idx_is_active", "is_active"),
        comment="消息模板表",
        **MYSQL_TABLE_OPTIONS,
    )
)

message_tasks = keep_updated_at_fresh(
    sa.Table(
        "message_tasks",
        PLATFORM,
        id_column("任务ID"),
        sa.Column("tenant_id", sa.String(36), nullable=False, comment="租户ID"),
        sa.Column("task_name", sa.String(100), nullable=False, comment="任务名称"),
        sa.Column(
            "task_type",
            enum("single", "batch", "scheduled", "recurring"),
            nullable=False,
            comment="任务类型",
        ),
        sa.Column(
            "account_id",
            sa.String(36),
            _account_fk(cascade=False),
            nullable=False,
            comment="发送账号ID",
        ),
        sa.Column(
            "template_id",
            sa.String(36),
            sa.ForeignKey("message_templates.id"),
            comment="消息模板ID",
        ),
        sa.Column("message_content", sa.JSON, nullable=False, comment="消息内容"),
        sa.Column("recipients", sa.JSON, nullable=False, comment="收件人列表"),
        sa.Column("send_config", sa.JSON, comment="发送配置"),
        sa.Column("schedule_config", sa.JSON, comment="定时配置"),
        sa.Column(
            "status",
            enum("pending", "running", "paused", "completed", "failed", "cancelled"),
            server_default=default("pending"),
            comment="任务状态",
        ),
        sa.Column("total_count", sa.Integer, server_default=default(0), comment="总发送数量"),
        sa.Column("success_count", sa.Integer, server_default=default(0), comment="成功数量"),
        sa.Column("failed_count", sa.Integer, server_default=default(0), comment="失败数量"),
        sa.Column(
            "progress_percentage",
            sa.DECIMAL(5, 2),
            server_default=sa.text("0.00"),
            comment="完成进度",
        ),
        timestamp("started_at", "开始时间"),
        timestamp("completed_at", "完成时间"),
        sa.Column("error_message", sa.Text, comment="错误信息"),
        sa.Column("created_by", sa.String(36), comment="创建者ID"),
        created_at(),
        updated_at(),
        index("idx_tenant_id", "tenant_id"),
        index("idx_account_id", "account_id"),
        index("idx_status", "status"),
        index("idx_task_type", "task_type"),
        index("idx_created_at", "created_at"),
        # From the seed's index-optimisation section.
        index("idx_tenant_type_created", "tenant_id", "task_type", "created_at"),
        comment="消息发送任务表",
        **MYSQL_TABLE_OPTIONS,
    )
)

# Partitioned monthly on MySQL: PK (id, created_at); the seed's FKs to message_tasks and
# wework_accounts are dropped (partitioned InnoDB tables cannot have any).
message_records = sa.Table(
    "message_records",
    PLATFORM,
    id_column("记录ID"),
    sa.Column("task_id", sa.String(36), nullable=False, comment="任务ID"),
    sa.Column("account_id", sa.String(36), nullable=False, comment="发送账号ID"),
    sa.Column("recipient_id", sa.String(100), nullable=False, comment="接收者ID"),
    sa.Column("recipient_name", sa.String(100), comment="接收者姓名"),
    sa.Column("recipient_type", enum("user", "group"), nullable=False, comment="接收者类型"),
    sa.Column("message_type", enum(*_MESSAGE_TYPES), nullable=False, comment="消息类型"),
    sa.Column("message_content", sa.JSON, nullable=False, comment="消息内容"),
    sa.Column("wework_message_id", sa.String(100), comment="企微消息ID"),
    sa.Column(
        "send_status",
        enum("pending", "sending", "sent", "delivered", "read", "failed"),
        server_default=default("pending"),
        comment="发送状态",
    ),
    sa.Column("failure_reason", sa.String(255), comment="失败原因"),
    sa.Column("retry_count", sa.Integer, server_default=default(0), comment="重试次数"),
    timestamp("sent_at", "发送时间"),
    timestamp("delivered_at", "送达时间"),
    timestamp("read_at", "阅读时间"),
    created_at(primary_key=True),
    index("idx_task_id", "task_id"),
    index("idx_account_id", "account_id"),
    index("idx_recipient_id", "recipient_id"),
    index("idx_send_status", "send_status"),
    index("idx_sent_at", "sent_at"),
    # From the seed's index-optimisation section.
    index("idx_account_status_sent", "account_id", "send_status", "sent_at"),
    comment="消息发送记录表",
    **MYSQL_TABLE_OPTIONS,
)

# The seed's FK to message_records is dropped: a partitioned table cannot be referenced.
message_callbacks = sa.Table(
    "message_callbacks",
    PLATFORM,
    id_column("回调ID"),
    sa.Column("message_record_id", sa.String(36), nullable=False, comment="消息记录ID"),
    sa.Column(
        "callback_type",
        enum("delivery", "read", "click", "reply"),
        nullable=False,
        comment="回调类型",
    ),
    sa.Column("callback_data", sa.JSON, nullable=False, comment="回调数据"),
    timestamp("callback_time", "回调时间", nullable=False),
    sa.Column("processed", sa.Boolean, server_default=FALSE, comment="是否已处理"),
    created_at(),
    index("idx_message_record_id", "message_record_id"),
    index("idx_callback_type", "callback_type"),
    index("idx_callback_time", "callback_time"),
    index("idx_processed", "processed"),
    comment="消息回调记录表",
    **MYSQL_TABLE_OPTIONS,
)

file_resources = sa.Table(
    "file_resources",
    PLATFORM,
    id_column("文件ID"),
    sa.Column("tenant_id", sa.String(36), nullable=False, comment="租户ID"),
    sa.Column("file_name", sa.String(255), nullable=False, comment="文件名"),
    sa.Column(
        "file_type",
        enum("image", "video", "audio", "document", "other"),
        nullable=False,
        comment="文件类型",
    ),
    sa.Column("file_size", sa.BigInteger, nullable=False, comment="文件大小(字节)"),
    sa.Column("file_path", sa.String(500), nullable=False, comment="文件路径"),
    sa.Column("file_url", sa.String(500), comment="访问URL"),
    sa.Column("file_hash", sa.String(64), comment="文件哈希"),
    sa.Column("mime_type", sa.String(100), comment="MIME类型"),
    # The seed lists 'oss' twice (MariaDB error 1291); the fourth provider is 's3'.
    sa.Column(
        "storage_type",
        enum("local", "oss", "cos", "s3"),
        server_default=default("local"),
        comment="存储类型",
    ),
    sa.Column("usage_count", sa.BigInteger, server_default=default(0), comment="使用次数"),
    sa.Column("uploaded_by", sa.String(36), comment="上传者ID"),
    created_at(),
    index("idx_tenant_id", "tenant_id"),
    index("idx_file_type", "file_type"),
    index("idx_file_hash", "file_hash"),
    index("idx_uploaded_by", "uploaded_by"),
    index("idx_created_at", "created_at"),
    comment="文件资源表",
    **MYSQL_TABLE_OPTIONS,
)

file_usage_records = sa.Table(
    "file_usage_records",
    PLATFORM,
    id_column("记录ID"),
    sa.Column(
        "file_id",
        sa.String(36),
        sa.ForeignKey("file_resources.id", ondelete="CASCADE"),
        nullable=False,
        comment="文件ID",
    ),
    sa.Column(
        "usage_type",
        enum("message", "template", "avatar", "other"),
        nullable=False,
        comment="使用类型",
    ),
    sa.Column("reference_id", sa.String(36), comment="关联ID"),
    sa.Column("used_by", sa.String(36), comment="使用者ID"),
    created_at("使用时间", name="used_at"),
    index("idx_file_id", "file_id"),
    index("idx_usage_type", "usage_type"),
    index("idx_reference_id", "reference_id"),
    index("idx_used_at", "used_at"),
    comment="文件使用记录表",
    **MYSQL_TABLE_OPTIONS,
)
