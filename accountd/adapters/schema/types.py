"""Building blocks shared by the three seed schemas.

The seed is MySQL DDL. MySQL/MariaDB get it as written (ENUM, JSON, ``ON UPDATE
CURRENT_TIMESTAMP``, comments, utf8mb4/InnoDB); SQLite, the embedded default, gets the closest
faithful equivalent:

* ``ENUM`` becomes ``VARCHAR(n)`` with a ``CHECK (col IN (...))`` constraint;
* ``ON UPDATE CURRENT_TIMESTAMP`` becomes an ``AFTER UPDATE`` trigger (see `updated_at`);
* index names are scoped by their table, because SQLite index names are unique per *database*
  while MySQL's are per *table* (the seed has ``idx_tenant_id``/``idx_status`` on many tables).

Everything dialect-specific is done with SQLAlchemy compile hooks and DDL events, so one
`MetaData` per database serves both backends, in migrations and in ``create_all`` alike.
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateIndex, DropIndex
from sqlalchemy.sql.compiler import DDLCompiler, SQLCompiler

# Foreign keys stay unnamed, as in the seed, so MySQL names them exactly as the seed's DDL would
# (``<table>_ibfk_<n>``) and names the index it adds for an unindexed one after its column
# (``message_tasks.template_id``). Enum CHECKs (SQLite only) need a name.
NAMING_CONVENTION: dict[str, str] = {"ck": "ck_%(table_name)s_%(column_0_name)s"}

# ``ENGINE=InnoDB DEFAULT CHARSET=utf8mb4`` on every table, as in the seed.
MYSQL_TABLE_OPTIONS: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}

# Marks an Index whose name the seed reuses across tables (see module docstring).
_SQLITE_SCOPED = "accountd_sqlite_scoped_name"

_MYSQL_DIALECTS = ("mysql", "mariadb")


def new_metadata() -> sa.MetaData:
    return sa.MetaData(naming_convention=NAMING_CONVENTION)


# --- types --------------------------------------------------------------------------------


def enum(*values: str) -> sa.Enum:
    """The seed's ``ENUM(...)``: native on MySQL, ``VARCHAR`` + CHECK elsewhere."""
    return sa.Enum(*values, native_enum=True, create_constraint=True, validate_strings=True)


# DATETIME(6) on MySQL for sub-second precision (the daemon's own tables); plain DATETIME on
# SQLite, which stores the microseconds in its text form anyway.
DATETIME6: sa.types.TypeEngine[Any] = sa.DateTime().with_variant(
    mysql.DATETIME(fsp=6), *_MYSQL_DIALECTS
)


# --- defaults -----------------------------------------------------------------------------


class UpdatedAtDefault(sa.sql.expression.ColumnElement[Any]):
    """``DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP`` on MySQL.

    Elsewhere just ``CURRENT_TIMESTAMP``; SQLite's refresh comes from a trigger. SQLAlchemy's
    MySQL DDL compiler recognises ``ON UPDATE`` inside a server default and emits it verbatim.
    """

    inherit_cache = True


