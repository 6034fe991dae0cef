"""The raw database ceilings: the same driver and database as the daemon, no accountd code.

Usage::

    .venv/bin/python -m bench.ceilings                  # SQLite in a temporary directory
    .venv/bin/python -m bench.ceilings --db mysql       # MariaDB/MySQL (ACCOUNTD_BENCH_MYSQL_URL)

The schema comes from our migrations (so indexes, foreign keys and column types are exactly the
daemon's), and the rows are bulk-inserted; from then on every measured statement is plain SQL
text executed through SQLAlchemy core on aiomysql/aiosqlite, with the connection settings the
daemon uses (UTC session time zone on MySQL; WAL and ``synchronous=NORMAL`` on SQLite). The
measuring starts once the server has settled (`settle`). Each figure runs for ``--seconds`` on
one connection unless its name says otherwise:

- naive heartbeats: one ``UPDATE … SET last_heartbeat_at=? WHERE id=?`` per row, each committed;
- batched heartbeats: ``UPDATE … WHERE id IN (…1000 ids…)``, 10 statements per transaction;
- single transitions: per transaction one compare-and-set ``UPDATE … WHERE id=? AND status=?``
  and one ``INSERT`` of a log row (1 connection, then 8 concurrent connections);
- grouped transitions: per transaction of 500 accounts one ``SELECT … FOR UPDATE``, one
  ``UPDATE … WHERE id IN (…) AND status=?`` and one multi-row ``INSERT`` of 500 log rows;
- grouped + supervision: the same plus the multi-row upsert of 500 supervision rows, which the
  engine writes with every transition of a small batch (informational: the target is set
  against the line above);
- grouped + journal: the same as "grouped" plus one ``accountd_supervision_journal`` row holding
  the 500 supervision rows as JSON in the daemon's format (values all rows share written once),
  which is what the engine writes for a large batch (informational).

``bench.engine`` runs this module in a child process at the start of its own run, so its figures
stand beside ceilings measured on the same machine minutes apart.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from accountd.adapters.batch_sql import SUPERVISION_COLUMNS, status_term
from accountd.adapters.db import is_sqlite
from accountd.adapters.repository import journal_document
from bench.common import (
    Group,
    add_db_argument,
    bench_databases,
    dump_json,
    percentile,
    print_table,
    seed,
    server_version,
    utcnow,
)

IN_CHUNK = 1000
HEARTBEAT_STATEMENTS_PER_TXN = 10
GROUP = 500
# The journal's columns, in the order `AccountRepository` writes them.
JOURNAL_COLUMNS = list(SUPERVISION_COLUMNS)
CONCURRENT = 8
# After a large write (the seed; a daemon's run and its final flush) the server goes on working
# for a while: InnoDB writes dirty pages back and purges old row versions. A ceiling measured
# meanwhile is the server's leftovers as much as its speed: 3 s after a 1M-account run the
# grouped ceiling read 4,882/s, where the same machine settled gave 6,600-9,200/s (2026-12-05),
# and the daemon's mass event read 114 % of it. So `settle` waits for that work to end:
# at least SETTLE seconds, then (MariaDB/MySQL) until at most SETTLED_HISTORY undo records wait
# for purge and at most SETTLED_PAGES pages are dirty, or the dirty count has not moved for
# SETTLE_STILL seconds (an idle InnoDB may leave thousands of pages dirty indefinitely: 7,439 for
# minutes after a test run), for at most SETTLE_MAX seconds.
SETTLE = 3.0
SETTLE_MAX = 120.0
SETTLE_STILL = 5.0
SETTLED_PAGES = 1000
SETTLED_HISTORY = 1000
# Even settled, one sample of the grouped ceiling is not the server's speed: 5 s samples read
# 12,514-15,380/s within one 1M-account run, and 11,097-17,127/s back to back on freshly seeded
# servers (2026-12-05, AMD EPYC), so a mass event's ratio to one sample read 65 % in one run and
# 80 % in the next with the daemon at ~10,000/s both times. `bench.scale` takes the median of
# GROUPED_SAMPLES and prints the range.
GROUPED_SAMPLES = 3


async def settle(url: str) -> dict[str, float]:
    """Wait until the server is done with earlier writes (see `SETTLE`); what it waited for:
    seconds, and on MariaDB/MySQL the dirty pages and purge backlog it ended with."""
    started = time.perf_counter()
    await asyncio.sleep(SETTLE)
    if is_sqlite(url):
        return {"settle_s": time.perf_counter() - started}
    engine = raw_engine(url, pool_size=1)
    previous, moved = -1.0, started
    try:
        while True:
            dirty, history = await _innodb_backlog(engine)
            now = time.perf_counter()
            if dirty != previous:
                previous, moved = dirty, now
            waited = now - started
            written_back = dirty <= SETTLED_PAGES or now - moved >= SETTLE_STILL
            quiet = written_back and history <= SETTLED_HISTORY
            if quiet or waited >= SETTLE_MAX:
                return {"settle_s": waited, "dirty_pages": dirty, "purge_backlog": history}
            await asyncio.sleep(0.5)
    finally:
        await engine.dispose()


async def backlog(url: str) -> dict[str, float]:
    """The server's unfinished work right now (MariaDB/MySQL; empty on SQLite): dirty pages
    not yet written back and undo records not yet purged (see `settle`)."""
    if is_sqlite(url):
        return {}
    engine = raw_engine(url, pool_size=1)
    try:
        dirty, history = await _innodb_backlog(engine)
    finally:
        await engine.dispose()
    return {"dirty_pages": dirty, "purge_backlog": history}


async def _innodb_backlog(engine: AsyncEngine) -> tuple[float, float]:
    query = text(
        "SELECT name, count FROM information_schema.INNODB_METRICS "
        "WHERE name IN ('buffer_pool_pages_dirty', 'trx_rseg_history_len')"
    )
    async with engine.connect() as conn:
        found = {name: float(count) for name, count in (await conn.execute(query)).all()}
    return found.get("buffer_pool_pages_dirty", 0.0), found.get("trx_rseg_history_len", 0.0)


def raw_engine(url: str, pool_size: int = CONCURRENT) -> AsyncEngine:
    """An engine configured like the daemon's, built here so no accountd code is involved."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        engine = create_async_engine(u)

        def pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=10000"):
                cur.execute(f"PRAGMA {pragma}")
            cur.close()

        event.listen(engine.sync_engine, "connect", pragmas)
        return engine
    return create_async_engine(
        u,
        pool_size=pool_size,
        max_overflow=0,
        connect_args={
            # The daemon's session (accountd.adapters.db.MYSQL_SESSION): with
            # NO_BACKSLASH_ESCAPES the driver quotes values more cheaply, on both sides.
            "init_command": (
                "SET time_zone = '+00:00', "
                "sql_mode = CONCAT(@@sql_mode, ',STRICT_TRANS_TABLES,NO_BACKSLASH_ESCAPES')"
            ),
            "charset": "utf8mb4",
        },
    )


