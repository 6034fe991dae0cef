"""The side loop (a second event loop on its own thread) and the main loop's lag timer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time

from prometheus_client import CollectorRegistry

from accountd.daemon.clock import FakeClock
from accountd.daemon.metrics import Metrics
from accountd.daemon.metrics_http import STALLED_AFTER, MetricsServer
from accountd.daemon.runtime_metrics import LoopLag
from accountd.daemon.side_loop import SWITCH_INTERVAL, MainLoopHold, SideLoop, on_main
from tests.test_metrics import get, metrics_settings


async def test_side_loop_runs_work_on_its_own_thread_and_stops_cleanly() -> None:
    before = sys.getswitchinterval()
    side = SideLoop()
    await side.start()
    try:
        assert sys.getswitchinterval() == min(before, SWITCH_INTERVAL)

        async def where() -> str:
            return threading.current_thread().name

        assert await side.run(where()) == "accountd-side"
        assert await side.call(where) == "accountd-side"
        # on_main from the side loop comes back to this (the main) loop's thread.
        main_thread = threading.current_thread().name
        assert await side.run(on_main(asyncio.get_running_loop(), where())) == main_thread
        # An error on the side loop reaches the caller.

        async def boom() -> None:
            raise ValueError("side")

        try:
            await side.run(boom())
        except ValueError as exc:
            assert str(exc) == "side"
        else:
            raise AssertionError("the error was lost")
        # Something left running on the side loop is cancelled by stop().
        left: asyncio.Future[None] = asyncio.Future()

        async def forever() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                asyncio.get_running_loop().call_soon_threadsafe(left.set_result, None)
                raise

        asyncio.run_coroutine_threadsafe(forever(), side.loop)
        await asyncio.sleep(0.05)
    finally:
        await side.stop()
    await asyncio.wait_for(left, 5)
    assert sys.getswitchinterval() == before
    assert not any(t.name == "accountd-side" for t in threading.enumerate())


async def test_cancelling_the_caller_cancels_the_work_on_the_side_loop() -> None:
    side = SideLoop()
    await side.start()
    cancelled = threading.Event()
    try:

        async def slow() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        task = asyncio.ensure_future(side.run(slow()))
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(cancelled.wait, 5)
    finally:
        await side.stop()


class Ticker:
    """Counts the main loop's turns: each turn of its task adds one."""

    def __init__(self) -> None:
        self.turns = 0
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            self.turns += 1
            await asyncio.sleep(0)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def held_turns(hold: MainLoopHold, ticker: Ticker, during: float) -> int:
    """On the side loop: the main loop's turns over ``during`` seconds of a hold, counted from
    when the main loop has surely reached the hold's callback."""
    with hold():
        await asyncio.sleep(0.05)
        before = ticker.turns
        await asyncio.sleep(during)
        return ticker.turns - before


async def test_a_hold_stops_the_main_loop_until_the_request_on_the_side_loop_ends() -> None:
    side = SideLoop()
    await side.start()
    ticker = Ticker()
    try:
        hold = MainLoopHold(asyncio.get_running_loop(), longest=1.0, share=1.0)
        assert await side.run(held_turns(hold, ticker, 0.1)) == 0
        assert hold.holds == 1 and 0.15 <= hold.held_seconds < 1.0
        turns = ticker.turns
        await asyncio.sleep(0.01)
        assert ticker.turns > turns  # going again once the request ended

        # The same from the main loop itself would wait for itself: no hold.
        with hold():
            await asyncio.sleep(0.01)
        assert hold.holds == 1
    finally:
        await ticker.stop()
        await side.stop()


async def test_a_hold_lasts_at_most_longest_and_draws_on_a_credit() -> None:
    side = SideLoop()
    await side.start()
    ticker = Ticker()
    try:
        # A request longer than `longest`: the main loop goes on after `longest`.
        hold = MainLoopHold(asyncio.get_running_loop(), longest=0.1, share=0.0)
        assert await side.run(held_turns(hold, ticker, 0.3)) > 0
        assert hold.holds == 1 and 0.1 <= hold.held_seconds < 0.3
        # The credit is spent and (share 0) never comes back: no more holds.
        assert await side.run(held_turns(hold, ticker, 0.1)) > 0
        assert hold.holds == 1

        # The credit grows back by `share` seconds per second of the (fake) clock.
        now = [0.0]
        hold = MainLoopHold(
            asyncio.get_running_loop(), longest=0.5, share=0.25, clock=lambda: now[0]
        )

        async def spend() -> None:
            with hold():
                await asyncio.sleep(0.05)  # the main loop is in the hold by now
                now[0] += 1.0  # by this clock it waited 1 s, more than its 0.5 s of credit

        await side.run(spend())
        await asyncio.sleep(0.01)
        assert hold.holds == 1 and hold.held_seconds == 1.0
        # Credit 0.5 - 1 + 1 × 0.25 = -0.25: none.
        assert await side.run(held_turns(hold, ticker, 0.05)) > 0
        assert hold.holds == 1
        now[0] += 3.0  # -0.25 + 3 × 0.25 = 0.5 s of credit again
        assert await side.run(held_turns(hold, ticker, 0.01)) == 0
        assert hold.holds == 2
    finally:
        await ticker.stop()
        await side.stop()


async def test_loop_lag_records_how_late_the_timer_ran() -> None:
    lag = LoopLag(interval=0.05)
    assert lag.seen_ago() == 0.0  # not started: no verdict
    lag.start()
    try:
        await asyncio.sleep(0.12)
        time.sleep(0.2)  # hold the loop: the next tick is ~0.2 s late
        await asyncio.sleep(0.12)
        assert lag.longest >= 0.1
        assert lag.seen_ago() < 0.2
        family = lag.family()
        samples = {s.name: s.value for s in family.samples if not s.labels.get("le")}
        assert samples["accountd_event_loop_lag_seconds_count"] >= 3
        assert samples["accountd_event_loop_lag_seconds_sum"] >= 0.1
    finally:
        lag.stop()


async def test_healthz_fails_once_the_main_loop_has_not_turned_for_a_while() -> None:
    now = [1000.0]
    metrics = Metrics(CollectorRegistry(), FakeClock(), metrics_settings())
    metrics.loop_lag = LoopLag(clock=lambda: now[0])
    metrics.loop_lag.start()
    server = MetricsServer(metrics)
    port = await server.start("127.0.0.1", 0)
    try:
        status, _, body = await get(port, "/healthz")
        assert status == 200 and json.loads(body)["alive"] is True
        now[0] += STALLED_AFTER + 1  # the timer did not run meanwhile (the clock is ours)
        status, _, body = await get(port, "/healthz")
        doc = json.loads(body)
        assert status == 503 and doc["alive"] is False
        assert doc["loop_seen_seconds_ago"] >= STALLED_AFTER
    finally:
        metrics.loop_lag.stop()
        await server.stop()
