"""The admin lane: heartbeat batches give way to admin requests, within bounds.

The lane alone (real asyncio timing, bounds checked with generous margins), then the real ingest
listener on loopback sharing a lane with a held admin request. The control socket's admission is
tested end to end in tests/test_control.py; the latency it buys is a benchmark figure
(docs/benchmarks.md), not a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from accountd.daemon.ingest import IngestServer, make_ingest_app
from accountd.daemon.priority import AdminLane
from tests.test_ingest import AUTH, TOKEN, DictSink, hb


def one_step(lane: AdminLane, ran: asyncio.Event) -> Callable[[], Awaitable[None]]:
    """A bulk step that sets `ran` when it gets to run."""

    async def bulk() -> None:
        async with lane.bulk_step():
            ran.set()

    return bulk


async def test_bulk_steps_run_at_once_without_admin_requests() -> None:
    lane = AdminLane(max_pause=5)
    started = time.monotonic()
    for _ in range(100):
        async with lane.bulk_step():
            pass
    assert time.monotonic() - started < 1
    assert lane.pauses == 0


async def test_a_bulk_step_waits_for_the_admin_request_in_flight() -> None:
    lane = AdminLane(max_pause=10)
    ran = asyncio.Event()
    bulk = one_step(lane, ran)

    with lane.admit():
        assert lane.admins == 1
        task = asyncio.create_task(bulk())
        await asyncio.sleep(0.2)
        assert not ran.is_set()
    await asyncio.wait_for(task, 2)
    assert ran.is_set()
    assert lane.admins == 0
    assert lane.pauses == 1


async def test_nested_admissions_keep_the_lane_until_the_last_one_ends() -> None:
    lane = AdminLane(max_pause=10)
    ran = asyncio.Event()
    bulk = one_step(lane, ran)

    with lane.admit():
        task = asyncio.create_task(bulk())
        with lane.admit():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        assert not ran.is_set()  # one request is still in flight
    await asyncio.wait_for(task, 2)
    assert lane.admitted == 2


async def test_a_step_waits_at_most_max_pause_and_then_earns_as_much_time() -> None:
    lane = AdminLane(max_pause=0.1)
    with lane.admit():  # an admin request that never ends: bulk work must still progress
        started = time.monotonic()
        async with lane.bulk_step():
            pass
        waited = time.monotonic() - started
        assert 0.09 <= waited < 1.0
        # The credit earned: the next step (shorter than the wait) runs without pausing ...
        pauses = lane.pauses
        async with lane.bulk_step():
            time.sleep(0.01)  # CPU work of a slice
        assert lane.pauses == pauses
        # ... and once the steps have used it up, the next one gives way again.
        for _ in range(30):
            async with lane.bulk_step():
                time.sleep(0.01)
        assert lane.pauses > pauses


async def test_under_back_to_back_admin_requests_bulk_work_keeps_a_share() -> None:
    lane = AdminLane(max_pause=0.05)
    stop = asyncio.Event()

    async def admin_hammer() -> None:
        # Each request holds the lane for 20 ms of "work", then the next one starts at once.
        while not stop.is_set():
            with lane.admit():
                await asyncio.sleep(0.02)

    hammer = asyncio.create_task(admin_hammer())
    await asyncio.sleep(0)
    worked = 0.0
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        async with lane.bulk_step():
            t = time.monotonic()
            time.sleep(0.005)  # a 5 ms slice of heartbeats
            worked += time.monotonic() - t
        await asyncio.sleep(0)
    stop.set()
    await hammer
    # Never starved: every pause is bounded and earns a third of it back (about a quarter of
    # the second here; asserted loosely, this is not a timing test).
    assert worked > 0.1, worked


def test_max_pause_must_be_positive() -> None:
    with pytest.raises(ValueError):
        AdminLane(max_pause=0)


# ------------------------------------------------------------------ the real ingest listener


@contextlib.asynccontextmanager
async def ingest(lane: AdminLane, sink: DictSink) -> AsyncIterator[str]:
    server = IngestServer(make_ingest_app(sink, token=TOKEN, lane=lane), shutdown_timeout=1.0)
    port = await server.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.stop()


async def test_a_heartbeat_batch_waits_while_an_admin_request_is_in_flight() -> None:
    sink = DictSink({"acc-1": "online", "acc-2": "online"})
    lane = AdminLane(max_pause=30)
    body = json.dumps({"heartbeats": [hb("acc-1"), hb("acc-2")]}).encode()
    async with ingest(lane, sink) as url, aiohttp.ClientSession() as http:

        async def post() -> int:
            async with http.post(f"{url}/v1/heartbeats", data=body, headers=AUTH) as resp:
                return resp.status

        with lane.admit():
            task = asyncio.create_task(post())
            await asyncio.sleep(0.5)
            assert not task.done()
            assert sink.calls == 0  # nothing applied while the admin request runs
        assert await asyncio.wait_for(task, 5) == 200
        assert [aid for aid, _ in sink.heartbeats] == ["acc-1", "acc-2"]
        # With no admin request in flight the next batch goes straight through.
        pauses = lane.pauses
        assert await asyncio.wait_for(post(), 5) == 200
        assert lane.pauses == pauses


async def test_an_endless_admin_request_delays_a_batch_only_by_max_pause() -> None:
    sink = DictSink({"acc-1": "online"})
    lane = AdminLane(max_pause=0.2)
    body = json.dumps({"heartbeats": [hb("acc-1")]}).encode()
    async with ingest(lane, sink) as url, aiohttp.ClientSession() as http:
        with lane.admit():
            started = time.monotonic()
            async with http.post(f"{url}/v1/heartbeats", data=body, headers=AUTH) as resp:
                assert resp.status == 200
            assert time.monotonic() - started < 3.0
        assert lane.pauses >= 1
        assert len(sink.heartbeats) == 1
