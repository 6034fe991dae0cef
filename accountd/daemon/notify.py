"""The systemd notify protocol (sd_notify(3)), with no dependency.

systemd passes ``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for the abstract namespace) to a
``Type=notify`` service; the service sends newline-separated ``KEY=VALUE`` datagrams to it:
``READY=1`` once it serves, ``STATUS=…`` for ``systemctl status``, ``WATCHDOG=1`` at least every
``WatchdogSec``, ``RELOADING=1`` (with ``MONOTONIC_USEC``, as systemd >= 253 wants) … ``READY=1``
around a reload, ``STOPPING=1`` when shutdown begins. Without ``NOTIFY_SOCKET`` (a terminal, the
tests, ``accountd demo``) every call is a no-op.

The protocol is a handful of lines, so a small module is less to trust than a dependency. Sends
never block the event loop: the socket is non-blocking and a datagram that cannot be sent at once
is dropped (the next ping or status follows within seconds) with one warning.

`Ticker` owns the periodic tasks: the daemon runs one for ``WATCHDOG=1`` at half of
``WATCHDOG_USEC`` and one for ``STATUS=``. The watchdog ping comes from a task on the event loop,
not a thread, precisely so that a stalled loop stops pinging and systemd restarts the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def notify_address(env: Mapping[str, str] | None = None) -> str | None:
    """The ``sendto`` address named by ``NOTIFY_SOCKET``, or None when unset or unsupported.

    ``@name`` is Linux's abstract namespace: the leading ``@`` stands for a NUL byte.
    """
    raw = (os.environ if env is None else env).get(NOTIFY_SOCKET, "")
    if not raw:
        return None
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # systemd >= 254 may also pass "vsock:CID:PORT" (VMs); a service on a host never gets it.
    log.warning("NOTIFY_SOCKET=%r is not a unix socket path; systemd notifications are off", raw)
    return None


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``; None when not asked.

    ``WATCHDOG_PID``, when set, names the process the watchdog is meant for; any other process
    (a child that inherited the environment) must not ping.
    """
    env = os.environ if env is None else env
    raw = env.get(WATCHDOG_USEC, "")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not a whole number of microseconds", WATCHDOG_USEC, raw)
        return None
    if usec <= 0:
        return None
    owner = env.get(WATCHDOG_PID, "")
    if owner:
        try:
            meant_for = int(owner)
        except ValueError:
            log.warning("ignoring the watchdog: %s=%r is not a process id", WATCHDOG_PID, owner)
            return None
        if meant_for != (os.getpid() if pid is None else pid):
            return None
    return usec / 2 / 1_000_000


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares ``MONOTONIC_USEC`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify datagrams to ``NOTIFY_SOCKET``; every method is a no-op without it.

    Methods return True when a datagram was sent, so callers and tests can tell.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.address = notify_address(env)
        self._sock: socket.socket | None = None
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=VALUE`` each) as one datagram."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(message, self.address)
        except OSError as exc:
            # Warn once per outage, not on every ping: systemd gone or the buffer full.
            if not self._failing:
                log.warning("systemd notification failed (%s): %s", fields[0], exc)
            self._failing = True
            return False
        if self._failing:
            log.info("systemd notifications delivered again")
        self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status_field(status))

    def status(self, text: str) -> bool:
        return self.send(*_status_field(text))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self, status: str | None = None) -> bool:
        # systemd >= 253 matches MONOTONIC_USEC against the time it sent SIGHUP (Type=notify-
        # reload); older versions ignore the field.
        return self.send(
            "RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", *_status_field(status)
        )

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status_field(status))

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _status_field(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    # One datagram is newline-separated fields: a newline inside STATUS would start a new field.
    return ("STATUS=" + " ".join(text.split("\n")),)


class Ticker:
    """Runs ``fn`` every ``interval`` seconds in one owned task, from `start` until `stop`.

    The first call happens at once. A failing ``fn`` is logged and the ticking goes on: the
    watchdog must keep pinging, and a status line is not worth stopping for.
    """

    def __init__(self, name: str, interval: float, fn: Callable[[], Awaitable[None]]) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.name = name
        self.interval = interval
        self._fn = fn
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.name} already started")
        self._task = asyncio.create_task(self._run(), name=f"accountd-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self._fn()
            except asyncio.CancelledError:
                raise
            except Exception:  # boundary: logged once per failure, the next tick tries again
                log.exception("%s failed", self.name)
            # A fixed cadence, not "interval after the call": a slow status must not stretch
            # the gap between watchdog pings; a late loop catches up with one call, not many.
            next_at = max(next_at + self.interval, loop.time())
            await asyncio.sleep(next_at - loop.time())
