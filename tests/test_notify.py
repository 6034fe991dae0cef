"""sd_notify against a real AF_UNIX datagram socket set as NOTIFY_SOCKET.

The module on its own (path and abstract addresses, field encoding, the watchdog interval, send
failures, the ticker's cadence), then `accountd run` as a process: READY=1 only once it is ready,
STATUS= with counts per state, WATCHDOG=1 at half of WATCHDOG_USEC, RELOADING=1 then READY=1 on
SIGHUP, STOPPING=1 on SIGTERM. The receiver is a thread, so arrival times do not depend on the
event loop under test.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import signal
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from accountd.daemon.notify import (
    Notifier,
    Ticker,
    monotonic_usec,
    notify_address,
    watchdog_interval,
)
from tests.test_e2e import seed_accounts
from tests.test_signals import Rig, open_rig


@dataclass(frozen=True)
class Message:
    at: float  # time.monotonic() on arrival
    fields: dict[str, str]


class Inbox:
    """A bound datagram socket and a thread that timestamps everything arriving on it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.messages: list[Message] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(address)
        self._sock.settimeout(0.05)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-inbox", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            lines = data.decode().split("\n")
            fields = dict(line.split("=", 1) for line in lines)
            self.messages.append(Message(time.monotonic(), fields))

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self._sock.close()

    def having(self, key: str, since: int = 0) -> list[Message]:
        return [m for m in self.messages[since:] if key in m.fields]

    async def wait(
        self, match: Callable[[Message], bool], timeout: float, what: str, since: int = 0
    ) -> int:
        """Index of the first message from `since` on that matches."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(since, len(self.messages)):
                if match(self.messages[i]):
                    return i
            await asyncio.sleep(0.02)
        got = [m.fields for m in self.messages[since:]][-20:]
        pytest.fail(f"no {what} within {timeout}s; last messages: {got}")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path holds 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="notify-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def inbox(short_dir: Path) -> Iterator[Inbox]:
    box = Inbox(str(short_dir / "notify.sock"))
    yield box
    box.close()


async def arrived(box: Inbox, count: int, timeout: float = 5) -> None:
    await box.wait(lambda _m: len(box.messages) >= count, timeout, f"{count} messages")


# --------------------------------------------------------------------------- the protocol


async def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.watchdog()
    assert not notifier.reloading()
    assert not notifier.stopping()


async def test_each_message_reaches_a_path_socket(inbox: Inbox) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": inbox.address})
    assert notifier.ready("12 accounts: online=12; db ok")
    assert notifier.status("busy")
    assert notifier.watchdog()
    assert notifier.stopping()
    await arrived(inbox, 4)
    notifier.close()
    assert [m.fields for m in inbox.messages] == [
        {"READY": "1", "STATUS": "12 accounts: online=12; db ok"},
        {"STATUS": "busy"},
        {"WATCHDOG": "1"},
        {"STOPPING": "1"},
    ]


async def test_an_abstract_socket_is_reached_through_its_at_sign_name() -> None:
    name = f"accountd-test-{os.getpid()}-{time.monotonic_ns()}"
    box = Inbox("\0" + name)
    try:
        assert notify_address({"NOTIFY_SOCKET": "@" + name}) == "\0" + name
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.watchdog()
        await arrived(box, 1)
        assert box.messages[0].fields == {"WATCHDOG": "1"}
        notifier.close()
    finally:
        box.close()


async def test_reloading_carries_the_monotonic_clock_in_microseconds(inbox: Inbox) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": inbox.address})
    before = monotonic_usec()
    assert notifier.reloading("reloading")
    after = monotonic_usec()
    await arrived(inbox, 1)
    fields = inbox.messages[0].fields
    assert fields["RELOADING"] == "1" and fields["STATUS"] == "reloading"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    notifier.close()


async def test_a_newline_in_a_status_cannot_add_a_field(inbox: Inbox) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": inbox.address})
    assert notifier.status("bad\nREADY=1")
    await arrived(inbox, 1)
    assert inbox.messages[0].fields == {"STATUS": "bad READY=1"}
    notifier.close()


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/notify.sock"])
async def test_a_notify_socket_that_is_no_unix_path_is_ignored(value: str) -> None:
    assert not Notifier({"NOTIFY_SOCKET": value}).enabled


async def test_a_lost_socket_warns_once_and_recovers(
    inbox: Inbox, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    address = str(short_dir / "gone.sock")
    notifier = Notifier({"NOTIFY_SOCKET": address})
    with caplog.at_level(logging.INFO, logger="accountd.daemon.notify"):
        assert not notifier.watchdog()
        assert not notifier.watchdog()
        assert not notifier.status("x")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "WATCHDOG=1" in warnings[0].getMessage()
        box = Inbox(address)  # systemd is back
        try:
            assert notifier.watchdog()
            await arrived(box, 1)
        finally:
            box.close()
        assert "delivered again" in caplog.records[-1].getMessage()
    notifier.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "4242"}, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "4243"}, None),  # meant for another pid
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "me"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid(
    env: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_interval_defaults_to_this_process() -> None:
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 0.5


# --------------------------------------------------------------------------- the ticker


async def test_the_ticker_pings_at_its_cadence_until_stopped(inbox: Inbox) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": inbox.address})

    async def ping() -> None:
        notifier.watchdog()

    ticker = Ticker("sd-watchdog", 0.05, ping)
    await ticker.start()
    await asyncio.sleep(0.5)
    await ticker.stop()
    assert not ticker.running
    await asyncio.sleep(0.1)
    count = len(inbox.messages)
    assert 8 <= count <= 12
    gaps = [b.at - a.at for a, b in itertools.pairwise(inbox.messages)]
    assert max(gaps) < 0.1
    await asyncio.sleep(0.2)
    assert len(inbox.messages) == count  # stopped means stopped
    notifier.close()


async def test_a_blocked_event_loop_stops_the_watchdog_pings(inbox: Inbox) -> None:
    """The whole point of pinging from the loop: a stuck loop gets the process restarted."""
    notifier = Notifier({"NOTIFY_SOCKET": inbox.address})

    async def ping() -> None:
        notifier.watchdog()

    ticker = Ticker("sd-watchdog", 0.05, ping)
    await ticker.start()
    await asyncio.sleep(0.3)
    time.sleep(0.6)  # the stall under test: blocks the event loop
    await asyncio.sleep(0.3)
    await ticker.stop()
    notifier.close()
    gaps = [b.at - a.at for a, b in itertools.pairwise(inbox.messages)]
    assert max(gaps) >= 0.55
    assert sorted(gaps)[-2] < 0.2  # only the stall made a gap


async def test_a_failing_tick_is_logged_and_the_ticking_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("status query failed")

    ticker = Ticker("sd-status", 0.02, flaky)
    await ticker.start()
    await asyncio.sleep(0.2)
    await ticker.stop()
    assert calls >= 5
    assert any("sd-status failed" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- the daemon


@pytest.fixture
async def notify_rig(migrated_urls: dict[str, str], tmp_path: Path) -> AsyncIterator[Rig]:
    async with open_rig(migrated_urls, tmp_path) as r:
        yield r


def is_ready(m: Message) -> bool:
    return m.fields.get("READY") == "1"


@pytest.mark.parametrize("backend", ["sqlite"])  # the protocol does not depend on the database
async def test_the_daemon_tells_systemd_ready_status_watchdog_reload_and_stopping(
    notify_rig: Rig, inbox: Inbox
) -> None:
    rig = notify_rig
    rig.write_config()
    await seed_accounts(rig.dbs, 20)
    rig.spawn({"NOTIFY_SOCKET": inbox.address, "WATCHDOG_USEC": "400000"})

    ready = await inbox.wait(is_ready, 30, "READY=1")
    # READY=1 only once databases, listeners and accounts are up (the "ready:" line is logged
    # just before), with the counts as its first status.
    assert "ready:" in rig.log()
    assert inbox.messages[ready].fields["STATUS"].startswith("20 accounts: ")
    assert inbox.messages[ready].fields["STATUS"].endswith("; db ok")
    assert inbox.having("WATCHDOG")[0].at < inbox.messages[ready].at  # pinged during start-up

    # STATUS= follows the counts while the accounts come online.
    await inbox.wait(
        lambda m: m.fields.get("STATUS") == "20 accounts: online=20; db ok",
        30,
        "STATUS with every account online",
    )

    # WATCHDOG=1 at half of WATCHDOG_USEC (0.2 s), never as late as WATCHDOG_USEC itself.
    await asyncio.sleep(2.0)
    pings = [m.at for m in inbox.having("WATCHDOG", since=ready)]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 10
    assert 0.15 <= statistics.median(gaps) <= 0.25
    assert max(gaps) < 0.4

    # SIGHUP: RELOADING=1 (with the monotonic time) and then READY=1 again.
    mark = len(inbox.messages)
    rig.signal(signal.SIGHUP)
    reloading = await inbox.wait(lambda m: "RELOADING" in m.fields, 10, "RELOADING=1", mark)
    usec = int(inbox.messages[reloading].fields["MONOTONIC_USEC"])
    assert 0 <= monotonic_usec() - usec < 10_000_000
    await inbox.wait(is_ready, 10, "READY=1 after the reload", reloading)
    await rig.wait_log("reload: applied nothing")

    # SIGTERM: STOPPING=1, then a clean exit.
    mark = len(inbox.messages)
    rig.signal(signal.SIGTERM)
    await inbox.wait(lambda m: m.fields.get("STOPPING") == "1", 10, "STOPPING=1", mark)
    assert await rig.exit_status(30) == 0, rig.log()[-4000:]
    assert len([m for m in inbox.messages if is_ready(m)]) == 2


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_the_daemon_does_not_ping_a_watchdog_meant_for_another_process(
    notify_rig: Rig, inbox: Inbox
) -> None:
    rig = notify_rig
    rig.write_config()
    env = {"NOTIFY_SOCKET": inbox.address, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}
    rig.spawn(env)
    await inbox.wait(is_ready, 30, "READY=1")
    await asyncio.sleep(1.0)
    assert inbox.having("WATCHDOG") == []
    rig.signal(signal.SIGTERM)
    assert await rig.exit_status(30) == 0, rig.log()[-4000:]
