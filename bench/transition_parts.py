"""Where the server's time goes in one grouped transition, with and without an index.

Usage::

    .venv/bin/python -m bench.transition_parts --db mysql          # MariaDB/MySQL
    .venv/bin/python -m bench.transition_parts                     # SQLite

The door commits a mass event as transactions of up to 1,000 accounts, each: the grouped
compare-and-set ``UPDATE wework_accounts … WHERE status = ? AND id IN (…)``, one multi-row
``INSERT`` of the log rows, one multi-row upsert of the ``accountd_supervision`` rows, and the
commit. This times each of the four on one connection, per account, first with
``idx_supervision_next_action_at`` (created by ``platform_0001``, dropped by ``platform_0002``)
and then without it, on the same seeded rows.

Every statement is rendered beforehand as literal SQL text (the values are the seed's UUIDs,
fixed words and timestamps, so quoting them is safe here) and sent with no parameters: what is
timed is the round trip and the server's work, not the driver's escaping, so the figures
isolate what an index costs the server. The daemon binds every value (`accountd.adapters.
batch_sql`); its own figure is `bench.engine`'s mass event.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from accountd.adapters.batch_sql import (
    SUPERVISION_COLUMNS,
    Binds,
    insert_logs,
    upsert_supervision,
)
from accountd.adapters.migrations import supervision_next_action_at_index
from accountd.ids import uuid7
from bench.ceilings import raw_engine
from bench.common import (
    Group,
    add_db_argument,
    bench_databases,
    dump_json,
    print_table,
    seed,
    server_version,
    utcnow,
)

BATCH = 1000
PARTS = ("status UPDATE", "log INSERT", "supervision upsert", "commit")
SETTLE = 3.0


def literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool | int):
        return str(int(value))
    return "'" + str(value) + "'"  # the seed's UUIDs and our own fixed words: no quotes inside


class Literals(Binds):
    """`Binds` that writes each value into the text: the daemon's own statement builders
    (`insert_logs`, `upsert_supervision`) then give the statements with no parameters."""

    def __init__(self) -> None:
        super().__init__("mysql")

    def row(self, values: Iterable[Any]) -> str:
        return "(" + ", ".join(literal(v) for v in values) + ")"


class Rounds:
    """Batches of accounts flipping between online and offline, as literal statements."""

    def __init__(self, ids: Sequence[str], dialect: str) -> None:
        self.dialect = dialect
        self.chunks = [list(ids[i : i + BATCH]) for i in range(0, len(ids) - BATCH + 1, BATCH)]
        self.status = ["online"] * len(self.chunks)
        self._next = itertools.count()

    def next(self) -> tuple[list[str], int]:
        k = next(self._next) % len(self.chunks)
        old = self.status[k]
        new = "offline" if old == "online" else "online"
        self.status[k] = new
        chunk = self.chunks[k]
        now = utcnow().isoformat(" ", "microseconds")
        history = json.dumps([1764786000.123456, 1764786100.5])
        log_ids = [uuid7() for _ in chunk]
        ids = ", ".join(literal(i) for i in chunk)
        update = (
            f"UPDATE wework_accounts SET status = {literal(new)} "
            f"WHERE status = {literal(old)} AND id IN ({ids})"
        )
        logs = [
            (log_id, account_id, old, new, "heartbeat_lost: bench", None, None)
            for log_id, account_id in zip(log_ids, chunk, strict=True)
        ]
        sup = [
            (account_id, new, now, 0, 0, "recover", now, None, history, False, None, log_id, 0, now)
            for log_id, account_id in zip(log_ids, chunk, strict=True)
        ]
        assert len(sup[0]) == len(SUPERVISION_COLUMNS)
        b = Literals()
        return [update, insert_logs(b, logs), upsert_supervision(b, sup, self.dialect)], len(chunk)


async def measure(conn: AsyncConnection, rounds: Rounds, seconds: float) -> dict[str, float]:
    """Seconds per account in each part, over ``seconds`` of back-to-back transactions."""
    spent = dict.fromkeys(PARTS, 0.0)
    accounts = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        statements, n = rounds.next()
        await conn.begin()
        for part, sql in zip(PARTS, statements, strict=False):
            t0 = time.perf_counter()
            result = await conn.exec_driver_sql(sql)
            spent[part] += time.perf_counter() - t0
            if part == "status UPDATE" and result.rowcount != n:
                raise RuntimeError(f"compare-and-set matched {result.rowcount} of {n}")
        t0 = time.perf_counter()
        await conn.commit()
        spent["commit"] += time.perf_counter() - t0
        accounts += n
    return {part: value / accounts for part, value in spent.items()}


async def run(kind: str, rows: int, seconds: float) -> dict[str, Any]:
    async with bench_databases(kind, "accountd_parts") as urls:
        ids = (await seed(urls, [Group("rows", rows, "online")]))["rows"]
        await asyncio.sleep(SETTLE)
        engine = raw_engine(urls["platform"])
        try:
            async with engine.connect() as conn:
                rounds = Rounds(ids, engine.dialect.name)
                index = supervision_next_action_at_index()
                await conn.run_sync(lambda c: index.create(c))
                await conn.commit()
                with_index = await measure(conn, rounds, seconds)
                await conn.run_sync(lambda c: index.drop(c))
                await conn.commit()
                without = await measure(conn, rounds, seconds)
        finally:
            await engine.dispose()
        version = await server_version(urls["platform"])
    return {"db": kind, "server": version, "rows": rows, "with": with_index, "without": without}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.transition_parts", description=__doc__.split("\n")[0]
    )
    add_db_argument(parser)
    parser.add_argument("--rows", type=int, default=300_000, help="accounts in the table")
    parser.add_argument("--seconds", type=float, default=8.0, help="per configuration")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    r = asyncio.run(run(args.db, args.rows, args.seconds))
    print(f"{r['server']}; {args.rows:,} rows; {BATCH:,} accounts per transaction")
    table = []
    for part in PARTS:
        table.append(
            (part, f"{r['with'][part] * 1e6:.1f} µs", f"{r['without'][part] * 1e6:.1f} µs")
        )
    total_with, total_without = sum(r["with"].values()), sum(r["without"].values())
    table.append(
        ("whole transition", f"{total_with * 1e6:.1f} µs", f"{total_without * 1e6:.1f} µs")
    )
    table.append(
        ("  transitions/s on one connection", f"{1 / total_with:,.0f}", f"{1 / total_without:,.0f}")
    )
    print_table(
        ("per account", "with idx_supervision_next_action_at", "without (platform_0002)"), table
    )
    if args.json:
        dump_json(args.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
