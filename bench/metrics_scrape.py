"""Scrape latency and body size of ``/metrics`` at 1,000 and 100,000 accounts.

Usage::

    .venv/bin/python -m bench.metrics_scrape                       # SQLite, 1k and 100k accounts
    .venv/bin/python -m bench.metrics_scrape --sizes 1000,100000,300000 --per-tenant
    .venv/bin/python -m bench.metrics_scrape --db mysql            # ACCOUNTD_BENCH_MYSQL_URL

For each size the accounts are bulk-seeded (80 % online, the rest spread over offline, error,
recovering and waiting_qr, in 10 tenants), a real `Supervisor` loads them, the metrics collector is
attached with a fresh registry, and ``/metrics`` is fetched ``--scrapes`` times over loopback HTTP
by an aiohttp client, one request at a time. Printed per size: the time of one background refresh
(the heartbeat-age sample, and the per-tenant walk with ``--per-tenant``), scrape latency p50 /
p99 / max as the client sees it, and the body size. The target (issue 4): a scrape ≤ 100 ms and a
body whose size does not depend on the number of accounts.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from accountd.adapters.db import Databases
from accountd.adapters.repository import AccountRepository
from accountd.adapters.worker import WorkerClient
from accountd.daemon.clock import SystemClock
from accountd.daemon.metrics import Metrics
from accountd.daemon.metrics_http import MetricsServer
from accountd.daemon.policy import PolicyConfig
from accountd.daemon.supervisor import Supervisor
from accountd.settings import MetricsSettings
from bench.common import (
    Group,
    add_db_argument,
    bench_databases,
    machine,
    percentile,
    print_table,
    seed,
)


def groups(n: int) -> list[Group]:
    online = n * 8 // 10
    rest = n - online
    parts = [rest // 4, rest // 4, rest // 4]
    parts.append(rest - sum(parts))
    return [
        Group("online", online, "online"),
        Group("offline", parts[0], "offline"),
        Group("error", parts[1], "error"),
        Group("recovering", parts[2], "recovering"),
        Group("waiting_qr", parts[3], "waiting_qr"),
    ]


async def measure(kind: str, n: int, scrapes: int, per_tenant: bool, freeze: bool) -> list[Any]:
    async with bench_databases(kind, prefix="accountd_bench_metrics") as urls:
        await seed(urls, groups(n))
        dbs = Databases(urls)
        try:
            async with WorkerClient("http://127.0.0.1:9", timeout=1) as worker:
                sup = Supervisor(
                    AccountRepository(dbs.platform),
                    worker,
                    PolicyConfig(),
                    SystemClock(),
                    rng=random.Random(1),
                )
                await sup.load()
                if freeze:
                    gc.freeze()  # what a daemon can do after loading: long-lived objects leave GC
                settings = MetricsSettings(listen="127.0.0.1:0", per_tenant=per_tenant)
                metrics = Metrics(CollectorRegistry(), sup.clock, settings)
                metrics.attach(supervisor=sup)
                started = time.perf_counter()
                await metrics.refresh()
                refresh_ms = (time.perf_counter() - started) * 1000
                server = MetricsServer(metrics)
                port = await server.start("127.0.0.1", 0)
                try:
                    latencies: list[float] = []
                    size = 0
                    # Full collections walk every tracked object (the accounts too): they, not
                    # the scrape, make the occasional slow request, so they are counted.
                    full_gcs = [0]

                    def on_gc(phase: str, info: dict[str, Any]) -> None:
                        if phase == "stop" and info["generation"] == 2:
                            full_gcs[0] += 1

                    gc.callbacks.append(on_gc)
                    url = f"http://127.0.0.1:{port}/metrics"
                    async with aiohttp.ClientSession() as session:
                        for _ in range(scrapes):
                            t0 = time.perf_counter()
                            async with session.get(url) as resp:
                                body = await resp.read()
                            latencies.append((time.perf_counter() - t0) * 1000)
                            size = len(body)
                    gc.callbacks.remove(on_gc)
                finally:
                    await server.stop()
                    if freeze:
                        gc.unfreeze()
        finally:
            await dbs.dispose()
    return [
        f"{n:,}",
        "yes" if per_tenant else "no",
        f"{refresh_ms:.1f}",
        f"{percentile(latencies, 50):.2f}",
        f"{percentile(latencies, 99):.2f}",
        f"{max(latencies):.2f}",
        f"{size:,}",
        str(full_gcs[0]),
    ]


async def run(args: argparse.Namespace) -> list[list[Any]]:
    rows = []
    for n in args.sizes:
        rows.append(await measure(args.db, n, args.scrapes, args.per_tenant, args.gc_freeze))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.metrics_scrape", description=__doc__.split("\n")[0]
    )
    add_db_argument(parser)
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1000, 100_000],
        help="comma-separated account counts (default 1000,100000)",
    )
    parser.add_argument("--scrapes", type=int, default=200, help="scrapes per size (default 200)")
    parser.add_argument(
        "--per-tenant", action="store_true", help="with [metrics] per_tenant = true"
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() after loading the accounts (full collections then skip them)",
    )
    args = parser.parse_args(argv)
    info = machine()
    print(f"machine: {info['cpus']} CPUs, {info['cpu']}, {info['memory']}, Python {info['python']}")
    rows = asyncio.run(run(args))
    print_table(
        [
            "accounts",
            "per tenant",
            "refresh ms",
            "scrape p50 ms",
            "scrape p99 ms",
            "max ms",
            "body bytes",
            "full GCs",
        ],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
