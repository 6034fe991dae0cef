"""The worker side of the engine benchmark: a separate process posting to the daemon's ingest.

``bench.engine`` starts one or more of these (``python -m bench.client …``); each prints one JSON
line with what it did. Modes:

- ``flood``: pre-encode batches of ``--batch`` heartbeats over the accounts in ``--ids``, print
  ``ready``, wait for ``go`` on stdin, then keep ``--concurrency`` requests in flight for
  ``--duration`` seconds (at most ``--rate`` heartbeats/s when given).
- ``mass``: bring the accounts online (``verified`` events, each chunk followed by its
  heartbeats), then send ONE heartbeat batch for all of them and stop: every account's last
  heartbeat is the same instant, so they all go stale together.
- ``stagger``: bring the accounts online, then beat every ``--tick`` seconds, dropping accounts
  one after another over ``--window`` seconds: staggered last heartbeats.
- ``drop``: the same for accounts that are online already (``bench.scale``), after ``go``;
  prints when each account's last heartbeat was sent.
- ``show``: after ``go``, one ``GET /v1/accounts/{id}`` on the control socket ``--socket``
  every ``--tick`` seconds, exactly as ``accountctl show`` sends it (its client), over the
  accounts in ``--ids`` in turn, until a second line on stdin; prints each request's seconds.
  A process of its own, as ``accountctl`` is: what it waits for is the daemon, not the GIL of
  a harness busy with its own probes. (``--url`` and ``--token`` are not used.)
- ``reads``: the same pacing, but each time the read ``show`` makes, as plain SQL straight to
  the database ``--db`` (``bench.scale.RawReads``): the ceiling beside ``show``, from a process
  of its own for the same reason.

The ``at`` field of a heartbeat is when the worker saw the session alive; the daemon judges
staleness by its own clock, so bodies may be encoded once and sent many times.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp


def rfc3339_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def heartbeat_body(ids: Sequence[str]) -> bytes:
    at = rfc3339_now()
    return json.dumps({"heartbeats": [{"account_id": i, "at": at} for i in ids]}).encode()


def events_body(ids: Sequence[str], event: str) -> bytes:
    at = rfc3339_now()
    items = [{"account_id": i, "event": event, "data": {}, "at": at} for i in ids]
    return json.dumps({"events": items}).encode()


class Poster:
    def __init__(self, session: aiohttp.ClientSession, url: str, token: str) -> None:
        self.session = session
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.requests = 0
        self.errors = 0

    async def post(self, path: str, body: bytes) -> dict[str, Any]:
        async with self.session.post(self.url + path, data=body, headers=self.headers) as resp:
            raw = await resp.read()
        self.requests += 1
        if resp.status != 200:
            self.errors += 1
            raise RuntimeError(f"{path}: HTTP {resp.status}: {raw[:200]!r}")
        reply: dict[str, Any] = json.loads(raw)
        return reply


def chunks(ids: Sequence[str], size: int) -> list[list[str]]:
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


async def flood(p: Poster, ids: list[str], args: argparse.Namespace) -> dict[str, Any]:
    bodies = [(heartbeat_body(c), len(c)) for c in chunks(ids, args.batch)]
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    sent = applied = 0
    start = time.perf_counter()
    end = start + args.duration
    per_request = args.batch / args.rate if args.rate else 0.0
    cursor = 0

    async def worker(k: int) -> None:
        nonlocal sent, applied, cursor
        next_at = start + k * per_request / max(1, args.concurrency)
        while time.perf_counter() < end:
            if per_request:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += per_request * args.concurrency
            body, n = bodies[cursor % len(bodies)]
            cursor += 1
            reply = await p.post("/v1/heartbeats", body)
            sent += n
            applied += int(reply["applied"])

    await asyncio.gather(*(worker(k) for k in range(args.concurrency)))
    return {"sent": sent, "applied": applied, "seconds": time.perf_counter() - start}


async def bring_online(p: Poster, ids: list[str], chunk: int, batch: int) -> int:
    """`verified` for every account, chunk by chunk; after each chunk every account online so
    far beats (bringing 10,000 accounts online can take longer than the heartbeat timeout)."""
    applied = 0
    for end in range(chunk, len(ids) + chunk, chunk):
        reply = await p.post("/v1/events", events_body(ids[end - chunk : end], "verified"))
        applied += int(reply["applied"])
        for c in chunks(ids[:end], batch):
            await p.post("/v1/heartbeats", heartbeat_body(c))
    return applied


async def mass(p: Poster, ids: list[str], args: argparse.Namespace) -> dict[str, Any]:
    online = await bring_online(p, ids, 2000, args.batch)
    body = heartbeat_body(ids)  # one batch: one instant for every account
    sent_at = time.time()
    reply = await p.post("/v1/heartbeats", body)
    return {"online": online, "last_beat_applied": reply["applied"], "last_beat_sent_at": sent_at}


async def stagger(p: Poster, ids: list[str], args: argparse.Namespace) -> dict[str, Any]:
    online = await bring_online(p, ids, 2000, args.batch)
    start = time.perf_counter()
    step = args.window / len(ids)
    beats = 0
    while True:
        elapsed = time.perf_counter() - start
        alive = ids[min(len(ids), int(elapsed / step) + 1) :]
        if not alive:
            break
        for c in chunks(alive, args.batch):
            reply = await p.post("/v1/heartbeats", heartbeat_body(c))
            beats += int(reply["applied"])
        await asyncio.sleep(args.tick)
    return {"online": online, "beats": beats, "seconds": time.perf_counter() - start}


async def drop(p: Poster, ids: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Accounts already online (`bench.scale`): print ``ready``, wait for ``go``, then beat
    every ``--tick`` seconds, dropping accounts one after another over ``--window`` seconds.
    Reports when each account's last heartbeat was sent (wall clock): the daemon received it
    a little later, so a delay measured from here is, if anything, too long."""
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    start = time.perf_counter()
    step = args.window / len(ids)
    last_sent: dict[str, float] = {}
    beats = 0
    while True:
        alive = ids[int((time.perf_counter() - start) / step) :]
        if not alive:
            break
        for c in chunks(alive, args.batch):
            sent_at = time.time()
            reply = await p.post("/v1/heartbeats", heartbeat_body(c))
            beats += int(reply["applied"])
            last_sent.update(dict.fromkeys(c, sent_at))
        await asyncio.sleep(args.tick)
    return {"beats": beats, "seconds": time.perf_counter() - start, "last_sent": last_sent}


