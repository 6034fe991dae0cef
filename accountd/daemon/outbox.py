"""Writes that follow a commit in another database, retried until they land.

A transition commits in ``wework_platform``; its ``operation_logs`` row (``saas_unified_core``)
or its ``system_alerts`` row (``monitor_analytics``) cannot be in the same transaction. Such
writes go through the `Outbox`: queued in order per database, written by one task per database,
retried with backoff while the database is down, never silently dropped. Each write is one
transaction; inserts carry client-made ids, so a retry after an ambiguous failure (the commit
happened but the answer was lost) meets a duplicate key, which counts as done.

What is still queued when the daemon stops (bounded wait) is logged as lost, with a count, so an
operator knows; the platform database's status log stays the source of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table
from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    StatementError,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger(__name__)

Write = Callable[[AsyncConnection], Awaitable[None]]


@dataclass(slots=True)
class _Item:
    label: str
    write: Write
    tries: int = 0


class Outbox:
    """Ordered, retried writes to the databases other than the one a change committed in."""

    def __init__(
        self,
        engines: Mapping[str, AsyncEngine],
        *,
        max_pending: int = 100_000,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.engines = dict(engines)
        self.max_pending = max_pending
        self.on_error = on_error  # e.g. accountd_db_errors_total{database}
        self._queues: dict[str, deque[_Item]] = {key: deque() for key in self.engines}
        self._wake: dict[str, asyncio.Event] = {key: asyncio.Event() for key in self.engines}
        self._tasks: list[asyncio.Task[None]] = []
        self.written = 0
        self.dropped = 0
        self.healthy: dict[str, bool] = dict.fromkeys(self.engines, True)
        self._drained = asyncio.Event()

    # ---------------------------------------------------------------- submitting

    def submit(self, key: str, label: str, write: Write) -> None:
        """Queue ``write`` for database ``key``; it runs in its own transaction, in order."""
        queue = self._queues[key]
        if len(queue) >= self.max_pending:
            # Bounded memory: the oldest queued write goes, loudly (and is counted).
            old = queue.popleft()
            self.dropped += 1
            log.error("outbox %s full: dropped %s to stay bounded", key, old.label)
        queue.append(_Item(label, write))
        self._wake[key].set()

    def insert(self, key: str, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
        """Queue an insert of ``rows`` (each with its own id) into ``table``."""
        payload = [dict(r) for r in rows]

        async def write(conn: AsyncConnection) -> None:
            await conn.execute(table.insert(), payload)

        self.submit(key, f"insert {len(payload)} into {table.name}", write)

    def pending(self, key: str | None = None) -> int:
        if key is not None:
            return len(self._queues[key])
        return sum(len(q) for q in self._queues.values())

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        for key in self.engines:
            self._tasks.append(asyncio.create_task(self._run(key), name=f"accountd-outbox-{key}"))

    async def stop(self, grace: float = 5.0) -> None:
        """Write what is queued (bounded by ``grace``), then stop the tasks."""
        if self.pending():
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        left = self.pending()
        if left:
            log.error("outbox: %d cross-database writes still queued at shutdown were lost", left)

    async def _run(self, key: str) -> None:
        queue = self._queues[key]
        engine = self.engines[key]
        delay = 0.2
        while True:
            if not queue:
                if not self.pending():
                    self._drained.set()
                self._wake[key].clear()
                await self._wake[key].wait()
                continue
            item = queue[0]
            try:
                async with engine.begin() as conn:
                    await item.write(conn)
            except IntegrityError as exc:
                if not _is_duplicate(exc):
                    # A write that can never succeed (a bug, or a constraint): log it once, move on.
                    log.error("outbox %s: %s refused: %s", key, item.label, exc.orig)
                    queue.popleft()
                    self.dropped += 1
                    continue
            except (OperationalError, InterfaceError, OSError) as exc:
                item.tries += 1
                self.healthy[key] = False
                if self.on_error is not None:
                    self.on_error(key)
                log.warning(
                    "outbox %s: %s failed (try %d), retrying in %.1fs: %s",
                    key,
                    item.label,
                    item.tries,
                    delay,
                    getattr(exc, "orig", exc),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            except (DBAPIError, StatementError) as exc:
                # Bad data or a bad statement: retrying cannot help and would block the queue.
                log.error("outbox %s: %s refused for good: %s", key, item.label, exc)
                queue.popleft()
                self.dropped += 1
                continue
            queue.popleft()
            self.written += 1
            self.healthy[key] = True
            delay = 0.2


def _is_duplicate(exc: IntegrityError) -> bool:
    text = str(exc.orig).lower()
    # MySQL/MariaDB 1062 "Duplicate entry"; SQLite "UNIQUE constraint failed".
    return "duplicate entry" in text or "1062" in text or "unique constraint failed" in text