@compiles(UpdatedAtDefault)
def _updated_at_default(element: UpdatedAtDefault, compiler: SQLCompiler, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(UpdatedAtDefault, "mysql")
@compiles(UpdatedAtDefault, "mariadb")
def _updated_at_default_mysql(element: UpdatedAtDefault, compiler: SQLCompiler, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP"


CURRENT_TIMESTAMP = sa.text("CURRENT_TIMESTAMP")
FALSE = sa.text("FALSE")
TRUE = sa.text("TRUE")


def default(value: int | str) -> sa.TextClause:
    """A literal server default exactly as the seed writes it (``DEFAULT 100``, ``'active'``)."""
    if isinstance(value, int):
        return sa.text(str(value))
    return sa.text("'" + value.replace("'", "''") + "'")


# --- columns ------------------------------------------------------------------------------


def id_column(comment: str) -> sa.Column[Any]:
    """``id VARCHAR(36) PRIMARY KEY`` (partitioned tables add their time column to the key)."""
    return sa.Column(
        "id", sa.String(36), primary_key=True, autoincrement=False, nullable=False, comment=comment
    )


def created_at(
    comment: str = "创建时间", *, name: str = "created_at", primary_key: bool = False
) -> sa.Column[Any]:
    """``created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP`` (nullable, as written).

    With ``primary_key`` (partitioned tables) the column joins the key and so is NOT NULL.
    """
    return sa.Column(
        name,
        sa.TIMESTAMP(),
        primary_key=primary_key,
        nullable=not primary_key,
        server_default=CURRENT_TIMESTAMP,
        comment=comment,
    )


def updated_at(comment: str = "更新时间") -> sa.Column[Any]:
    """``updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP``.

    The owning table must be passed to `keep_updated_at_fresh` to get the SQLite trigger.
    """
    return sa.Column(
        "updated_at",
        sa.TIMESTAMP(),
        nullable=True,
        server_default=UpdatedAtDefault(),
        comment=comment,
    )


def timestamp(name: str, comment: str, *, nullable: bool = True) -> sa.Column[Any]:
    """``TIMESTAMP NULL`` / ``TIMESTAMP NOT NULL`` without a default."""
    return sa.Column(name, sa.TIMESTAMP(), nullable=nullable, comment=comment)


# --- indexes ------------------------------------------------------------------------------


def index(name: str, *columns: str, unique: bool = False) -> sa.Index:
    """A seed ``INDEX name (cols)``; on SQLite it is created as ``<table>__<name>``."""
    return sa.Index(name, *columns, unique=unique, info={_SQLITE_SCOPED: True})


def sqlite_index_name(table: str, name: str) -> str:
    """The name an index of `table` gets on SQLite (index names are per database there)."""
    return f"{table}__{name}"


_INDEX_NAME_AT = re.compile(r"^(\s*(?:CREATE (?:UNIQUE )?|DROP )INDEX (?:IF (?:NOT )?EXISTS )?)")


def _scoped_index_ddl(element: CreateIndex | DropIndex, compiler: DDLCompiler, text: str) -> str:
    idx = element.element
    if not isinstance(idx, sa.Index) or not idx.info.get(_SQLITE_SCOPED) or idx.table is None:
        return text
    original = compiler.preparer.format_index(idx)
    scoped = compiler.preparer.quote(sqlite_index_name(idx.table.name, str(idx.name)))
    prefix = _INDEX_NAME_AT.match(text)
    if prefix is None or not text.startswith(original, prefix.end()):
        raise RuntimeError(f"unexpected index DDL from SQLAlchemy: {text!r}")
    return prefix.group(1) + scoped + text[prefix.end() + len(original) :]


@compiles(CreateIndex, "sqlite")
def _sqlite_create_index(element: CreateIndex, compiler: DDLCompiler, **kw: Any) -> str:
    text: str = compiler.visit_create_index(element, **kw)  # type: ignore[no-untyped-call]
    return _scoped_index_ddl(element, compiler, text)


@compiles(DropIndex, "sqlite")
def _sqlite_drop_index(element: DropIndex, compiler: DDLCompiler, **kw: Any) -> str:
    text: str = compiler.visit_drop_index(element, **kw)  # type: ignore[no-untyped-call]
    return _scoped_index_ddl(element, compiler, text)


# --- SQLite stand-in for ON UPDATE CURRENT_TIMESTAMP -----------------------------------------


def updated_at_trigger_name(table: str) -> str:
    return f"trg_{table}_updated_at"


def updated_at_trigger_sql(table: str) -> str:
    """The SQLite trigger that refreshes ``updated_at`` like MySQL's ON UPDATE does.

    It fires only when the UPDATE left ``updated_at`` alone (an explicit value wins, as in
    MySQL) and skips a no-op refresh within the same second, so it never re-triggers itself
    even with ``PRAGMA recursive_triggers=ON``.
    """
    q = f'"{table}"'  # our own Table names, never input
    name = updated_at_trigger_name(table)
    return (
        f"CREATE TRIGGER {name} AFTER UPDATE ON {q} FOR EACH ROW "  # noqa: S608
        "WHEN NEW.updated_at IS OLD.updated_at AND NEW.updated_at IS NOT CURRENT_TIMESTAMP "
        f"BEGIN UPDATE {q} SET updated_at = CURRENT_TIMESTAMP WHERE rowid = NEW.rowid; END"
    )


def keep_updated_at_fresh(table: sa.Table) -> sa.Table:
    """Attach the SQLite trigger to `table`'s CREATE (dropping the table drops the trigger)."""
    trigger = sa.DDL(updated_at_trigger_sql(table.name))  # type: ignore[no-untyped-call]
    sa.event.listen(table, "after_create", trigger.execute_if(dialect="sqlite"))
    return table
