"""The engine benchmark: the real daemon, real HTTP from separate client processes, a real database.

Usage::

    .venv/bin/python -m bench.engine --accounts 100000              # SQLite, temporary directory
    .venv/bin/python -m bench.engine --db mysql --accounts 100000   # MariaDB/MySQL
    .venv/bin/python -m bench.engine --db mysql --accounts 200000 --mass 100000 \\
        --heartbeat-timeout 10                                      # issue 5: mass event

One run, in order:

1. the raw ceilings (`bench.ceilings`) in a child process, on their own databases of the same
   size, so every figure below stands beside a ceiling measured minutes earlier;
2. seeding (child process, so its garbage does not count as the daemon's memory): N accounts
   with supervision rows: most ``online``, 10,000 (``--mass``), 1,000 (``--stagger``) and 1,000
   (``--during``) in ``verifying``;
3. `Daemon.run` in this process (as ``accountd run`` does): time to ready and RSS growth per
   account. The online accounts are held by the start-up grace (600 s) for the whole run;
4. heartbeat ingest: ``--clients`` processes flood ``POST /v1/heartbeats`` with 10,000-item
   batches over all N accounts for ``--duration`` seconds; accepted heartbeats/s (counted by the
   daemon) and the rows/s the coalesced flush wrote meanwhile;
5. mass heartbeat loss: the ``--mass`` ``verifying`` accounts are brought online over HTTP
   (from a child process), beaten once more (all 10,000-item batches at once) and then never
   again; from their first deadline (last heartbeat + ``heartbeat.timeout``) to the last
   ``heartbeat_lost`` commit → transitions/s. Meanwhile ``--during`` other accounts stop
   beating one after another over about the time the mass takes: for those whose deadline
   falls inside the mass event, the delay from deadline to commit (target: ≤ 1 s);
6. staleness: 1,000 accounts brought online whose heartbeats stop one after another over 4 s,
   while a background client keeps ``--background-rate`` heartbeats/s flowing; for each, the
   delay from its deadline to the commit of its ``heartbeat_lost`` (a transition hook notes the
   time right after the transaction committed).

Prints one Markdown table: figure | ours | ceiling | ratio | target | result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import logging
import pstats
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from accountd.adapters.repository import Outcome, TransitionRequest
from accountd.daemon.app import Daemon
from accountd.daemon.supervisor import MASS_SLICE, Supervisor, TransitionEvent
from accountd.settings import Settings
from accountd.statemachine import State, Trigger
from bench import ceilings
from bench.common import (
    Group,
    add_db_argument,
    bench_databases,
    dump_json,
    machine,
    percentile,
    print_table,
    rss_bytes,
    seed,
    server_version,
)

log = logging.getLogger("bench.engine")

HEARTBEAT_TIMEOUT = 2.0  # the default of --heartbeat-timeout
GRACE = 600.0  # holds the bulk of the online accounts for the whole run
FAR = 600  # deadlines and recovery backoff that must not fire during the run


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_settings(
    state_dir: Path,
    urls: Mapping[str, str],
    port: int,
    token: str,
    timeout: float = HEARTBEAT_TIMEOUT,
) -> Settings:
    return Settings.model_validate(
        {
            "state_dir": state_dir,
            "databases": dict(urls),
            "ingest": {"listen": f"127.0.0.1:{port}", "token": token},
            # Nothing in the run calls the worker (no account starts, recovers or fails).
            "worker": {"url": f"http://127.0.0.1:{free_port()}", "timeout": 1},
            "heartbeat": {
                "timeout": timeout,
                "persist_interval": 1.5,
                "flush_interval": 1,
                "db_poll_interval": 5,
                "startup_grace": GRACE,
            },
            "deadlines": {
                "initializing": FAR,
                "waiting_qr": FAR,
                "waiting_confirm": FAR,
                "verifying": FAR,
                "recovering": FAR,
            },
            "recovery": {"base": FAR, "cap": FAR, "error_retry_after": 0},
            "supervisor": {"poll_interval": 5},
        }
    )


# ---------------------------------------------------------------- child processes


def _ceilings_child(kind: str, rows: int, seconds: float) -> dict[str, Any]:
    return asyncio.run(ceilings.run(kind, rows, seconds))


def _seed_child(urls: dict[str, str], groups: list[Group]) -> dict[str, list[str]]:
    return asyncio.run(seed(urls, groups))


async def in_child(fn: Any, *args: Any) -> Any:
    """Run `fn` in a fresh spawned process (its memory never touches ours)."""
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return await loop.run_in_executor(pool, fn, *args)


@dataclass
class Client:
    proc: asyncio.subprocess.Process
    name: str

    async def result(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        out, _ = await self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(f"client {self.name} exited with {self.proc.returncode}")
        reply: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return reply


async def spawn_client(mode: str, url: str, token: str, ids: Path, *extra: str) -> Client:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.client",
        mode,
        "--url",
        url,
        # One argument: a random token may begin with "-", which argparse takes for an option.
        f"--token={token}",
        "--ids",
        str(ids),
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    return Client(proc, f"{mode}:{ids.name}")


async def wait_ready(client: Client) -> None:
    assert client.proc.stdout is not None
    line = await asyncio.wait_for(client.proc.stdout.readline(), 120)
    if line.strip() != b"ready":
        raise RuntimeError(f"client {client.name} said {line!r}")


# ---------------------------------------------------------------- the run


@dataclass
class Observed:
    """What the hooks inside the daemon saw."""

    lost: dict[str, tuple[float, float]] = field(default_factory=dict)  # id → (committed, last)
    flushes: list[tuple[int, int, float, float]] = field(default_factory=list)
    # (requests, started, seconds) of every apply_transitions call (one transaction each).
    batches: list[tuple[int, float, float]] = field(default_factory=list)


def instrument(sup: Supervisor, seen: Observed) -> None:
    def on_transition(event: TransitionEvent) -> None:
        # Called right after the transaction committed: the commit time of this change.
        if event.trigger is Trigger.heartbeat_lost:
            seen.lost[event.account.id] = (time.time(), event.account.last_heartbeat or 0.0)

    sup.listeners.append(on_transition)
    write = sup.repo.write_heartbeats

    async def timed(beats: Mapping[str, float]) -> int:
        t0 = time.perf_counter()
        rows = await write(beats)
        seen.flushes.append((len(beats), rows, t0, time.perf_counter() - t0))
        return rows

    sup.repo.write_heartbeats = timed  # type: ignore[method-assign]
    apply = sup.repo.apply_transitions

    async def timed_apply(
        requests: Sequence[TransitionRequest], *, journal: bool = False
    ) -> list[Outcome]:
        t0 = time.perf_counter()
        outcomes = await apply(requests, journal=journal)
        seen.batches.append((len(requests), t0, time.perf_counter() - t0))
        return outcomes

    sup.repo.apply_transitions = timed_apply  # type: ignore[method-assign]


async def until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


async def phase_ingest(
    sup: Supervisor,
    seen: Observed,
    url: str,
    token: str,
    files: list[Path],
    args: argparse.Namespace,
) -> dict[str, float]:
    clients = [
        await spawn_client(
            "flood", url, token, f, "--duration", str(args.duration), "--concurrency", "4"
        )
        for f in files
    ]
    for c in clients:
        await wait_ready(c)
    received0 = sup.heartbeats_received
    flushes0 = len(seen.flushes)
    t0 = time.perf_counter()
    for c in clients:
        assert c.proc.stdin is not None
        c.proc.stdin.write(b"go\n")
        await c.proc.stdin.drain()
    results = [await c.result() for c in clients]
    wall = time.perf_counter() - t0
    received = sup.heartbeats_received - received0
    await asyncio.sleep(2.5)  # let the last coalesced heartbeats reach the database
    flushes = seen.flushes[flushes0:]
    in_window = [f for f in flushes if f[2] - t0 < wall]
    rows_window = sum(f[1] for f in in_window)
    db_seconds = sum(f[3] for f in flushes)
    return {
        "heartbeats_s": received / wall,
        "client_applied_s": sum(r["applied"] for r in results) / max(r["seconds"] for r in results),
        "errors": float(sum(r["errors"] for r in results)),
        "flush_rows_s_wall": rows_window / wall,
        "flush_rows_s_db": sum(f[1] for f in flushes) / db_seconds if db_seconds else 0.0,
        "flushes": float(len(flushes)),
        "flush_max_s": max((f[3] for f in flushes), default=0.0),
    }


def _mass_child(url: str, token: str, ids: list[str], batch: int) -> dict[str, Any]:
    return asyncio.run(drive_mass(url, token, ids, batch))


async def drive_mass(url: str, token: str, ids: list[str], batch: int) -> dict[str, Any]:
    """The worker side of the mass event (in a child process): bring the accounts online,
    then their last heartbeats, all batches at once (ingest takes at most 10,000 per request),
    then silence."""
    import aiohttp

    from bench.client import Poster, bring_online, chunks, heartbeat_body

    connector = aiohttp.TCPConnector(limit=16)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        p = Poster(session, url, token)
        online = await bring_online(p, ids, 2000, batch)
        bodies = [heartbeat_body(c) for c in chunks(ids, batch)]
        replies = await asyncio.gather(*(p.post("/v1/heartbeats", b) for b in bodies))
    return {"online": online, "last_beat_applied": sum(int(r["applied"]) for r in replies)}


async def phase_mass(
    sup: Supervisor,
    seen: Observed,
    url: str,
    token: str,
    ids: list[str],
    during_file: Path,
    during: list[str],
    window: float,
    timeout: float,
) -> dict[str, float]:
    """Mass heartbeat loss, and meanwhile ``during`` accounts whose deadlines fall inside it.

    Once every mass account is online, a stagger client brings the ``during`` accounts online
    and stops their heartbeats one after another over ``window`` seconds (about the time the
    mass event takes to commit), so their deadlines fall while the mass is being committed.
    """
    online0 = sup.counts[State.online]
    driver = asyncio.ensure_future(in_child(_mass_child, url, token, ids, 10_000))
    stagger: Client | None = None
    try:
        await until(
            lambda: sup.counts[State.online] >= online0 + len(ids) or driver.done(),
            600,
            "mass accounts online",
        )
        if during:
            stagger = await spawn_client(
                "stagger", url, token, during_file, "--window", f"{window:.2f}"
            )
        result = await driver
    finally:
        if not driver.done():
            driver.cancel()
    if result["online"] != len(ids) or result["last_beat_applied"] != len(ids):
        raise RuntimeError(f"mass: not every account came online: {result}")
    if stagger is not None:
        staggered = await stagger.result()
        if staggered["online"] != len(during):
            raise RuntimeError(f"during: not every account came online: {staggered}")
    wanted = set(ids) | set(during)
    await until(lambda: seen.lost.keys() >= wanted, 600, "mass heartbeat loss committed")
    beats = [sup.accounts[i].last_heartbeat or 0.0 for i in ids]
    first_deadline = min(beats) + timeout
    commits = [seen.lost[i][0] for i in ids]
    early = sum(1 for c in commits if c < first_deadline)
    if early:
        # Bringing many accounts online over HTTP took longer than the heartbeat timeout.
        raise RuntimeError(
            f"{early} mass accounts went offline before the mass event; "
            "use a larger --heartbeat-timeout"
        )
    done = max(commits)
    start = time.perf_counter() - (time.time() - first_deadline)
    batches = [b for b in seen.batches if b[1] >= start]
    # The other accounts: deadline (their last heartbeat + timeout) inside the mass event. The
    # stagger starts while the mass is still sending its last beats, so its first accounts may
    # stop in the very instant the mass does: the daemon sees one mass event then (same
    # `MASS_SLICE`) and decides them with it. Those are reported apart, not as "others".
    others: list[float] = []
    with_mass: list[float] = []
    lo, hi = min(beats) - MASS_SLICE, max(beats) + MASS_SLICE
    for i in during:
        committed, last = seen.lost[i]
        deadline = last + timeout
        if first_deadline <= deadline <= done:
            (with_mass if lo <= last <= hi else others).append(committed - deadline)
    return {
        "accounts": float(len(ids)),
        "last_beat_spread_s": max(beats) - min(beats),
        "first_commit_after_deadline_s": min(commits) - first_deadline,
        "all_committed_after_deadline_s": done - first_deadline,
        # From the earliest deadline: the conservative reading when the last beats spread.
        "transitions_s": len(ids) / (done - first_deadline),
        "batches": float(len(batches)),
        "batch_mean": sum(b[0] for b in batches) / max(1, len(batches)),
        "batch_seconds_sum": sum(b[2] for b in batches),
        "others": float(len(others)),
        "others_p50_s": percentile(others, 50),
        "others_p99_s": percentile(others, 99),
        "others_max_s": max(others, default=float("nan")),
        "with_mass": float(len(with_mass)),
        "with_mass_max_s": max(with_mass, default=float("nan")),
    }


async def phase_stagger(
    sup: Supervisor,
    seen: Observed,
    url: str,
    token: str,
    ids_file: Path,
    ids: list[str],
    bulk_file: Path,
    args: argparse.Namespace,
) -> dict[str, float]:
    window = 4.0
    background = None
    if args.background_rate > 0:
        background = await spawn_client(
            "flood",
            url,
            token,
            bulk_file,
            "--duration",
            str(window + args.heartbeat_timeout + 4),
            "--rate",
            str(args.background_rate),
            "--concurrency",
            "2",
        )
        await wait_ready(background)
        assert background.proc.stdin is not None
        background.proc.stdin.write(b"go\n")
        await background.proc.stdin.drain()
    received0 = sup.heartbeats_received
    t0 = time.perf_counter()
    client = await spawn_client("stagger", url, token, ids_file, "--window", str(window))
    result = await client.result()
    if result["online"] != len(ids):
        raise RuntimeError(f"stagger: not every account came online: {result}")
    wanted = set(ids)
    await until(lambda: seen.lost.keys() >= wanted, 60, "staggered losses committed")
    background_rate = 0.0
    if background is not None:
        await background.result()
        background_rate = (sup.heartbeats_received - received0) / (time.perf_counter() - t0)
    delays = [seen.lost[i][0] - (seen.lost[i][1] + args.heartbeat_timeout) for i in ids]
    return {
        "accounts": float(len(ids)),
        "p50_s": percentile(delays, 50),
        "p99_s": percentile(delays, 99),
        "max_s": max(delays),
        "min_s": min(delays),
        "background_heartbeats_s": background_rate,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"args": vars(args), "machine": machine()}
    print(f"ceilings ({args.db}, {args.accounts:,} rows) …", flush=True)
    report["ceilings"] = await in_child(
        _ceilings_child, args.db, args.accounts, args.ceiling_seconds
    )
    async with bench_databases(args.db) as urls:
        report["server"] = await server_version(urls["platform"])
        bulk_n = args.accounts - args.mass - args.stagger - args.during
        if bulk_n < 0:
            raise SystemExit("--accounts must be at least --mass + --stagger + --during")
        groups = [
            Group("bulk", bulk_n, "online"),
            Group("mass", args.mass, "verifying"),
            Group("stagger", args.stagger, "verifying"),
            Group("during", args.during, "verifying"),
        ]
        print(f"seeding {args.accounts:,} accounts …", flush=True)
        t0 = time.perf_counter()
        ids: dict[str, list[str]] = await in_child(_seed_child, urls, groups)
        report["seed_seconds"] = time.perf_counter() - t0
        await asyncio.sleep(ceilings.SETTLE)
        with tempfile.TemporaryDirectory(prefix="accountd_bench_") as tmp:
            work = Path(tmp)
            everyone = ids["bulk"] + ids["mass"] + ids["stagger"] + ids["during"]
            per_client = [everyone[k :: args.clients] for k in range(args.clients)]
            flood_files = []
            for k, part in enumerate(per_client):
                f = work / f"flood{k}.txt"
                f.write_text("\n".join(part))
                flood_files.append(f)
            for name in ("bulk", "mass", "stagger", "during"):
                (work / f"{name}.txt").write_text("\n".join(ids[name]))
            grouped = float(report["ceilings"]["grouped_transitions_s"])
            report.update(await run_daemon(args, urls, work, ids, flood_files, grouped))
    return report


async def run_daemon(
    args: argparse.Namespace,
    urls: dict[str, str],
    work: Path,
    ids: dict[str, list[str]],
    flood_files: list[Path],
    grouped_ceiling: float,
) -> dict[str, Any]:
    token = secrets.token_urlsafe(24)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    seen = Observed()
    ready = asyncio.Event()

    async def on_ready(d: Daemon) -> None:
        assert d.supervisor is not None
        instrument(d.supervisor, seen)
        ready.set()

    settings = bench_settings(work, urls, port, token, args.heartbeat_timeout)
    daemon = Daemon(settings, on_ready=on_ready)
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    task = asyncio.create_task(daemon.run(), name="bench-daemon")
    out: dict[str, Any] = {}
    try:
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.is_set():
            waiter.cancel()
            raise RuntimeError(f"daemon exited before ready: {task.result()}")
        ready_s = time.perf_counter() - t0
        gc.collect()
        rss1 = rss_bytes()
        sup = daemon.supervisor
        assert sup is not None
        out["load"] = {
            "accounts": len(sup.accounts),
            "ready_seconds": ready_s,
            "rss_before": rss0,
            "rss_after": rss1,
            "bytes_per_account": (rss1 - rss0) / max(1, len(sup.accounts)),
        }
        print(f"ready in {ready_s:.1f}s; heartbeat ingest for {args.duration:g}s …", flush=True)
        with profiled(args, "ingest"):
            out["ingest"] = await phase_ingest(sup, seen, url, token, flood_files, args)
        print("mass heartbeat loss …", flush=True)
        # The "during" accounts drop over about as long as the mass takes at the ceiling's pace.
        window = max(2.0, args.mass / grouped_ceiling)
        with profiled(args, "mass"):
            out["mass"] = await phase_mass(
                sup,
                seen,
                url,
                token,
                ids["mass"],
                work / "during.txt",
                ids["during"],
                window,
                args.heartbeat_timeout,
            )
        print("staleness latency …", flush=True)
        with profiled(args, "stale"):
            out["stale"] = await phase_stagger(
                sup, seen, url, token, work / "stagger.txt", ids["stagger"], work / "bulk.txt", args
            )
    finally:
        daemon.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 60)
    return out


@contextlib.contextmanager
def profiled(args: argparse.Namespace, phase: str) -> Any:
    """cProfile of this process (the daemon) during one phase, with ``--profile PHASE``."""
    if args.profile != phase:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        stats = pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime")
        print(f"\n--- profile of the daemon during {phase} (by own time) ---", file=sys.stderr)
        stats.print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)


# ---------------------------------------------------------------- the table


def n(value: float) -> str:
    return f"{value:,.0f}"


def table(r: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    c, load, ing, mass, st = r["ceilings"], r["load"], r["ingest"], r["mass"], r["stale"]
    batched = c["batched_heartbeats_rows_s"]
    grouped = c["grouped_transitions_s"]
    hb = ing["heartbeats_s"]
    ok_hb = hb >= 100_000 and hb >= 2 * batched
    mass_ratio = mass["transitions_s"] / grouped
    # Issue 5 asks 70 % for 100,000 accounts at once; issue 3 asked 60 % for 10,000.
    mass_target = 0.7 if mass["accounts"] >= 100_000 else 0.6
    others_max = mass["others_max_s"]
    header = ["figure", "ours", "ceiling (same run)", "ratio", "target", "result"]
    rows = [
        [
            "accounts supervised in one process",
            n(load["accounts"]),
            "—",
            "—",
            "100,000",
            "pass" if load["accounts"] >= 100_000 else "fail",
        ],
        [
            "start-up to ready (load all accounts)",
            f"{load['ready_seconds']:.1f} s",
            "—",
            "—",
            "—",
            "—",
        ],
        [
            "memory per account (RSS growth / accounts)",
            f"{load['bytes_per_account']:,.0f} B",
            "—",
            "—",
            "printed",
            "—",
        ],
        [
            "heartbeat ingest over HTTP",
            f"{n(hb)}/s",
            f"{n(batched)} rows/s (batched UPDATE)",
            f"{hb / batched:.2f}×",
            "≥ 100,000/s and ≥ 2× ceiling",
            "pass" if ok_hb else "fail",
        ],
        [
            "  its coalesced flush to last_heartbeat_at",
            f"{n(ing['flush_rows_s_wall'])} rows/s",
            f"{n(batched)} rows/s",
            f"{ing['flush_rows_s_wall'] / batched:.2f}×",
            "—",
            "—",
        ],
        [
            f"{n(mass['accounts'])} accounts lose heartbeats at once",
            f"{n(mass['transitions_s'])} transitions/s",
            f"{n(grouped)}/s (grouped, 500/txn)",
            f"{mass_ratio:.0%}",
            f"≥ {mass_target:.0%} of ceiling",
            "pass" if mass_ratio >= mass_target else "fail",
        ],
        [
            "  the same with the supervision upsert in the ceiling",
            f"{n(mass['transitions_s'])} transitions/s",
            f"{n(c['grouped_transitions_supervision_s'])}/s",
            f"{mass['transitions_s'] / c['grouped_transitions_supervision_s']:.0%}",
            "—",
            "—",
        ],
        [
            f"  meanwhile, {mass['others']:.0f} other accounts' detection delay, p50 / p99 / max",
            f"{mass['others_p50_s'] * 1000:,.0f} / {mass['others_p99_s'] * 1000:,.0f} / "
            f"{others_max * 1000:,.0f} ms",
            "—",
            "—",
            "max ≤ 1 s after their deadline",
            "pass" if mass["others"] > 0 and others_max <= 1.0 else "fail",
        ],
        [
            "staleness: deadline → heartbeat_lost committed, p50 / p99 / max",
            f"{st['p50_s'] * 1000:,.0f} / {st['p99_s'] * 1000:,.0f} / {st['max_s'] * 1000:,.0f} ms",
            f"{c['commit_latency_p50_ms']:.1f} / {c['commit_latency_p99_ms']:.1f} ms (1 txn)",
            "—",
            "p99 ≤ 1 s after the timeout",
            "pass" if st["p99_s"] <= 1.0 else "fail",
        ],
    ]
    return header, rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine", description=__doc__.split("\n")[0]
    )
    add_db_argument(parser)
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument(
        "--mass", type=int, default=10_000, help="accounts losing heartbeats at once"
    )
    parser.add_argument(
        "--stagger", type=int, default=1_000, help="accounts for the staleness figure"
    )
    parser.add_argument(
        "--during",
        type=int,
        default=1_000,
        help="accounts whose heartbeats stop one by one while the mass event is committed",
    )
    parser.add_argument("--clients", type=int, default=1, help="heartbeat client processes")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of heartbeat flood")
    parser.add_argument(
        "--background-rate",
        type=float,
        default=50_000,
        help="heartbeats/s kept flowing during the staleness figure (0: none)",
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=HEARTBEAT_TIMEOUT,
        help="heartbeat.timeout of the daemon (raise it for --mass 100000: bringing that many "
        "accounts online over HTTP must not take longer)",
    )
    parser.add_argument("--ceiling-seconds", type=float, default=2.0)
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument(
        "--profile", choices=("ingest", "mass", "stale"), help="cProfile the daemon in one phase"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Expected during the run: the flush job skipping a beat while the previous flush is still
    # writing (the ingest flood starves it), and mass_offline when 10,000 accounts drop.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("accountd.daemon.supervisor").setLevel(logging.ERROR)
    started = time.perf_counter()
    report = asyncio.run(run(args))
    m = report["machine"]
    report["loadavg_end"] = machine()["loadavg"]
    print()
    print(
        f"{m['cpus']} CPUs ({m['cpu']}), {m['memory']}, Python {m['python']}; {report['server']}; "
        f"{args.accounts:,} accounts; run took {time.perf_counter() - started:.0f}s; "
        f"load average {m['loadavg']} at the start, {report['loadavg_end']} at the end"
    )
    header, rows = table(report)
    print_table(header, rows)
    ing, mass, st = report["ingest"], report["mass"], report["stale"]
    print(
        f"\ningest: clients={args.clients}, client-side applied {n(ing['client_applied_s'])}/s, "
        f"errors {ing['errors']:.0f}; flush: {ing['flushes']:.0f} flushes, "
        f"DB-side {n(ing['flush_rows_s_db'])} rows/s, slowest {ing['flush_max_s']:.2f}s\n"
        f"mass: first commit {mass['first_commit_after_deadline_s'] * 1000:.0f} ms after the "
        f"first deadline, all {mass['all_committed_after_deadline_s'] * 1000:.0f} ms; "
        f"last heartbeats spread over {mass['last_beat_spread_s'] * 1000:.0f} ms; "
        f"{mass['batches']:.0f} transactions of {mass['batch_mean']:.0f} on average, "
        f"{mass['batch_seconds_sum']:.2f}s inside them; {mass['with_mass']:.0f} of the other "
        f"accounts stopped within {MASS_SLICE * 1000:.0f} ms of the mass's last beats (one mass "
        f"event to the daemon; not counted as others), their delay max "
        f"{mass['with_mass_max_s'] * 1000:.0f} ms\n"
        f"staleness: {st['accounts']:.0f} accounts, min {st['min_s'] * 1000:.0f} ms, background "
        f"{n(st['background_heartbeats_s'])} heartbeats/s"
    )
    if args.json:
        dump_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
