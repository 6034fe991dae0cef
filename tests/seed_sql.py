"""A small parser of the seed's SQL (docs/seed/database-design.md), for the schema tests.

It reads the ```sql blocks of the in-repo copy, attributes each ``CREATE TABLE`` to the database
of the heading above it, and parses columns (type, NULL-ness, default, ON UPDATE, comment,
inline PRIMARY KEY/UNIQUE), keys, indexes, foreign keys, table comment and partitioning, and the
standalone ``CREATE INDEX`` statements. It understands exactly the dialect the seed uses, and
fails loudly on anything else so that a changed seed cannot silently parse as less.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SEED_PATH = Path(__file__).resolve().parent.parent / "docs" / "seed" / "database-design.md"

DATABASE_BY_SCHEMA = {
    "saas_unified_core": "core",
    "wework_platform": "platform",
    "monitor_analytics": "analytics",
}


@dataclass
class SeedColumn:
    name: str
    type: str  # upper-case base type: VARCHAR, INT, ENUM, ...
    args: tuple[str, ...]  # VARCHAR(36) -> ("36",); ENUM('a','b') -> ("a", "b")
    nullable: bool
    default: str | None  # as written: "'active'", "100", "FALSE", "CURRENT_TIMESTAMP"
    on_update: str | None
    comment: str | None
    primary_key: bool
    unique: bool


@dataclass
class SeedIndex:
    name: str
    columns: tuple[str, ...]
    unique: bool


@dataclass
class SeedForeignKey:
    columns: tuple[str, ...]
    ref_table: str
    ref_columns: tuple[str, ...]
    on_delete: str | None


@dataclass
class SeedTable:
    name: str
    database: str
    columns: dict[str, SeedColumn] = field(default_factory=dict)
    indexes: list[SeedIndex] = field(default_factory=list)
    foreign_keys: list[SeedForeignKey] = field(default_factory=list)
    comment: str | None = None
    partition_by: str | None = None
    sql: str = ""

    @property
    def primary_key(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns.values() if c.primary_key)


@dataclass
class SeedStatement:
    database: str | None  # None in the index-optimisation section
    sql: str


@dataclass
class Seed:
    tables: dict[str, SeedTable]
    extra_indexes: list[tuple[str, SeedIndex]]  # (table, index) of CREATE INDEX statements
    statements: list[SeedStatement]  # every statement in document order, verbatim

    def tables_of(self, database: str) -> dict[str, SeedTable]:
        return {n: t for n, t in self.tables.items() if t.database == database}


_HEADING = re.compile(r"^###\s+\d+\.\s+(\w+)\s+数据库", re.M)
_SQL_BLOCK = re.compile(r"```sql\n(.*?)```", re.S)
_QUOTED = r"'((?:[^'\\]|\\.|'')*)'"


def _unquote(s: str) -> str:
    return s.replace("''", "'")


def _split_top_level(body: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside parentheses and quotes."""
    parts: list[str] = []
    cur: list[str] = []
    depth, quoted = 0, False
    for ch in body:
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        if ch == sep and depth == 0 and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _matching_paren(s: str, start: int) -> int:
    depth, quoted = 0, False
    for i in range(start, len(s)):
        ch = s[i]
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced parentheses in {s[start : start + 60]!r}")


def _names(s: str) -> tuple[str, ...]:
    return tuple(n.strip().strip("`") for n in s.split(","))


_COLUMN = re.compile(r"^(\w+)\s+([A-Z]+)(\s*\(([^)]*)\))?(.*)$", re.S)


def _parse_column(item: str) -> SeedColumn:
    m = _COLUMN.match(item)
    if m is None:
        raise ValueError(f"cannot parse column {item!r}")
    name, typ, _, raw_args, rest = m.groups()
    if typ == "ENUM":
        args = tuple(_unquote(v) for v in re.findall(_QUOTED, raw_args))
    elif raw_args is not None:
        args = tuple(a.strip() for a in raw_args.split(","))
    else:
        args = ()
    comment = None
    cm = re.search(r"\bCOMMENT\s+" + _QUOTED, rest)
    if cm:
        comment = _unquote(cm.group(1))
        rest = rest[: cm.start()] + rest[cm.end() :]
    on_update = None
    um = re.search(r"\bON UPDATE\s+(\w+)", rest)
    if um:
        on_update = um.group(1)
        rest = rest[: um.start()] + rest[um.end() :]
    default = None
    dm = re.search(r"\bDEFAULT\s+(" + _QUOTED + r"|[\w.]+)", rest)
    if dm:
        default = dm.group(1)
        rest = rest[: dm.start()] + rest[dm.end() :]
    primary_key = bool(re.search(r"\bPRIMARY KEY\b", rest))
    rest = re.sub(r"\bPRIMARY KEY\b", "", rest)
    not_null = bool(re.search(r"\bNOT NULL\b", rest))
    rest = re.sub(r"\bNOT NULL\b", "", rest)
    unique = bool(re.search(r"\bUNIQUE\b", rest))
    rest = re.sub(r"\bUNIQUE\b", "", rest)
    rest = re.sub(r"\bNULL\b", "", rest)
    if rest.strip():
        raise ValueError(f"unparsed attributes {rest.strip()!r} in column {name}")
    return SeedColumn(
        name=name,
        type=typ,
        args=args,
        nullable=not (not_null or primary_key),
        default=default,
        on_update=on_update,
        comment=comment,
        primary_key=primary_key,
        unique=unique,
    )


