"""Types shared by the ingest listener and the engine (see docs/worker-protocol.md).

The ingest server validates whole batches and hands them over through `IngestSink`; the engine
implements the sink. Heartbeats cross as two parallel sequences rather than one object per item
because the heartbeat path must sustain ≥100,000 items/s on two cores: the only per-item objects
are the ones JSON parsing creates anyway (the id string and the parsed `datetime`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

#: The triggers a worker may send as events (BRIEF §3); every other trigger is the daemon's own.
WORKER_EVENTS: frozenset[str] = frozenset(
    {
        "qr_ready",
        "qr_scanned",
        "confirmed",
        "verified",
        "logged_out",
        "recovered",
        "relogin_required",
        "fail",
    }
)


class ItemResult(StrEnum):
    """What became of one heartbeat or event; the reply lists one per input item, in order."""

    APPLIED = "applied"
    UNKNOWN_ACCOUNT = "unknown_account"
    ILLEGAL = "illegal_transition"
    CONFLICT = "conflict"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class WorkerEvent:
    """One validated event from a worker; `at` is timezone-aware UTC."""

    account_id: str
    event: str
    data: dict[str, Any]
    at: datetime


class IngestSink(Protocol):
    """What the ingest listener hands validated batches to (implemented by the engine).

    Either method may raise `accountd.errors.Overloaded`; the listener answers 503 with
    ``Retry-After`` and the worker retries the whole batch.
    """

    def record_heartbeats(
        self, account_ids: Sequence[str], ats: Sequence[datetime]
    ) -> list[ItemResult]:
        """Record heartbeats in memory (hot path, synchronous); `ats` are aware UTC."""
        ...

    async def apply_events(self, events: Sequence[WorkerEvent]) -> list[ItemResult]:
        """Apply events in order; one result per event."""
        ...
