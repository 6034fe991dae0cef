"""``accountd db upgrade | downgrade REV | current``: Alembic for the three databases.

Alembic is configured in code (no ``alembic.ini``, no ``env.py``): each database has its own
script directory under `accountd.adapters.migrations` and its own version table
(``alembic_version_core``, ``alembic_version_platform``, ``alembic_version_analytics``), and
migrations run on engines from `accountd.adapters.db.make_engine`, so MySQL sessions are in UTC
exactly as in the daemon.

REV, for `upgrade` and `downgrade`:

* ``head`` / ``base`` / a relative step (``+1``, ``-1``): every database;
* ``KEY:REV[,KEY:REV…]``: only the named databases, e.g. ``platform:base`` or
  ``core:-1,analytics:base``;
* a bare revision id such as ``platform_0001``: the one database whose history holds it
  (revision ids carry their database's name).

Down to ``base`` drops everything our migrations created, the version table included (the
seed's rollback script). A malformed REV raises `ValueError`; Alembic's own refusals
(unknown revision, a relative step past base) raise ``alembic.util.CommandError``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError
from sqlalchemy.engine import Connection

from accountd.adapters.db import DATABASE_KEYS, ensure_reachable, make_engine, safe_url
from accountd.adapters.migrations import script_location
from accountd.adapters.schema import METADATA

log = logging.getLogger(__name__)

VERSION_TABLES: dict[str, str] = {key: f"alembic_version_{key}" for key in DATABASE_KEYS}

_EVERY_DATABASE = frozenset({"head", "heads", "base"})

Direction = Literal["upgrade", "downgrade"]


@dataclass(frozen=True, slots=True)
class _Scripts:
    config: Config
    script: ScriptDirectory


def _load_scripts(keys: Iterable[str]) -> dict[str, _Scripts]:
    """Read the revision files of `keys` (file I/O: call it in a thread)."""
    out: dict[str, _Scripts] = {}
    for key in keys:
        config = Config()
        config.set_main_option("script_location", str(script_location(key)))
        script = ScriptDirectory.from_config(config)
        script.get_heads()  # loads every revision module now, off the event loop
        out[key] = _Scripts(config, script)
    return out


def _knows(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except (CommandError, ResolutionError):
        return False


def _targets(spec: str, scripts: Mapping[str, _Scripts]) -> dict[str, str]:
    """Database key -> Alembic revision, from a REV as described in the module docstring."""
    spec = spec.strip()
    if not spec:
        raise ValueError("empty revision")
    if ":" in spec:
        out: dict[str, str] = {}
        for part in spec.split(","):
            key, sep, rev = part.strip().partition(":")
            key, rev = key.strip(), rev.strip()
            if not sep or key not in DATABASE_KEYS or not rev:
                raise ValueError(
                    f"bad revision {part.strip()!r}: expected KEY:REV with KEY one of "
                    + ", ".join(DATABASE_KEYS)
                )
            if key in out:
                raise ValueError(f"database {key!r} named twice in {spec!r}")
            out[key] = rev
        return out
    if spec in _EVERY_DATABASE or spec[0] in "+-":
        return dict.fromkeys(DATABASE_KEYS, spec)
    owners = [key for key, s in scripts.items() if _knows(s.script, spec)]
    if len(owners) != 1:
        where = "no database" if not owners else "several databases: " + ", ".join(owners)
        raise ValueError(f"revision {spec!r} belongs to {where}; use KEY:REV")
    return {owners[0]: spec}


def _step_revisions(
    scripts: _Scripts, direction: Direction, target: str
) -> Any:  # the ``fn`` contract of EnvironmentContext
    script = scripts.script

    # What ``alembic.command.upgrade``/``downgrade`` pass to their env.py: the revisions to run
    # from the database's current one (`rev`) to `target`.
    def step(rev: Any, context: MigrationContext) -> Any:
        if direction == "upgrade":
            return script._upgrade_revs(target, rev)
        return script._downgrade_revs(target, rev)

    return step


def _run(conn: Connection, key: str, scripts: _Scripts, direction: Direction, target: str) -> None:
    """Run one database's migrations on `conn` (sync: inside ``AsyncConnection.run_sync``)."""
    with EnvironmentContext(
        scripts.config,
        scripts.script,
        fn=_step_revisions(scripts, direction, target),
        destination_rev=target,
    ) as env:
        env.configure(
            connection=conn, target_metadata=METADATA[key], version_table=VERSION_TABLES[key]
        )
        with env.begin_transaction():
            env.run_migrations()
    if direction == "downgrade" and not _heads(conn, key):
        # Alembic keeps an empty version table at base; "base drops everything" includes it.
        sa.Table(VERSION_TABLES[key], sa.MetaData()).drop(conn, checkfirst=True)


def _heads(conn: Connection, key: str) -> tuple[str, ...]:
    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLES[key]})
    return tuple(context.get_current_heads())


def _url(urls: Mapping[str, str], key: str) -> str:
    try:
        return urls[key]
    except KeyError:
        raise ValueError(f"no URL for database {key!r}") from None


async def _migrate(urls: Mapping[str, str], spec: str, direction: Direction) -> None:
    scripts = await asyncio.to_thread(_load_scripts, DATABASE_KEYS)
    targets = _targets(spec, scripts)
    for key in DATABASE_KEYS:
        if key not in targets:
            continue
        url = _url(urls, key)
        engine = make_engine(url)
        try:
            await ensure_reachable(key, engine)
            async with engine.begin() as conn:
                await conn.run_sync(_run, key, scripts[key], direction, targets[key])
        finally:
            await engine.dispose()
        log.info(
            "database %s migrated (%s to %s)",
            key,
            direction,
            targets[key],
            extra={"database": key, "url": safe_url(url)},
        )


async def upgrade(urls: Mapping[str, str], revision: str = "head") -> None:
    """Upgrade the databases to `revision` (see the module docstring for REV)."""
    await _migrate(urls, revision, "upgrade")


async def downgrade(urls: Mapping[str, str], revision: str) -> None:
    """Downgrade to `revision`; ``base`` drops every table our migrations created."""
    await _migrate(urls, revision, "downgrade")


async def current(urls: Mapping[str, str]) -> dict[str, str | None]:
    """The revision of each database in `urls`: None when not migrated (or at base).

    A database with several heads (merged branches, not used so far) reports them
    comma-separated.
    """
    out: dict[str, str | None] = {}
    for key in DATABASE_KEYS:
        if key not in urls:
            continue
        engine = make_engine(urls[key])
        try:
            await ensure_reachable(key, engine)
            async with engine.connect() as conn:
                heads = await conn.run_sync(_heads, key)
        finally:
            await engine.dispose()
        out[key] = ",".join(sorted(heads)) or None
    return out


async def heads() -> dict[str, str]:
    """The head revision of each database's script directory (what `upgrade` reaches)."""
    scripts = await asyncio.to_thread(_load_scripts, DATABASE_KEYS)
    return {key: ",".join(sorted(s.script.get_heads())) for key, s in scripts.items()}
