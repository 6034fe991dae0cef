"""The worker simulator: a real HTTP server that speaks the worker side of the protocol.

It takes the daemon's session calls (``POST /v1/sessions``, ``.../resume``, ``DELETE``), answers
at once, and then plays each session's WeCom login (QR shown, scanned, confirmed, verified) and
heartbeats by pushing batches to the daemon's ingest listener, failures included at configurable
rates. It backs ``accountd demo`` and the protocol tests, and runs standalone::

    python -m accountd.daemon.simulator --listen 127.0.0.1:8480 \\
        --ingest-url http://127.0.0.1:8470 --token T --seed 1

One task drives every session (the timers live in one heap, see `simulator_sessions`) and sends
inline: when the daemon is slow, ticks stretch and batches grow instead of requests piling up.
Events the daemon did not take (down, 503) are kept in order and retried; heartbeats are not,
since the next beat supersedes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
from aiohttp import web

from accountd.daemon.ingest import bound_port, error_response, json_errors_middleware
from accountd.daemon.simulator_sessions import (
    Due,
    OutEvent,
    Phase,
    SessionTable,
    SimulatorConfig,
)

__all__ = ["Phase", "SimulatorConfig", "WorkerSimulator", "main"]

log = logging.getLogger(__name__)

_STOP_TIMEOUT: Final = 5.0
_RETRY_DEFAULT: Final = 1.0
_RETRY_MAX: Final = 30.0
_TOKEN_ENV: Final = "ACCOUNTD_INGEST__TOKEN"  # noqa: S105 (a variable name, not a secret)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class WorkerSimulator:
    """A simulated worker: HTTP server for the daemon's calls plus one session scheduler task."""

    def __init__(
        self, config: SimulatorConfig, *, wall_clock: Callable[[], datetime] = _utcnow
    ) -> None:
        self._table = SessionTable(config)
        self._wall = wall_clock
        # A separate stream for answering calls keeps the sessions' own draws reproducible for a
        # seed, whatever order the daemon's calls arrive in.
        self._call_rng = random.Random(None if config.seed is None else config.seed + 1)
        self._wake = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: aiohttp.ClientSession | None = None
        self._url = ""
        self._pending: list[dict[str, Any]] = []
        self._retry_at = 0.0
        self._last_tick = 0.0
        self._ingest_ok = True
        self.stats: Counter[str] = Counter()

    # -- public API ---------------------------------------------------------------------------

    @property
    def config(self) -> SimulatorConfig:
        return self._table.config

    @property
    def url(self) -> str:
        """The base URL the daemon's ``[worker] url`` should point at (after `start`)."""
        return self._url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve the worker API and start the scheduler; returns the base URL."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        cfg = self.config
        self._client = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {cfg.token}"},
            timeout=aiohttp.ClientTimeout(total=10.0),
        )
        runner = web.AppRunner(
            self._make_app(), handle_signals=False, access_log=None, shutdown_timeout=2.0
        )
        try:
            await runner.setup()
            self._runner = runner
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await self.stop()
            raise
        self._url = f"http://{host}:{bound_port(runner)}"
        self._task = asyncio.create_task(self._run(), name="worker-simulator-scheduler")
        return self._url

    async def stop(self) -> None:
        """Stop serving, stop the scheduler, close the ingest client; each step is bounded."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()  # bounded by shutdown_timeout
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # The scheduler only awaits POSTs (10 s timeout) and its wake-up: cancellation
            # lands at once; the timeout is a guard, not a wait.
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(_STOP_TIMEOUT):
                    await task
            if not task.done():
                log.warning("simulator scheduler did not stop within %.0f s", _STOP_TIMEOUT)
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def sessions(self) -> dict[str, str]:
        """account_id → phase of every session the simulator holds."""
        return self._table.snapshot()

    def phase(self, account_id: str) -> Phase | None:
        return self._table.phase(account_id)

    def drop(self, account_id: str) -> bool:
        """Make the session stop beating silently; False if there is no such session."""
        return self._table.drop(account_id)

    def logout(self, account_id: str) -> bool:
        """Make the session report ``logged_out`` now; False if there is no such session."""
        found = self._table.logout(account_id, self._now())
        self._wake.set()
        return found

    def call_counts(self, call: str) -> dict[str, int]:
        """account_id → how many ``call`` ("open" or "resume") requests the daemon made."""
        return {aid: n for (kind, aid), n in self._table.calls.items() if kind == call}

    def overlapping_calls(self) -> list[tuple[str, str, str]]:
        """(account_id, call, call still in flight) for every open/resume that arrived before
        the previous one of that account had reported its outcome; empty when the daemon never
        ran two logins or recoveries of one account at once."""
        return list(self._table.overlaps)

    def update_rates(self, rates: dict[str, Any]) -> SimulatorConfig:
        """Change failure rates live (``p_*`` keys only); raises ValueError on bad input."""
        self._table.config = self._table.config.with_rates(rates)
        return self._table.config

    # -- HTTP side ----------------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _make_app(self) -> web.Application:
        app = web.Application(
            client_max_size=1024 * 1024, middlewares=[json_errors_middleware(1024 * 1024)]
        )
        r = app.router
        r.add_post("/v1/sessions", self._h_open)
        r.add_post("/v1/sessions/{account_id}/resume", self._h_resume)
        r.add_delete("/v1/sessions/{account_id}", self._h_close)
        r.add_get("/sim/sessions", self._h_list)
        r.add_post("/sim/sessions/{account_id}/drop", self._h_drop)
        r.add_post("/sim/sessions/{account_id}/logout", self._h_logout)
        r.add_get("/sim/config", self._h_config)
        r.add_post("/sim/config", self._h_config)
        r.add_get("/sim/stats", self._h_stats)
        r.add_get("/healthz", self._h_health)
        return app

    def _unavailable(self) -> web.Response | None:
        if self._call_rng.random() < self.config.p_5xx:
            self.stats["calls_failed_5xx"] += 1
            return error_response(503, "unavailable", "simulated worker failure")
        return None

    async def _h_open(self, request: web.Request) -> web.Response:
        try:
            doc = json.loads(await request.read())
        except (ValueError, RecursionError):
            return error_response(400, "malformed_json", "body is not valid JSON")
        problem = _check_open_body(doc)
        if problem:
            return error_response(400, "invalid_request", problem)
        if (failed := self._unavailable()) is not None:
            return failed
        account_id = doc["account_id"]
        self._table.open(account_id, self._now())
        self._wake.set()
        self.stats["sessions_opened"] += 1
        return web.json_response({"account_id": account_id, "status": "accepted"}, status=202)

    async def _h_resume(self, request: web.Request) -> web.Response:
        if (failed := self._unavailable()) is not None:
            return failed
        account_id = request.match_info["account_id"]
        self._table.resume(account_id, self._now())
        self._wake.set()
        self.stats["sessions_resumed"] += 1
        return web.json_response({"account_id": account_id, "status": "accepted"}, status=202)

    async def _h_close(self, request: web.Request) -> web.Response:
        if (failed := self._unavailable()) is not None:
            return failed
        account_id = request.match_info["account_id"]
        if not self._table.close(account_id):
            return error_response(404, "not_found", f"no session for {account_id!r}")
        self.stats["sessions_closed"] += 1
        return web.Response(status=204)

    async def _h_list(self, _request: web.Request) -> web.Response:
        return web.json_response({"sessions": self.sessions()})

    async def _h_drop(self, request: web.Request) -> web.Response:
        account_id = request.match_info["account_id"]
        if not self.drop(account_id):
            return error_response(404, "not_found", f"no session for {account_id!r}")
        return web.Response(status=204)

    async def _h_logout(self, request: web.Request) -> web.Response:
        account_id = request.match_info["account_id"]
        if not self.logout(account_id):
            return error_response(404, "not_found", f"no session for {account_id!r}")
        return web.Response(status=204)

    async def _h_config(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                doc = json.loads(await request.read())
            except (ValueError, RecursionError):
                return error_response(400, "malformed_json", "body is not valid JSON")
            if not isinstance(doc, dict):
                return error_response(400, "invalid_request", "body must be a JSON object")
            try:
                self.update_rates(doc)
            except ValueError as exc:
                return error_response(400, "invalid_request", str(exc))
        return web.json_response(self.config.rates())

    async def _h_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "sessions": len(self._table),
                "overlapping_calls": len(self._table.overlaps),
                **self.stats,
            }
        )

    async def _h_health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    # -- the scheduler ------------------------------------------------------------------------

    async def _run(self) -> None:
        """The one task that fires every session timer and pushes the results to ingest."""
        while True:
            self._wake.clear()
            now = self._now()
            wake_at = self._table.next_due()
            if self._pending:
                wake_at = self._retry_at if wake_at is None else min(wake_at, self._retry_at)
            if wake_at is not None:
                # Batching: at most one round of POSTs per tick.
                wake_at = max(wake_at, self._last_tick + self.config.tick)
            if wake_at is None or wake_at > now:
                timeout = None if wake_at is None else wake_at - now
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                continue
            self._last_tick = now
            await self._push(self._table.advance(now))

    async def _push(self, due: Due) -> None:
        at = _rfc3339(self._wall())
        if due.events:
            self._queue_events(due.events, at)
        # Events first: a session's `verified` should land before its first heartbeat.
        if self._pending and self._now() >= self._retry_at:
            await self._send_events()
        if due.heartbeats:
            await self._send_heartbeats(due.heartbeats, at)

    def _queue_events(self, events: Sequence[OutEvent], at: str) -> None:
        self._pending.extend(
            {"account_id": e.account_id, "event": e.event, "data": e.data, "at": at} for e in events
        )
        excess = len(self._pending) - self.config.max_pending_events
        if excess > 0:
            # The daemon has been away for long: keep the newest, which describe the present.
            del self._pending[:excess]
            self.stats["events_dropped"] += excess

    async def _send_events(self) -> None:
        size = self.config.max_batch
        while self._pending:
            chunk = self._pending[:size]
            status, doc, retry_after = await self._post("/v1/events", {"events": chunk})
            if status == 200:
                del self._pending[: len(chunk)]
                self.stats["events_sent"] += len(chunk)
                self._tally(doc)
                self._forget_unknown(chunk, doc)
                continue
            if status in (0, 408, 429) or status >= 500:
                # Keep them, in order, and back off; later events queue behind them.
                self._retry_at = self._now() + min(retry_after or _RETRY_DEFAULT, _RETRY_MAX)
                return
            # 400/401/413: resending the same batch cannot succeed.
            del self._pending[: len(chunk)]
            self.stats["events_rejected"] += len(chunk)

    async def _send_heartbeats(self, account_ids: list[str], at: str) -> None:
        size = self.config.max_batch
        for i in range(0, len(account_ids), size):
            chunk = [{"account_id": aid, "at": at} for aid in account_ids[i : i + size]]
            status, doc, _ = await self._post("/v1/heartbeats", {"heartbeats": chunk})
            if status == 200:
                self.stats["heartbeats_sent"] += len(chunk)
                self._tally(doc)
            else:
                self.stats["heartbeats_lost"] += len(chunk)

    def _tally(self, doc: Any) -> None:
        if isinstance(doc, dict) and isinstance(doc.get("results"), list):
            self.stats.update(f"result_{r}" for r in doc["results"] if isinstance(r, str))

    def _forget_unknown(self, chunk: list[dict[str, Any]], doc: Any) -> None:
        # The daemon does not know the account (deleted, or never its to supervise): a real
        # worker would close such a session rather than keep reporting it.
        results = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(results, list):
            return
        for item, result in zip(chunk, results, strict=False):
            if result == "unknown_account":
                self._table.close(item["account_id"])

    async def _post(self, path: str, payload: dict[str, Any]) -> tuple[int, Any, float | None]:
        """POST to ingest: (status or 0 when unreachable, decoded body, Retry-After seconds)."""
        client = self._client
        assert client is not None, "scheduler runs only between start() and stop()"
        url = self.config.ingest_url.rstrip("/") + path
        try:
            async with client.post(url, json=payload) as resp:
                status = resp.status
                raw = await resp.read()
                retry = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._ingest_health(False, f"{path}: {type(exc).__name__}: {exc}")
            return 0, None, None
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        self._ingest_health(status == 200, f"{path}: HTTP {status}: {raw[:200]!r}")
        retry_after = float(retry) if retry is not None and retry.isdigit() else None
        return status, doc, retry_after

    def _ingest_health(self, ok: bool, detail: str) -> None:
        # Log changes only: a daemon that is down would otherwise cost a line per tick.
        if ok != self._ingest_ok:
            if ok:
                log.info("ingest reachable again")
            else:
                log.warning("ingest push failing (%s); retrying quietly", detail)
            self._ingest_ok = ok
        if not ok:
            self.stats["ingest_errors"] += 1


def _check_open_body(doc: Any) -> str:
    """Why an open-session body is invalid, or '' when it is fine."""
    if not isinstance(doc, dict):
        return "body must be a JSON object"
    account_id = doc.get("account_id")
    if not isinstance(account_id, str) or not account_id or len(account_id) > 36:
        return "account_id must be a non-empty string of at most 36 characters"
    for key in ("wework_guid", "corp_id"):
        if doc.get(key) is not None and not isinstance(doc[key], str):
            return f"{key} must be a string or null"
    for key in ("device_info", "proxy_config"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            return f"{key} must be an object or null"
    return ""


# -- standalone entry ---------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> tuple[str, int, SimulatorConfig]:
    p = argparse.ArgumentParser(
        prog="python -m accountd.daemon.simulator",
        description="Run the accountd worker simulator until SIGINT/SIGTERM.",
    )
    p.add_argument("--listen", default="127.0.0.1:8480", help="HOST:PORT (port 0 = any free)")
    p.add_argument("--ingest-url", default="http://127.0.0.1:8470")
    p.add_argument("--token", default=os.environ.get(_TOKEN_ENV, ""), help=f"or ${_TOKEN_ENV}")
    p.add_argument("--seed", type=int, default=None)
    skip = {"ingest_url", "token", "seed"}
    for f in fields(SimulatorConfig):
        if f.name in skip:
            continue
        kind = int if f.name in ("qr_max_refreshes", "max_batch", "max_pending_events") else float
        extra = " (0 disables)" if f.name == "qr_refresh_interval" else ""
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=None,
            help=f"default {f.default}{extra}",
        )
    ns = p.parse_args(argv)
    host, sep, port = ns.listen.rpartition(":")
    if not sep or not port.isdigit():
        p.error("--listen must be HOST:PORT")
    if not ns.token:
        p.error(f"--token (or ${_TOKEN_ENV}) is required")
    values: dict[str, Any] = {"ingest_url": ns.ingest_url, "token": ns.token, "seed": ns.seed}
    for f in fields(SimulatorConfig):
        if f.name not in skip and getattr(ns, f.name) is not None:
            values[f.name] = getattr(ns, f.name)
    if values.get("qr_refresh_interval") == 0:
        values["qr_refresh_interval"] = None
    try:
        config = SimulatorConfig(**values)
    except ValueError as exc:
        p.error(str(exc))
    return host.strip("[]"), int(port), config


async def _serve(host: str, port: int, config: SimulatorConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    force = asyncio.Event()

    def on_signal() -> None:
        # The one signal owner: handlers only set flags; a second signal skips the graceful stop.
        (force if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    sim = WorkerSimulator(config)
    try:
        url = await sim.start(host, port)
        print(f"worker simulator listening on {url}", flush=True)
        await stop.wait()
        log.info("stopping (a second signal forces exit)")
        stopping = asyncio.create_task(sim.stop())
        forced = asyncio.create_task(force.wait())
        try:
            done, _ = await asyncio.wait(
                {stopping, forced}, timeout=3 * _STOP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for t in (stopping, forced):
                t.cancel()
            await asyncio.gather(stopping, forced, return_exceptions=True)
        if stopping not in done:
            log.error("forced exit before the simulator stopped")
            return 1
        if (exc := stopping.exception()) is not None:
            log.error("simulator stop failed: %r", exc)
            return 1
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    host, port, config = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    return asyncio.run(_serve(host, port, config))


if __name__ == "__main__":
    sys.exit(main())
