"""The daemon's runtime measured from inside: garbage-collector pauses, heartbeat rows written.

A full collection walks every tracked container. With a million accounts (each a slotted object
in two dicts and a heap entry) that took ~0.45 s, a pause of the whole event loop. `Daemon._start`
therefore moves what the load created into the permanent generation (``gc.freeze()``), and
`freeze_after_load` measures one full collection right after it, so the start-up log states the
pause as measured rather than hoped. `GcPauses` then times every collection for as long as the
daemon runs (``gc.callbacks``), exposed as

- ``accountd_gc_pause_seconds{generation}``: histogram of collection pauses;
- ``accountd_gc_pause_max_seconds{generation}``: the longest pause since start.

The callback only does arithmetic on plain attributes: it can fire inside any allocation,
including one made while prometheus_client holds its own (non-reentrant) lock during a scrape,
so it must not call into a metric object. The collector reads the numbers at scrape time.

`LoopLag` times the main event loop from inside: a timer every 0.1 s notes how late it ran,
which is how long a callback waited for its turn (``accountd_event_loop_lag_seconds``). Since
/healthz is served by the side loop (`accountd.daemon.side_loop`), answering no longer proves
that the main loop turns; the time since this timer last ran does.

`MainLoopHolds` says what `accountd.daemon.side_loop.MainLoopHold` cost the main loop: how often
a control-socket read (``show``, ``history``) held it and for how many seconds in all
(``accountd_main_loop_holds_total``, ``accountd_main_loop_held_seconds_total``). By construction
at most a quarter of the wall clock; ``rate()`` of the seconds says how much of it was used.

``accountd_heartbeats_persisted_total`` counts the rows the heartbeat flush wrote to
``last_heartbeat_at``: with ``accountd_heartbeats_received_total`` it shows the coalescing
(received/s far above written/s, written/s bounded by accounts / ``persist_interval``).
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from accountd.daemon.side_loop import MainLoopHold

PAUSE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
GENERATIONS: Final = (0, 1, 2)
LAG_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# The youngest generation's threshold once the accounts are loaded (CPython's default: 700).
YOUNG_THRESHOLD: Final = 100_000


def freeze_after_load() -> tuple[int, float]:
    """Collect, freeze everything alive, raise the young threshold, time one full collection.

    Returns (objects now frozen, seconds the full collection took). The loaded accounts live as
    long as the process, so no future full collection needs to look at them.

    The threshold: a 10,000-heartbeat batch parses into 10,000 dicts that die by reference
    counting once the batch is applied. With a collection every 700 allocations they lived
    through several, were promoted to the oldest generation, and, since the frozen accounts no
    longer count as its size, every few batches triggered a full collection: 180 of them,
    ~50-100 ms each, in three minutes at a million accounts. Collecting every 100,000
    allocations lets that garbage die young; cycles are still found, a little later.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    started = time.perf_counter()
    gc.collect()
    elapsed = time.perf_counter() - started
    # Counted after the clock stops: `get_freeze_count` walks the frozen list, 20-30 ms at a
    # million objects (up to 180 ms measured in the daemon). Evaluated inside the timed
    # expression, it was most of the "full collection" this function reported.
    return gc.get_freeze_count(), elapsed


