"""Alembic script directories, one per database: ``core/``, ``platform/``, ``analytics/``.

Each holds only ``versions/``: there is no ``env.py`` nor ``alembic.ini``, because
`accountd.adapters.migrate` drives Alembic programmatically on the daemon's own engines, and
each database keeps its own version table (``alembic_version_core`` …), so the three histories
stay independent even if two of them share one server schema.

Writing a new revision: add ``versions/<db>_NNNN_<what>.py`` by hand with ``revision =
"<db>_NNNN"`` and ``down_revision`` the previous head of *that* database, and use explicit
``op.*`` calls (never ``MetaData.create_all``: see the initial revisions), guarding
MySQL-only DDL with ``op.get_bind().dialect.name``. Revision ids carry the database name so a
bare id given to ``accountd db downgrade`` names one database unambiguously.
"""

from __future__ import annotations

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent


def script_location(database: str) -> Path:
    return MIGRATIONS_DIR / database