def _parse_create_table(sql: str, database: str) -> SeedTable:
    m = re.match(r"CREATE TABLE\s+`?(\w+)`?\s*", sql)
    if m is None:
        raise ValueError(f"not a CREATE TABLE: {sql[:60]!r}")
    table = SeedTable(name=m.group(1), database=database, sql=sql)
    open_at = sql.index("(", m.end() - 1)
    close_at = _matching_paren(sql, open_at)
    for item in _split_top_level(sql[open_at + 1 : close_at]):
        if km := re.match(r"UNIQUE KEY\s+(\w+)\s*\(([^)]*)\)$", item):
            table.indexes.append(SeedIndex(km.group(1), _names(km.group(2)), unique=True))
        elif km := re.match(r"(?:INDEX|KEY)\s+(\w+)\s*\(([^)]*)\)$", item):
            table.indexes.append(SeedIndex(km.group(1), _names(km.group(2)), unique=False))
        elif fm := re.match(
            r"FOREIGN KEY\s*\(([^)]*)\)\s*REFERENCES\s+(\w+)\s*\(([^)]*)\)"
            r"(?:\s+ON DELETE\s+(CASCADE|SET NULL|RESTRICT|NO ACTION))?$",
            item,
        ):
            table.foreign_keys.append(
                SeedForeignKey(_names(fm.group(1)), fm.group(2), _names(fm.group(3)), fm.group(4))
            )
        else:
            column = _parse_column(item)
            table.columns[column.name] = column
            if column.unique:
                # MySQL names an inline UNIQUE key after its column.
                table.indexes.append(SeedIndex(column.name, (column.name,), unique=True))
    tail = sql[close_at + 1 :]
    if cm := re.search(r"\bCOMMENT\s*=\s*" + _QUOTED, tail):
        table.comment = _unquote(cm.group(1))
    if pm := re.search(r"PARTITION BY RANGE\s*\((.*?)\)\s*\(", tail, re.S):
        table.partition_by = pm.group(1).strip()
    return table


def _strip_comments(block: str) -> str:
    return "\n".join(line for line in block.splitlines() if not line.strip().startswith("--"))


def parse_seed(path: Path = SEED_PATH) -> Seed:
    text = path.read_text(encoding="utf-8")
    headings = [(m.start(), DATABASE_BY_SCHEMA[m.group(1)]) for m in _HEADING.finditer(text)]
    tables: dict[str, SeedTable] = {}
    extra: list[tuple[str, SeedIndex]] = []
    statements: list[SeedStatement] = []
    # The heading "## 🔧 索引优化策略" ends the per-database sections.
    end_of_tables = text.index("索引优化策略")
    for block in _SQL_BLOCK.finditer(text):
        database = None
        if block.start() < end_of_tables:
            database = [db for pos, db in headings if pos < block.start()][-1]
        for sql in _split_top_level(_strip_comments(block.group(1)), sep=";"):
            statements.append(SeedStatement(database, sql))
            if sql.startswith("CREATE TABLE"):
                if database is None:
                    raise ValueError(f"CREATE TABLE outside a database section: {sql[:60]!r}")
                t = _parse_create_table(sql, database)
                tables[t.name] = t
            elif im := re.match(
                r"CREATE (UNIQUE )?INDEX\s+(\w+)\s+ON\s+(\w+)\s*\(([^)]*)\)$", sql, re.S
            ):
                extra.append(
                    (im.group(3), SeedIndex(im.group(2), _names(im.group(4)), bool(im.group(1))))
                )
            else:
                raise ValueError(f"unexpected statement in the seed: {sql[:60]!r}")
    return Seed(tables=tables, extra_indexes=extra, statements=statements)
