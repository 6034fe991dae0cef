"""The heartbeat flush and the heartbeat poll alone: CPU and wall time per row, beside the ceiling.

Usage::

    .venv/bin/python -m bench.heartbeat_io --db mysql     # MariaDB/MySQL
    .venv/bin/python -m bench.heartbeat_io                # SQLite

At a million accounts the flush writes ``last_heartbeat_at`` for ~25,000 accounts a second and
the poll (which picks up heartbeats other services write) reads the same rows back; both run on
the daemon's event loop, so their CPU per row is taken from what ingest and the door can use.
This seeds ``--accounts`` online accounts, then, ``--rounds`` times each:

- the flush: `AccountRepository.write_heartbeats` of ``--rows`` accounts in slices of 5,000
  (what `Supervisor.flush_heartbeats` hands it), times spread over 30 distinct seconds;
- the poll: every row through `loader.heartbeats_after` in pages of 2,000
  (`supervisor.POLL_PAGE`), keyset by (time, id), as `Supervisor.poll_db_heartbeats` reads;

and prints rows/s and CPU µs per row (this process's CPU: on SQLite that includes the
statements themselves, which run in aiosqlite's thread) beside the batched-UPDATE ceiling of
`bench.ceilings` on the same database.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accountd.adapters.db import make_engine
from accountd.adapters.loader import heartbeats_after
from accountd.adapters.repository import AccountRepository
from accountd.daemon.supervisor import FLUSH_SLICE, POLL_PAGE
from bench import ceilings
from bench.common import (
    Group,
    add_db_argument,
    bench_databases,
    dump_json,
    machine,
    print_table,
    seed,
    server_version,
)

Round = tuple[int, float, float]  # rows, wall seconds, CPU seconds


async def flush_round(repo: AccountRepository, ids: Sequence[str], at: float) -> Round:
    beats = {account_id: at + k % 30 for k, account_id in enumerate(ids)}
    items = list(beats.items())
    wall, cpu = time.perf_counter(), time.process_time()
    rows = 0
    for start in range(0, len(items), FLUSH_SLICE):
        rows += await repo.write_heartbeats(dict(items[start : start + FLUSH_SLICE]))
    return rows, time.perf_counter() - wall, time.process_time() - cpu


async def poll_round(repo: AccountRepository, since: float) -> Round:
    mark, after, rows = dt.datetime.fromtimestamp(since, dt.UTC).replace(tzinfo=None), "", 0
    wall, cpu = time.perf_counter(), time.process_time()
    while True:
        page = await heartbeats_after(repo.engine, mark, after, POLL_PAGE)
        rows += len(page)
        if len(page) < POLL_PAGE:
            break
        after, newest = page[-1]
        mark = dt.datetime.fromtimestamp(newest, dt.UTC).replace(tzinfo=None)
    return rows, time.perf_counter() - wall, time.process_time() - cpu


async def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"args": vars(args), "machine": machine()}
    async with bench_databases(args.db, prefix="accountd_hbio") as urls:
        report["server"] = await server_version(urls["platform"])
        ids = (await seed(urls, [Group("online", args.accounts, "online")]))["online"]
        await ceilings.settle(urls["platform"])
        engine = make_engine(urls["platform"])
        repo = AccountRepository(engine)
        flushes, polls = [], []
        try:
            at = time.time() + 3600  # later than every seeded value: each round writes every row
            for k in range(args.rounds):
                flushes.append(await flush_round(repo, ids[: args.rows], at + 100 * k))
                polls.append(await poll_round(repo, at + 100 * k))
        finally:
            await engine.dispose()
        raw = ceilings.raw_engine(urls["platform"])
        try:
            ceiling = await ceilings.batched_heartbeats(raw, ids, args.ceiling_seconds)
        finally:
            await raw.dispose()
    report.update(flushes=flushes, polls=polls, batched_ceiling_rows_s=ceiling)
    return report


def rows_of(label: str, rounds: Sequence[Round], ceiling: float) -> list[str]:
    rows = sum(r[0] for r in rounds)
    wall = sum(r[1] for r in rounds)
    cpu = sum(r[2] for r in rounds)
    per_round = ", ".join(f"{r[2] * 1e6 / max(1, r[0]):.1f}" for r in rounds)
    return [label, f"{rows / wall:,.0f} rows/s", f"{cpu * 1e6 / rows:.2f} µs ({per_round})",
            f"{ceiling:,.0f} rows/s (batched UPDATE)"]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.heartbeat_io")
    add_db_argument(parser)
    parser.add_argument("--accounts", type=int, default=200_000)
    parser.add_argument("--rows", type=int, default=100_000, help="accounts each flush writes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ceiling-seconds", type=float, default=3.0)
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    m = report["machine"]
    print(
        f"{m['cpus']} CPUs ({m['cpu']}), Python {m['python']}; {report['server']}; "
        f"{args.accounts:,} accounts, {args.rows:,} rows a flush, {args.rounds} rounds"
    )
    ceiling = report["batched_ceiling_rows_s"]
    print_table(
        ["figure", "rows/s (wall)", "CPU per row (each round)", "ceiling (same run)"],
        [
            rows_of("heartbeat flush (write_heartbeats)", report["flushes"], ceiling),
            rows_of("heartbeat poll (heartbeats_after)", report["polls"], ceiling),
        ],
    )
    if args.json:
        dump_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