class GcPauses(Collector):
    """Times every garbage collection; a Prometheus collector of the results."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started = 0.0
        # Per generation: non-cumulative bucket counts (last = +Inf), sum, longest.
        self._buckets = [[0] * (len(PAUSE_BUCKETS) + 1) for _ in GENERATIONS]
        self._sum = [0.0 for _ in GENERATIONS]
        self._max = [0.0 for _ in GENERATIONS]
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._installed = True

    def remove(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._installed = False

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        self.record(info["generation"], self._clock() - self._started)

    def record(self, generation: int, seconds: float) -> None:
        self._buckets[generation][bisect.bisect_left(PAUSE_BUCKETS, seconds)] += 1
        self._sum[generation] += seconds
        if seconds > self._max[generation]:
            self._max[generation] = seconds

    def longest(self, generation: int = 2) -> float:
        return self._max[generation]

    def count(self, generation: int = 2) -> int:
        return sum(self._buckets[generation])

    def collect(self) -> Iterator[Any]:
        hist = HistogramMetricFamily(
            "accountd_gc_pause_seconds",
            "Garbage-collection pauses of the daemon's process, by generation (2 = full).",
            labels=["generation"],
        )
        longest = GaugeMetricFamily(
            "accountd_gc_pause_max_seconds",
            "Longest garbage-collection pause since start, by generation.",
            labels=["generation"],
        )
        for gen in GENERATIONS:
            hist.add_metric(
                [str(gen)], _cumulative(PAUSE_BUCKETS, self._buckets[gen]), self._sum[gen]
            )
            longest.add_metric([str(gen)], self._max[gen])
        yield hist
        yield longest


class LoopLag:
    """Measures the lag of the event loop it is started on (see the module docstring).

    Written by the timer on the main loop, read by /healthz and scrapes on the side loop:
    plain floats and ints, each written by one assignment.
    """

    def __init__(self, interval: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.last_seen = clock()
        self.last = 0.0  # seconds the last tick was late
        self.longest = 0.0
        self._buckets = [0] * (len(LAG_BUCKETS) + 1)
        self._sum = 0.0

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        """Start ticking on the running loop (the main loop)."""
        if self._handle is None:
            self.last_seen = self._clock()
            self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()

    def seen_ago(self) -> float:
        """Seconds since the loop last ran the timer (0 while not started)."""
        return max(0.0, self._clock() - self.last_seen) if self.running else 0.0

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = self._clock() + self.interval
        self._handle = loop.call_later(self.interval, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = self._clock()
        lag = max(0.0, now - self._due)
        self._buckets[bisect.bisect_left(LAG_BUCKETS, lag)] += 1
        self._sum += lag
        self.longest = max(self.longest, lag)
        self.last = lag
        self.last_seen = now
        self._schedule(loop)

    def family(self) -> HistogramMetricFamily:
        hist = HistogramMetricFamily(
            "accountd_event_loop_lag_seconds",
            "How late the main event loop ran a 0.1 s timer: the wait for a turn.",
        )
        hist.add_metric([], _cumulative(LAG_BUCKETS, self._buckets), self._sum)
        return hist


class HeartbeatsPersisted(Collector):
    """``accountd_heartbeats_persisted_total`` read from a counter the flush keeps."""

    def __init__(self, read: Callable[[], int]) -> None:
        self._read = read

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily(
            "accountd_heartbeats_persisted",
            "Rows the heartbeat flush wrote to wework_accounts.last_heartbeat_at.",
            value=self._read(),
        )


class MainLoopHolds(Collector):
    """The main-loop holds of the control socket's reads (module docstring)."""

    def __init__(self, hold: MainLoopHold) -> None:
        self._hold = hold

    def collect(self) -> Iterator[Any]:
        # Two plain attributes the main loop updates under the hold's lock; read without it,
        # one may be one hold ahead of the other.
        yield CounterMetricFamily(
            "accountd_main_loop_holds",
            "Times a control-socket read (show, history) held the main event loop.",
            value=self._hold.holds,
        )
        yield CounterMetricFamily(
            "accountd_main_loop_held_seconds",
            "Seconds the main event loop spent held by control-socket reads.",
            value=self._hold.held_seconds,
        )


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Non-cumulative bucket counts (last = +Inf) as the (le, cumulative count) pairs that
    `HistogramMetricFamily` takes."""
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip((*bounds, float("inf")), list(counts), strict=True):
        total += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return out


def register(registry: CollectorRegistry, *collectors: Collector) -> Callable[[], None]:
    """Register `collectors`; returns the function that unregisters them."""
    for c in collectors:
        registry.register(c)

    def unregister() -> None:
        for c in collectors:
            registry.unregister(c)

    return unregister


__all__ = [
    "YOUNG_THRESHOLD",
    "GcPauses",
    "HeartbeatsPersisted",
    "LoopLag",
    "MainLoopHolds",
    "freeze_after_load",
    "register",
]