class LogIds:
    """Time-ordered 36-character log ids (like the daemon's UUIDv7: appends to the index)."""

    def __init__(self) -> None:
        self._n = itertools.count()
        self._prefix = f"{time.time_ns():019d}"

    def next(self) -> str:
        return f"{self._prefix}-{next(self._n):016d}"


class Accounts:
    """The accounts a measurement flips between online and offline, with their status."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.status = dict.fromkeys(ids, "online")
        self._cycle = itertools.cycle(list(ids))

    def take(self, n: int) -> list[str]:
        return [next(self._cycle) for _ in range(n)]

    def flip(self, account_id: str) -> tuple[str, str]:
        old = self.status[account_id]
        new = "offline" if old == "online" else "online"
        self.status[account_id] = new
        return old, new


def _stamp(seq: int) -> dt.datetime:
    # Distinct, increasing values: every UPDATE really changes the row.
    return dt.datetime(2030, 1, 1) + dt.timedelta(seconds=seq)


async def naive_heartbeats(engine: AsyncEngine, ids: Sequence[str], seconds: float) -> float:
    stmt = text("UPDATE wework_accounts SET last_heartbeat_at = :t WHERE id = :id")
    done = 0
    async with engine.connect() as conn:
        start = time.perf_counter()
        end = start + seconds
        for seq, account_id in enumerate(itertools.cycle(ids)):
            await conn.execute(stmt, {"t": _stamp(seq), "id": account_id})
            await conn.commit()
            done += 1
            if done % 100 == 0 and time.perf_counter() >= end:
                break
        return done / (time.perf_counter() - start)


async def batched_heartbeats(engine: AsyncEngine, ids: Sequence[str], seconds: float) -> float:
    stmt = text("UPDATE wework_accounts SET last_heartbeat_at = :t WHERE id IN :ids").bindparams(
        bindparam("ids", expanding=True)
    )
    chunks = [list(ids[i : i + IN_CHUNK]) for i in range(0, len(ids), IN_CHUNK)]
    rows = 0
    seq = 0
    async with engine.connect() as conn:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(HEARTBEAT_STATEMENTS_PER_TXN):
                chunk = chunks[seq % len(chunks)]
                seq += 1
                result = await conn.execute(stmt, {"t": _stamp(seq), "ids": chunk})
                rows += result.rowcount
            await conn.commit()
        return rows / (time.perf_counter() - start)


async def _single_transitions(
    conn: AsyncConnection, accounts: Accounts, logs: LogIds, end: float, latencies: list[float]
) -> int:
    update = text("UPDATE wework_accounts SET status = :new WHERE id = :id AND status = :old")
    insert = text(
        "INSERT INTO account_status_logs (id, account_id, old_status, new_status, change_reason) "
        "VALUES (:id, :account_id, :old, :new, :reason)"
    )
    done = 0
    while time.perf_counter() < end:
        account_id = accounts.take(1)[0]
        old, new = accounts.flip(account_id)
        t0 = time.perf_counter()
        result = await conn.execute(update, {"new": new, "id": account_id, "old": old})
        if result.rowcount != 1:
            raise RuntimeError(f"compare-and-set lost on {account_id}")
        await conn.execute(
            insert,
            {
                "id": logs.next(),
                "account_id": account_id,
                "old": old,
                "new": new,
                "reason": "bench",
            },
        )
        await conn.commit()
        latencies.append(time.perf_counter() - t0)
        done += 1
    return done


async def single_transitions(
    engine: AsyncEngine, ids: Sequence[str], seconds: float, connections: int
) -> tuple[float, list[float]]:
    """Transitions/s with `connections` concurrent connections on disjoint accounts."""
    logs = LogIds()
    slices = [Accounts(ids[i::connections]) for i in range(connections)]
    latencies: list[float] = []

    async def one(accounts: Accounts, end: float) -> int:
        async with engine.connect() as conn:
            return await _single_transitions(conn, accounts, logs, end, latencies)

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(a, start + seconds) for a in slices))
    return sum(counts) / (time.perf_counter() - start), latencies


def _upsert_sql(dialect: str, n: int) -> str:
    cols = (
        "account_id, status, entered_at, attempts, qr_refreshes, next_action, next_action_at, "
        "online_since, offline_history, paused, last_log_id, epoch, updated_at"
    )
    names = [c.strip() for c in cols.split(",")]
    values = ", ".join("(" + ", ".join(f":{c}_{i}" for c in names) + ")" for i in range(n))
    sql = f"INSERT INTO accountd_supervision ({cols}) VALUES {values} "
    rest = [c for c in names if c != "account_id"]
    if dialect == "mysql":
        return sql + "ON DUPLICATE KEY UPDATE " + ", ".join(f"{c} = VALUES({c})" for c in rest)
    return (
        sql
        + "ON CONFLICT (account_id) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in rest)
    )


async def grouped_transitions(
    engine: AsyncEngine,
    ids: Sequence[str],
    seconds: float,
    *,
    supervision: bool,
    journal: bool = False,
) -> float:
    """Set-based transitions, 500 accounts per transaction, all going the same way."""
    lock_sql = "SELECT id, status FROM wework_accounts WHERE id IN :ids"
    if engine.dialect.name == "mysql":
        lock_sql += " FOR UPDATE"
    lock = text(lock_sql).bindparams(bindparam("ids", expanding=True))
    # The term on status as the daemon writes it (`status_term`): on SQLite, without it the
    # planner read idx_status (every account online) instead of the ids' primary keys.
    status_col = status_term(engine.dialect.name)
    update = text(
        f"UPDATE wework_accounts SET status = :new WHERE id IN :ids AND {status_col} = :old"
    ).bindparams(bindparam("ids", expanding=True))
    values = ", ".join(f"(:id_{i}, :a_{i}, :old, :new, 'bench')" for i in range(GROUP))
    insert = text(
        "INSERT INTO account_status_logs (id, account_id, old_status, new_status, change_reason) "
        f"VALUES {values}"
    )
    upsert = text(_upsert_sql(engine.dialect.name, GROUP))
    journal_insert = text(
        "INSERT INTO accountd_supervision_journal (row_count, entries, created_at) "
        "VALUES (:n, :entries, :now)"
    )
    logs = LogIds()
    chunks = [list(ids[i : i + GROUP]) for i in range(0, len(ids) - GROUP + 1, GROUP)]
    status = ["online"] * len(chunks)
    done = 0
    async with engine.connect() as conn:
        start = time.perf_counter()
        for n in itertools.count():
            if time.perf_counter() - start >= seconds:
                break
            k = n % len(chunks)
            chunk = chunks[k]
            old = status[k]
            new = "offline" if old == "online" else "online"
            found = (await conn.execute(lock, {"ids": chunk})).all()
            if any(r[1] != old for r in found):
                raise RuntimeError("unexpected status in the ceiling table")
            result = await conn.execute(update, {"ids": chunk, "old": old, "new": new})
            if result.rowcount != len(chunk):
                raise RuntimeError(f"grouped compare-and-set matched {result.rowcount}")
            params: dict[str, Any] = {"old": old, "new": new}
            log_ids = [logs.next() for _ in chunk]
            for i, account_id in enumerate(chunk):
                params[f"id_{i}"] = log_ids[i]
                params[f"a_{i}"] = account_id
            await conn.execute(insert, params)
            if supervision:
                now = utcnow()
                sup: dict[str, Any] = {}
                for i, account_id in enumerate(chunk):
                    sup |= {
                        f"account_id_{i}": account_id,
                        f"status_{i}": new,
                        f"entered_at_{i}": now,
                        f"attempts_{i}": 0,
                        f"qr_refreshes_{i}": 0,
                        f"next_action_{i}": "recover",
                        f"next_action_at_{i}": now,
                        f"online_since_{i}": None,
                        f"offline_history_{i}": "[]",
                        f"paused_{i}": False,
                        f"last_log_id_{i}": log_ids[i],
                        f"epoch_{i}": 0,
                        f"updated_at_{i}": now,
                    }
                await conn.execute(upsert, sup)
            if journal:
                # As a mass event's: one time entered, a backoff deadline of each account's own
                # (full jitter), the rest shared; in the daemon's format (`journal_document`).
                now = utcnow()
                when = now.isoformat(" ", "microseconds")
                shared = (1, 0, "recover")
                rows = [
                    (a, new, when, *shared, jittered(now, i), None, "[]", False, None, lid, 0, when)
                    for i, (a, lid) in enumerate(zip(chunk, log_ids, strict=True))
                ]
                entries = journal_document(JOURNAL_COLUMNS, rows)
                await conn.execute(
                    journal_insert, {"n": len(rows), "entries": entries, "now": utcnow()}
                )
            await conn.commit()
            status[k] = new
            done += len(chunk)
        return done / (time.perf_counter() - start)


def jittered(now: dt.datetime, i: int) -> str:
    return (now + dt.timedelta(microseconds=7919 * i)).isoformat(" ", "microseconds")


async def _all_online(engine: AsyncEngine) -> None:
    # Each transition figure starts from every account online (the previous one flipped some).
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE wework_accounts SET status = 'online'"))


async def measure(
    urls: dict[str, str], ids: Sequence[str], seconds: float, grouped_samples: int = 1
) -> dict[str, float]:
    """Every ceiling on the platform database; ids are online accounts to work on.

    ``grouped_samples``: the grouped ceiling (the mass event's denominator) is measured that
    many times, each for ``seconds``; ``grouped_transitions_s`` is their median, and
    ``grouped_transitions_lo_s`` / ``_hi_s`` the lowest and highest (see `GROUPED_SAMPLES`).
    """
    engine = raw_engine(urls["platform"])
    try:
        out: dict[str, float] = {}
        out["naive_heartbeats_rows_s"] = await naive_heartbeats(engine, ids, seconds)
        out["batched_heartbeats_rows_s"] = await batched_heartbeats(engine, ids, seconds)
        rate, lat = await single_transitions(engine, ids, seconds, 1)
        out["single_transitions_s"] = rate
        out["commit_latency_p50_ms"] = percentile(lat, 50) * 1000
        out["commit_latency_p99_ms"] = percentile(lat, 99) * 1000
        await _all_online(engine)
        rate, _ = await single_transitions(engine, ids, seconds, CONCURRENT)
        out["single_transitions_8conn_s"] = rate
        samples = []
        for _ in range(max(1, grouped_samples)):
            await _all_online(engine)
            samples.append(await grouped_transitions(engine, ids, seconds, supervision=False))
        out["grouped_transitions_s"] = statistics.median(samples)
        out["grouped_transitions_lo_s"] = min(samples)
        out["grouped_transitions_hi_s"] = max(samples)
        out["grouped_samples"] = len(samples)
        await _all_online(engine)
        out["grouped_transitions_supervision_s"] = await grouped_transitions(
            engine, ids, seconds, supervision=True
        )
        await _all_online(engine)
        out["grouped_transitions_journal_s"] = await grouped_transitions(
            engine, ids, seconds, supervision=False, journal=True
        )
        return out
    finally:
        await engine.dispose()


LABELS = {
    "naive_heartbeats_rows_s": ("naive heartbeats, 1 UPDATE + commit per row", "rows/s"),
    "batched_heartbeats_rows_s": ("batched heartbeats, UPDATE … IN (1000 ids)", "rows/s"),
    "single_transitions_s": ("1 transition per transaction, 1 connection", "transitions/s"),
    "single_transitions_8conn_s": ("1 transition per transaction, 8 connections", "transitions/s"),
    "grouped_transitions_s": ("grouped transitions, 500 per transaction", "transitions/s"),
    "grouped_transitions_supervision_s": (
        "grouped transitions + supervision upsert, 500 per txn",
        "transitions/s",
    ),
    "grouped_transitions_journal_s": (
        "grouped transitions + one supervision journal row, 500 per txn",
        "transitions/s",
    ),
    "commit_latency_p50_ms": ("1-transition transaction latency p50", "ms"),
    "commit_latency_p99_ms": ("1-transition transaction latency p99", "ms"),
}


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


async def run(kind: str, rows: int, seconds: float) -> dict[str, Any]:
    async with bench_databases(kind, "accountd_ceil") as urls:
        t0 = time.perf_counter()
        ids = (await seed(urls, [Group("rows", rows, "online")]))["rows"]
        seeded = time.perf_counter() - t0
        await settle(urls["platform"])
        figures = await measure(urls, ids, seconds)
        version = await server_version(urls["platform"])
    return {"db": kind, "server": version, "rows": rows, "seed_seconds": seeded, **figures}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ceilings", description=__doc__.split("\n")[0]
    )
    add_db_argument(parser)
    parser.add_argument("--rows", type=int, default=20_000, help="accounts in the table")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each figure")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.db, args.rows, args.seconds))
    print(f"{result['server']}; {args.rows:,} rows (seeded in {result['seed_seconds']:.1f}s)")
    print_table(
        ("ceiling", "value", "unit"),
        [(label, fmt(result[key]), unit) for key, (label, unit) in LABELS.items()],
    )
    if args.json:
        dump_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
