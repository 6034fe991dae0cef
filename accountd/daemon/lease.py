"""The single-writer lease in ``accountd_leases``.

Until the multi-instance design exists exactly one daemon may act on a database. At start the
daemon takes the lease named ``supervisor`` (a row: holder, epoch, expiry); a second daemon
pointed at the same database finds it held and unexpired and refuses to start with a clear error.
The holder renews it periodically; a daemon that finds its lease taken over stops rather than
write beside another. Every acquisition bumps ``epoch`` — the fencing token the sharded design
will carry on every write.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import uuid
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from accountd.adapters.repository import utcnow
from accountd.adapters.schema import accountd_leases
from accountd.errors import AccountdError

log = logging.getLogger(__name__)

LEASE_NAME = "supervisor"


class LeaseHeld(AccountdError):
    """Another daemon holds the lease."""


class LeaseLost(AccountdError):
    """Our lease was taken over (we were paused longer than its TTL, or a peer forced it)."""


@dataclass(slots=True)
class Lease:
    engine: AsyncEngine
    ttl: float = 30.0
    name: str = LEASE_NAME
    holder: str = ""
    epoch: int = 0

    def __post_init__(self) -> None:
        if not self.holder:
            self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    async def acquire(self) -> int:
        """Take the lease or raise `LeaseHeld`; returns the new epoch."""
        t = accountd_leases
        now = utcnow()
        expires = now + dt.timedelta(seconds=self.ttl)
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(select(t).where(t.c.name == self.name).with_for_update())
            ).first()
            if row is None:
                try:
                    await conn.execute(
                        t.insert().values(
                            name=self.name,
                            holder=self.holder,
                            epoch=1,
                            acquired_at=now,
                            renewed_at=now,
                            expires_at=expires,
                        )
                    )
                except IntegrityError as exc:  # a peer inserted it first
                    raise LeaseHeld("another accountd took the lease at the same moment") from exc
                self.epoch = 1
                return self.epoch
            m = row._mapping
            if (
                m["expires_at"] > now
                and m["holder"] != self.holder
                and not _dead_local(m["holder"])
            ):
                raise LeaseHeld(
                    f"another accountd ({m['holder']}) holds the lease on this database until "
                    f"{m['expires_at']:%Y-%m-%d %H:%M:%S} UTC; refusing to run two daemons on "
                    "one database (stop the other one, or wait for its lease to expire)"
                )
            self.epoch = int(m["epoch"]) + 1
            await conn.execute(
                update(t)
                .where(t.c.name == self.name, t.c.epoch == m["epoch"])
                .values(
                    holder=self.holder,
                    epoch=self.epoch,
                    acquired_at=now,
                    renewed_at=now,
                    expires_at=expires,
                )
            )
        log.info("lease %r acquired by %s (epoch %d)", self.name, self.holder, self.epoch)
        return self.epoch

    async def renew(self) -> None:
        """Extend the lease; raise `LeaseLost` if someone else holds it now."""
        t = accountd_leases
        now = utcnow()
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(t)
                .where(t.c.name == self.name, t.c.holder == self.holder, t.c.epoch == self.epoch)
                .values(renewed_at=now, expires_at=now + dt.timedelta(seconds=self.ttl))
            )
        if result.rowcount != 1:
            raise LeaseLost(f"lease {self.name!r} (epoch {self.epoch}) was taken by another daemon")

    async def release(self) -> None:
        """Let the next daemon start at once instead of waiting for the TTL."""
        t = accountd_leases
        async with self.engine.begin() as conn:
            await conn.execute(
                update(t)
                .where(t.c.name == self.name, t.c.holder == self.holder, t.c.epoch == self.epoch)
                .values(expires_at=utcnow())
            )


def _dead_local(holder: str) -> bool:
    """True when ``holder`` names a process on this host that no longer exists.

    After a crash (SIGKILL, OOM) the lease would block a restart until it expires; a holder on
    our own host whose pid is gone cannot be writing, so the restart may take over at once.
    """
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, owned by someone else
    return False
