"""Both sides of the worker protocol over real HTTP on loopback.

`WorkerClient` (daemon → worker) calls the real worker simulator; the simulator pushes events and
heartbeats to a real ingest listener (`make_ingest_app`) backed by the in-test `DictSink` from
test_ingest. The simulator's session table is also driven directly with a fake clock.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from accountd.adapters.worker import WorkerClient
from accountd.daemon.ingest import IngestServer, make_ingest_app
from accountd.daemon.simulator import WorkerSimulator
from accountd.daemon.simulator_sessions import Phase, SessionTable, SimulatorConfig
from accountd.errors import Overloaded, WorkerRejected, WorkerTransient
from tests.test_ingest import TOKEN, DictSink

REPO = Path(__file__).resolve().parents[1]
LOGIN = ["qr_ready", "qr_scanned", "confirmed", "verified"]


def fast_config(ingest_url: str, **overrides: Any) -> SimulatorConfig:
    values: dict[str, Any] = {
        "ingest_url": ingest_url,
        "token": TOKEN,
        "seed": 7,
        "step_latency_min": 0.005,
        "step_latency_max": 0.01,
        "scan_latency_min": 0.005,
        "scan_latency_max": 0.01,
        "heartbeat_interval": 0.05,
        "tick": 0.005,
        **overrides,
    }
    return SimulatorConfig(**values)


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    sink: DictSink
    sim: WorkerSimulator
    worker: WorkerClient
    http: aiohttp.ClientSession

    def events_of(self, account_id: str) -> list[str]:
        return [e.event for e in self.sink.events if e.account_id == account_id]

    def beats_of(self, account_id: str) -> int:
        return sum(1 for aid, _ in self.sink.heartbeats if aid == account_id)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    sink = DictSink({"a1": "initializing", "a2": "recovering", "a3": "initializing"})
    ingest = IngestServer(make_ingest_app(sink, token=TOKEN), shutdown_timeout=1.0)
    port = await ingest.start("127.0.0.1", 0)
    sim = WorkerSimulator(fast_config(f"http://127.0.0.1:{port}"))
    url = await sim.start()
    try:
        async with WorkerClient(url, timeout=2) as worker, aiohttp.ClientSession() as http:
            yield Stack(sink, sim, worker, http)
    finally:
        await sim.stop()
        await ingest.stop()


async def open_a1(stack: Stack) -> None:
    await stack.worker.open_session(
        "a1",
        wework_guid="guid-a1",
        corp_id="corp-1",
        device_info={"model": "sim"},
        proxy_config={"url": "socks5://proxy:1080"},
    )


# -- the login flow and heartbeats ----------------------------------------------------------------


async def test_open_session_drives_waiting_qr_to_online_then_heartbeats(stack: Stack) -> None:
    await open_a1(stack)
    await eventually(lambda: stack.beats_of("a1") >= 3)
    assert stack.events_of("a1") == LOGIN
    assert stack.sink.states["a1"] == "online"
    qr = stack.sink.events[0].data["qr_code"]
    assert qr.startswith("data:image/png;base64,")
    assert all(e.at.tzinfo is UTC for e in stack.sink.events)
    assert stack.sim.sessions() == {"a1": "online"}
    assert stack.sim.stats["result_illegal_transition"] == 0


async def test_resume_reports_recovered_and_beats(stack: Stack) -> None:
    await stack.worker.resume_session("a2")  # unknown to the simulator: it may have restarted
    await eventually(lambda: stack.beats_of("a2") >= 1)
    assert stack.events_of("a2") == ["recovered"]
    assert stack.sink.states["a2"] == "online"


async def test_resume_that_cannot_resume_asks_for_relogin_then_runs_a_new_qr_flow(
    stack: Stack,
) -> None:
    stack.sim.update_rates({"p_resume_fail": 1})
    await stack.worker.resume_session("a2")
    await eventually(lambda: stack.beats_of("a2") >= 1)
    assert stack.events_of("a2") == ["relogin_required", *LOGIN]
    assert stack.sink.states["a2"] == "online"


async def test_close_session_stops_it_and_closing_again_is_success(stack: Stack) -> None:
    await open_a1(stack)
    await eventually(lambda: stack.beats_of("a1") >= 1)
    await stack.worker.close_session("a1")
    assert stack.sim.sessions() == {}
    await asyncio.sleep(0.05)  # a heartbeat POST already in flight may still land
    beats = stack.beats_of("a1")
    await asyncio.sleep(0.2)  # four heartbeat intervals
    assert stack.beats_of("a1") == beats
    await stack.worker.close_session("a1")  # 404 from the worker: already gone


async def test_reopening_a_session_restarts_its_login(stack: Stack) -> None:
    await open_a1(stack)
    await eventually(lambda: stack.sink.states["a1"] == "online")
    stack.sink.states["a1"] = "initializing"  # as if the daemon had gone through offline again
    await open_a1(stack)
    await eventually(lambda: stack.events_of("a1") == LOGIN + LOGIN)


# -- control endpoints ----------------------------------------------------------------------------


async def test_drop_stops_heartbeats_silently(stack: Stack) -> None:
    await open_a1(stack)
    await eventually(lambda: stack.beats_of("a1") >= 2)
    async with stack.http.post(f"{stack.sim.url}/sim/sessions/a1/drop") as resp:
        assert resp.status == 204
    await asyncio.sleep(0.05)  # a heartbeat POST already in flight may still land
    beats = stack.beats_of("a1")
    await asyncio.sleep(0.25)
    assert stack.beats_of("a1") == beats
    assert stack.events_of("a1") == LOGIN  # nothing said: the daemon must notice by itself
    async with stack.http.get(f"{stack.sim.url}/sim/sessions") as resp:
        assert await resp.json() == {"sessions": {"a1": "dropped"}}


async def test_logout_endpoint_reports_logged_out(stack: Stack) -> None:
    await open_a1(stack)
    await eventually(lambda: stack.beats_of("a1") >= 1)
    async with stack.http.post(f"{stack.sim.url}/sim/sessions/a1/logout") as resp:
        assert resp.status == 204
    await eventually(lambda: stack.sink.states["a1"] == "offline")
    assert stack.events_of("a1") == [*LOGIN, "logged_out"]
    assert stack.sim.phase("a1") is Phase.LOGGED_OUT


async def test_control_endpoints_404_for_unknown_sessions(stack: Stack) -> None:
    for action in ("drop", "logout"):
        async with stack.http.post(f"{stack.sim.url}/sim/sessions/zz/{action}") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "not_found"


async def test_config_endpoint_updates_rates_live_and_rejects_bad_keys(stack: Stack) -> None:
    url = f"{stack.sim.url}/sim/config"
    async with stack.http.post(url, json={"p_5xx": 1}) as resp:
        assert resp.status == 200
        assert (await resp.json())["p_5xx"] == 1.0
    with pytest.raises(WorkerTransient, match="503"):
        await open_a1(stack)
    for bad in ({"p_5xx": 1.5}, {"heartbeat_interval": 1}, {"p_logout": "x"}, [1]):
        async with stack.http.post(url, json=bad) as resp:
            assert resp.status == 400
    assert stack.sim.config.p_5xx == 1.0


async def test_events_for_an_unknown_account_make_the_simulator_forget_it(stack: Stack) -> None:
    await stack.worker.open_session("ghost", wework_guid="g", corp_id=None)
    await eventually(lambda: "ghost" not in stack.sim.sessions())
    assert stack.sim.stats["result_unknown_account"] == 1


# -- failures, as the daemon sees them ------------------------------------------------------------


async def test_worker_5xx_is_transient_for_every_call(stack: Stack) -> None:
    stack.sim.update_rates({"p_5xx": 1})
    with pytest.raises(WorkerTransient, match="503"):
        await open_a1(stack)
    with pytest.raises(WorkerTransient):
        await stack.worker.resume_session("a1")
    with pytest.raises(WorkerTransient):
        await stack.worker.close_session("a1")
    assert stack.sim.sessions() == {}


async def test_worker_4xx_is_rejected(stack: Stack) -> None:
    with pytest.raises(WorkerRejected, match="400"):
        await stack.worker.open_session("x" * 37, wework_guid="g", corp_id=None)


async def test_connection_refused_is_transient() -> None:
    async with WorkerClient(f"http://127.0.0.1:{free_port()}", timeout=2) as worker:
        with pytest.raises(WorkerTransient):
            await worker.open_session("a1", wework_guid="g", corp_id=None)
        with pytest.raises(WorkerTransient):
            await worker.close_session("a1")


async def test_worker_that_never_answers_is_transient_after_the_timeout() -> None:
    # A listening socket nobody accepts from: the kernel completes the handshake, no reply comes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        async with WorkerClient(f"http://127.0.0.1:{port}", timeout=0.2) as worker:
            with pytest.raises(WorkerTransient, match="TimeoutError"):
                await worker.resume_session("a1")


async def test_client_outside_async_with_is_a_programming_error() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await WorkerClient("http://127.0.0.1:1").close_session("a1")


async def test_account_id_is_one_path_segment(stack: Stack) -> None:
    stack.sink.states["a/b?c"] = "recovering"
    await stack.worker.resume_session("a/b?c")
    await eventually(lambda: stack.sink.states["a/b?c"] == "online")
    await stack.worker.close_session("a/b?c")
    assert "a/b?c" not in stack.sim.sessions()


# -- ingest down or overloaded: events are kept and retried in order ------------------------------


async def test_events_are_retried_in_order_when_ingest_comes_back() -> None:
    port = free_port()
    sink = DictSink({"a1": "initializing"})
    sim = WorkerSimulator(fast_config(f"http://127.0.0.1:{port}"))
    url = await sim.start()
    ingest = IngestServer(make_ingest_app(sink, token=TOKEN), shutdown_timeout=1.0)
    try:
        async with WorkerClient(url) as worker:
            await worker.open_session("a1", wework_guid="g", corp_id=None)
        await eventually(lambda: sim.phase("a1") is Phase.ONLINE)
        assert sim.stats["ingest_errors"] >= 1
        await ingest.start("127.0.0.1", port)
        await eventually(lambda: sink.states["a1"] == "online")
        assert [e.event for e in sink.events] == LOGIN
    finally:
        await sim.stop()
        await ingest.stop()


async def test_overloaded_ingest_gets_the_batch_again_after_retry_after() -> None:
    sink = DictSink({"a1": "initializing"})
    sink.overloaded = Overloaded(0.01, "busy")
    ingest = IngestServer(make_ingest_app(sink, token=TOKEN), shutdown_timeout=1.0)
    port = await ingest.start("127.0.0.1", 0)
    sim = WorkerSimulator(fast_config(f"http://127.0.0.1:{port}"))
    url = await sim.start()
    try:
        async with WorkerClient(url) as worker:
            await worker.open_session("a1", wework_guid="g", corp_id=None)
        await eventually(lambda: sink.calls >= 1)
        sink.overloaded = None
        await eventually(lambda: sink.states["a1"] == "online")
        assert [e.event for e in sink.events] == LOGIN
    finally:
        await sim.stop()
        await ingest.stop()


async def test_wrong_token_is_not_retried_forever() -> None:
    sink = DictSink({"a1": "initializing"})
    ingest = IngestServer(make_ingest_app(sink, token=TOKEN), shutdown_timeout=1.0)
    port = await ingest.start("127.0.0.1", 0)
    sim = WorkerSimulator(fast_config(f"http://127.0.0.1:{port}", token="wrong"))
    url = await sim.start()
    try:
        async with WorkerClient(url) as worker:
            await worker.open_session("a1", wework_guid="g", corp_id=None)
        await eventually(lambda: sim.stats["events_rejected"] >= 4)
        assert sink.received_nothing
    finally:
        await sim.stop()
        await ingest.stop()


# -- the session table with a fake clock ----------------------------------------------------------


def table(**overrides: Any) -> SessionTable:
    values: dict[str, Any] = {
        "seed": 3,
        "step_latency_min": 1.0,
        "step_latency_max": 1.0,
        "scan_latency_min": 2.0,
        "scan_latency_max": 2.0,
        "heartbeat_interval": 15.0,
        **overrides,
    }
    return SessionTable(SimulatorConfig(**values))


def run(t: SessionTable, until: float, step: float = 0.5) -> list[tuple[float, str, str]]:
    """Advance a fake clock from 0 to `until`; return (time, account, event-or-'beat')."""
    out: list[tuple[float, str, str]] = []
    now = 0.0
    while now <= until:
        due = t.advance(now)
        out += [(now, e.account_id, e.event) for e in due.events]
        out += [(now, aid, "beat") for aid in due.heartbeats]
        now += step
    return out


def test_login_steps_follow_the_configured_latencies() -> None:
    t = table()
    t.open("a", 0.0)
    assert run(t, 40) == [
        (1.0, "a", "qr_ready"),
        (3.0, "a", "qr_scanned"),
        (4.0, "a", "confirmed"),
        (5.0, "a", "verified"),
        (20.0, "a", "beat"),
        (35.0, "a", "beat"),
    ]


def test_unscanned_qr_is_refreshed_then_expires() -> None:
    t = table(p_qr_never_scanned=1.0, qr_refresh_interval=10.0, qr_max_refreshes=2)
    t.open("a", 0.0)
    assert run(t, 100) == [(1.0, "a", "qr_ready"), (11.0, "a", "qr_ready"), (21.0, "a", "qr_ready")]
    assert t.phase("a") is Phase.QR_EXPIRED


def test_unscanned_qr_without_refresh_sends_nothing_more() -> None:
    t = table(p_qr_never_scanned=1.0, qr_refresh_interval=None)
    t.open("a", 0.0)
    assert run(t, 500) == [(1.0, "a", "qr_ready")]
    assert t.phase("a") is Phase.WAITING_SCAN


def test_session_drop_per_heartbeat_stops_beating_without_an_event() -> None:
    t = table(p_session_drop=1.0)
    t.open("a", 0.0)
    assert [e for _, _, e in run(t, 100)] == LOGIN
    assert t.phase("a") is Phase.DROPPED


def test_logout_per_heartbeat_reports_logged_out() -> None:
    t = table(p_logout=1.0)
    t.open("a", 0.0)
    assert [e for _, _, e in run(t, 100)] == [*LOGIN, "logged_out"]


def test_fail_is_reported_with_an_error_message() -> None:
    t = table(p_fail=1.0)
    t.open("a", 0.0)
    due = t.advance(1.0)
    assert [(e.event, e.data["error"].startswith("simulated failure")) for e in due.events] == [
        ("fail", True)
    ]
    assert t.phase("a") is Phase.FAILED
    assert run(t, 100) == []


def test_a_seed_makes_a_run_reproducible() -> None:
    def trace() -> list[tuple[float, str, str]]:
        t = table(p_session_drop=0.2, p_logout=0.2, step_latency_max=3.0, scan_latency_max=9.0)
        for i in range(50):
            t.open(f"a{i}", i * 0.1)
        return run(t, 300)

    first = trace()
    assert first == trace()
    assert {e for _, _, e in first} >= {"verified", "beat", "logged_out"}


def test_one_heap_drives_100k_sessions() -> None:
    t = table()
    n = 100_000
    for i in range(n):
        t.open(f"acc-{i}", 0.0)
    events = beats = 0
    for now in (1.0, 3.0, 4.0, 5.0, 20.0, 35.0):
        due = t.advance(now)
        events += len(due.events)
        beats += len(due.heartbeats)
    assert (events, beats) == (4 * n, 2 * n)
    assert set(t.snapshot().values()) == {"online"}


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="p_logout"):
        SimulatorConfig(p_logout=2.0)
    with pytest.raises(ValueError, match="step_latency"):
        SimulatorConfig(step_latency_min=2.0, step_latency_max=1.0)
    with pytest.raises(ValueError, match="unknown"):
        SimulatorConfig().with_rates({"tick": 1})


# -- the standalone process -----------------------------------------------------------------------


async def test_standalone_simulator_runs_until_sigterm() -> None:
    sink = DictSink({"a1": "initializing"})
    ingest = IngestServer(make_ingest_app(sink, token=TOKEN), shutdown_timeout=1.0)
    port = await ingest.start("127.0.0.1", 0)
    env = {**os.environ, "ACCOUNTD_INGEST__TOKEN": TOKEN}
    # -m from the repo root, with the token from the environment (not the command line).
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "accountd.daemon.simulator",
        "--listen",
        "127.0.0.1:0",
        "--ingest-url",
        f"http://127.0.0.1:{port}",
        "--seed",
        "1",
        "--tick",
        "0.005",
        "--step-latency-min",
        "0.01",
        "--step-latency-max",
        "0.02",
        "--scan-latency-min",
        "0.01",
        "--scan-latency-max",
        "0.02",
        "--heartbeat-interval",
        "0.05",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("worker simulator listening on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1].strip()
        async with WorkerClient(url) as worker:
            await worker.open_session("a1", wework_guid="g", corp_id=None)
        await eventually(lambda: len(sink.heartbeats) >= 2, timeout=10)
        assert [e.event for e in sink.events] == LOGIN
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await ingest.stop()


class _CancelBecomesTimeout(WorkerClient):
    """The worker side as aiohttp can present it: a call cancelled just as its timeout fires
    comes back as a timeout (WorkerTransient), not as CancelledError."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9")
        self.started = asyncio.Event()

    async def resume_session(self, account_id: str) -> None:
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise WorkerTransient(
                f"worker POST resume for {account_id!r} failed: timeout"
            ) from None


async def test_worker_call_pool_stops_even_when_a_cancellation_comes_back_as_an_error(
    migrated_urls: dict[str, str],
) -> None:
    from accountd.adapters.db import Databases
    from accountd.adapters.repository import AccountRepository
    from accountd.daemon.worker_calls import RESUME, WorkerCalls

    dbs = Databases(migrated_urls)
    failures: list[tuple[str, str]] = []
    worker = _CancelBecomesTimeout()
    calls = WorkerCalls(
        worker,
        AccountRepository(dbs.platform),
        lambda call, account_id, _exc: failures.append((call, account_id)),
        concurrency=2,
    )
    try:
        await calls.start()
        calls.queue(RESUME, "a1")
        await asyncio.wait_for(worker.started.wait(), 5)
        # Before the fix the pool task went back to the queue, still "cancelling", and stop()
        # waited for it forever.
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(calls.stop(), 10)
        assert loop.time() - started < 2
        assert not calls.running
        assert failures == [(RESUME, "a1")]
    finally:
        await dbs.dispose()
