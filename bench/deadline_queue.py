"""The deadline queue at a million accounts, beside a plain binary heap doing the same work.

Usage::

    .venv/bin/python -m bench.deadline_queue                     # 1,000,000 deadlines
    .venv/bin/python -m bench.deadline_queue --accounts 100000

Every online account has one heartbeat check in `accountd.daemon.deadlines.DeadlineQueue`; with
workers beating every 15 s and a 45 s timeout, each check comes due once per 30-45 s and is
re-armed. This replays that: ``--accounts`` deadlines spread over 45 s, then ``--seconds`` of
simulated time in 10 ms steps, each step popping what is due (``pop_due``, rounds of 5,000)
and re-arming every popped account 30-45 s later in one ``set_many``, as `Supervisor._on_due`
does. It prints
CPU µs per pop and re-arm for the daemon's queue and for `HeapQueue` below, the binary heap
with lazy invalidation the daemon used before (one ``heappop`` walks ~2·log2(n) entries of a
list no cache holds at 1M). Both are fed the same random sequence, in alternating rounds.
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

from accountd.daemon.deadlines import DeadlineQueue
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


def replay(queue: DeadlineQueue | HeapQueue, accounts: int, seconds: float) -> tuple[int, float]:
    rng = random.Random(1)
    t0 = 1_800_000_000.0
    ids = [f"{i:08d}-0000-4000-8000-000000000000" for i in range(accounts)]
    for account_id in ids:
        queue.set(account_id, t0 + rng.uniform(0, 45), "heartbeat")
    gc.collect()
    gc.freeze()  # as the daemon does after its load
    now, done = t0, 0
    cpu = time.process_time()
    while now < t0 + seconds:
        now += 0.01
        while True:
            due = queue.pop_due(now, 5000)
            queue.set_many(
                [(account_id, now + rng.uniform(30, 45), kind) for account_id, kind in due]
            )
            done += len(due)
            if len(due) < 5000:
                break
    used = time.process_time() - cpu
    gc.unfreeze()
    return done, used


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.deadline_queue")
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=30.0, help="simulated time")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    m = machine()
    print(f"{m['cpus']} CPUs ({m['cpu']}), Python {m['python']}; {args.accounts:,} deadlines, "
          f"{args.seconds:g} s simulated, {args.rounds} rounds each")  # fmt: skip
    results: dict[str, list[float]] = {"calendar (DeadlineQueue)": [], "binary heap": []}
    count = 0
    for _ in range(args.rounds):
        for name, make in (("calendar (DeadlineQueue)", DeadlineQueue), ("binary heap", HeapQueue)):
            count, used = replay(make(), args.accounts, args.seconds)
            results[name].append(used * 1e6 / count)
            gc.collect()
    rows = [
        [name, f"{count:,}", " / ".join(f"{v:.2f}" for v in values)]
        for name, values in results.items()
    ]
    print_table(["queue", "pops + re-arms", "CPU µs each (per round)"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
