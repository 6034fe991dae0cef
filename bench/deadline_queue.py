"""Heartbeat checks at a million accounts: the daemon's `HeartbeatChecks` beside the general
deadline queue and a plain binary heap doing the same work.

Usage::

    .venv/bin/python -m bench.deadline_queue                     # 1,000,000 accounts
    .venv/bin/python -m bench.deadline_queue --accounts 100000

Every online account has one heartbeat check; with workers beating every 15 s and a 45 s
timeout, each comes due once per 30-45 s and is re-armed at its last beat + 45 s (~25,000 a
second at a million accounts). This replays that: ``--accounts`` online accounts beating in a
fixed rotation (not timed), then ``--seconds`` of simulated time in 10 ms steps, each step
taking what is due in rounds of 5,000. It prints CPU µs per check taken for:

* `HeartbeatChecks.sweep` (the daemon since 2026-12-04): each check a time and the account
  in a bucket's parallel lists, checked and re-armed in place;
* `DeadlineQueue` (the daemon before): ``pop_due``, the account looked up by id and checked,
  the re-arms in one ``set_many``, as `Supervisor._on_due` did;
* `HeapQueue` below, the binary heap with lazy invalidation used before the calendar (one
  ``heappop`` walks ~2·log2(n) entries of a list no cache holds at 1M), with the same check.

All three replay the same beats, in alternating rounds. After each replay it times one full
collection: the load is frozen (as the daemon freezes it), so the collection walks what the
re-arms left behind, which is what a full collection costs the daemon in its steady state.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import math
import random
import time
from collections.abc import Sequence

from accountd.daemon.deadlines import DeadlineQueue, HeartbeatChecks
from accountd.statemachine import State
from accountd.statemachine.account import Account
from bench.common import machine, print_table


class HeapQueue:
    """`DeadlineQueue`'s interface over one binary heap (the reference)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, str]] = []
        self._live: dict[str, tuple[float, int, str, str]] = {}
        self._seq = itertools.count()

    def set(self, account_id: str, when: float, kind: str) -> None:
        entry = (when, next(self._seq), account_id, kind)
        self._live[account_id] = entry
        heapq.heappush(self._heap, entry)

    def set_many(self, items: list[tuple[str, float, str]]) -> float:
        for account_id, when, kind in items:
            self.set(account_id, when, kind)
        return min((when for _, when, _ in items), default=math.inf)

    def pop_due(self, now: float, limit: int = 1000) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        heap, live = self._heap, self._live
        while heap and len(out) < limit and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if live.get(entry[2]) is entry:
                del live[entry[2]]
                out.append((entry[2], entry[3]))
        return out


TIMEOUT = 45.0
BEAT_EVERY = 15.0


def replay(kind: str, accounts: int, seconds: float) -> tuple[int, float, float]:
    """Checks taken, CPU seconds, and the seconds of one full collection at the end:
    ``accounts`` online accounts beating every 15 s in a fixed rotation (not timed), their
    heartbeat checks due at last beat + 45 s and re-armed when they come due, in 10 ms steps,
    rounds of 5,000. What was set up before the replay is frozen, as the daemon freezes its
    load, so the collection walks what the re-arms created."""
    rng = random.Random(1)
    t0 = 1_800_000_000.0
    accs = [
        Account(
            id=f"{i:08d}-0000-4000-8000-000000000000",
            tenant_id="t",
            wework_guid=f"{i:032x}",
            status=State.online,
            entered_at=t0 - 3600,
        )
        for i in range(accounts)
    ]
    rng.shuffle(accs)
    registry = {acc.id: acc for acc in accs}
    checks = HeartbeatChecks(TIMEOUT)
    queue: DeadlineQueue | HeapQueue = HeapQueue() if kind == "heap" else DeadlineQueue()
    for p, acc in enumerate(accs):
        # Position p in the rotation beats at t0 + (p / n) * 15 s, then every 15 s. Its check
        # was armed at one of its last three beats, so that checks are spread over 45 s as in
        # a daemon that has run for a while.
        acc.last_heartbeat = t0 - BEAT_EVERY + BEAT_EVERY * p / accounts
        when = acc.last_heartbeat - BEAT_EVERY * rng.randrange(3) + TIMEOUT
        if kind == "checks":
            checks.set(acc, when)
        else:
            queue.set(acc.id, when, "heartbeat")
    gc.collect()
    gc.freeze()  # as the daemon does after its load
    now, done, used, beat = t0, 0, 0.0, 0
    per_step = round(accounts * 0.01 / BEAT_EVERY)
    while now < t0 + seconds:
        now += 0.01
        for _ in range(per_step):  # ingest, not timed
            accs[beat % accounts].last_heartbeat = now
            beat += 1
        cpu = time.process_time()
        while True:
            if kind == "checks":
                expired, taken = checks.sweep(now, 5000)
                assert not expired
            else:
                # What `Supervisor._on_due` did for a heartbeat check before `HeartbeatChecks`.
                due = queue.pop_due(now, 5000)
                rearm = []
                for account_id, what in due:
                    acc = registry[account_id]
                    if acc.status is not State.online:
                        continue
                    last = max(acc.last_heartbeat or 0.0, acc.entered_at)
                    assert last + TIMEOUT > now
                    rearm.append((account_id, last + TIMEOUT, what))
                queue.set_many(rearm)
                taken = len(due)
            done += taken
            if taken < 5000:
                break
        used += time.process_time() - cpu
    started = time.perf_counter()
    gc.collect()
    full = time.perf_counter() - started
    gc.unfreeze()
    return done, used, full


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.deadline_queue")
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=30.0, help="simulated time")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    m = machine()
    print(f"{m['cpus']} CPUs ({m['cpu']}), Python {m['python']}; "
          f"{args.accounts:,} accounts online, {args.seconds:g} s simulated, "
          f"{args.rounds} rounds each")  # fmt: skip
    names = {
        "checks": "HeartbeatChecks (the daemon's)",
        "calendar": "calendar (DeadlineQueue) + the check",
        "heap": "binary heap + the check",
    }
    results: dict[str, list[float]] = {kind: [] for kind in names}
    fulls: dict[str, list[float]] = {kind: [] for kind in names}
    counts: dict[str, int] = {}
    for _ in range(args.rounds):
        for kind in names:
            counts[kind], used, full = replay(kind, args.accounts, args.seconds)
            results[kind].append(used * 1e6 / counts[kind])
            fulls[kind].append(full * 1e3)
            gc.collect()
    rows = [
        [
            names[kind],
            f"{counts[kind]:,}",
            " / ".join(f"{v:.2f}" for v in values),
            " / ".join(f"{v:.1f}" for v in fulls[kind]),
        ]
        for kind, values in results.items()
    ]
    print_table(
        ["heartbeat checks in", "checks taken", "CPU µs each (per round)", "full GC after, ms"],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