def paced(call: Callable[[str], object], ids: list[str], tick: float) -> dict[str, Any]:
    """``call`` once per ``tick`` seconds over ``ids`` in turn, after ``go`` on stdin and until
    a second line: each call's seconds."""
    print("ready", flush=True)
    sys.stdin.readline()
    stop = threading.Event()

    def stop_on_next_line() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=stop_on_next_line, daemon=True).start()
    seconds: list[float] = []
    for account_id in itertools.cycle(ids):
        started = time.perf_counter()
        call(account_id)
        seconds.append(time.perf_counter() - started)
        if stop.wait(max(0.0, tick - (time.perf_counter() - started))):
            break
    return {"seconds": seconds, "requests": len(seconds), "errors": 0}


def show(ids: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from accountd.ctl import Client as CtlClient

    client = CtlClient(Path(args.socket), timeout=10)
    return paced(
        lambda account_id: client.call("GET", f"/v1/accounts/{account_id}"), ids, args.tick
    )


def reads(ids: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from bench.scale import RawReads  # bench.scale imports this module

    raw = RawReads(args.db)
    try:
        return paced(raw.read, ids, args.tick)
    finally:
        raw.close()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    ids = Path(args.ids).read_text().split()
    connector = aiohttp.TCPConnector(limit=args.concurrency + 2)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        p = Poster(session, args.url, args.token)
        mode = {"flood": flood, "mass": mass, "stagger": stagger, "drop": drop}[args.mode]
        result = await mode(p, ids, args)
        return {**result, "requests": p.requests, "errors": p.errors}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.client")
    parser.add_argument("mode", choices=("flood", "mass", "stagger", "drop", "show", "reads"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--ids", required=True, help="file with one account id per line")
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.0, help="heartbeats/s (0: unlimited)")
    parser.add_argument("--window", type=float, default=4.0)
    parser.add_argument("--tick", type=float, default=0.05)
    parser.add_argument("--socket", help="show: the daemon's control socket")
    parser.add_argument("--db", help="reads: the platform database's URL")
    args = parser.parse_args(argv)
    if args.mode in ("show", "reads"):  # blocking, as accountctl is: no event loop here
        result = {"show": show, "reads": reads}[args.mode](Path(args.ids).read_text().split(), args)
    else:
        result = asyncio.run(main_async(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
