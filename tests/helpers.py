"""Helpers shared by the tests that run a real daemon beside the real worker simulator."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest

from accountd.daemon.app import Daemon
from accountd.daemon.simulator import WorkerSimulator
from accountd.daemon.simulator_sessions import SimulatorConfig

# Test timings: every automatic step within tens of milliseconds, a "human" scans the QR
# within 0.2 s, each session beats every 0.3 s, and the simulator's scheduler ticks at 20 ms.
FAST: dict[str, Any] = {
    "step_latency_min": 0.02,
    "step_latency_max": 0.1,
    "scan_latency_min": 0.05,
    "scan_latency_max": 0.2,
    "heartbeat_interval": 0.3,
    "tick": 0.02,
}


def fast_simulator(*, ingest_url: str, token: str, seed: int, **overrides: Any) -> WorkerSimulator:
    """The worker simulator with `FAST` timings (``overrides`` change any field)."""
    return WorkerSimulator(
        SimulatorConfig(ingest_url=ingest_url, token=token, seed=seed, **{**FAST, **overrides})
    )


async def start_daemon(daemon: Daemon, *, timeout: float = 20.0) -> asyncio.Task[int]:
    """Run ``daemon`` in a task and return it once the daemon is ready (fail if it exits)."""
    task = asyncio.create_task(daemon.run())
    deadline = time.monotonic() + timeout
    while not daemon.ready:
        if task.done():
            pytest.fail(f"daemon exited early: {task.result()}")
        assert time.monotonic() < deadline, "daemon did not become ready"
        await asyncio.sleep(0.02)
    return task


async def stop_stack(ctx: dict[str, Any]) -> None:
    """Teardown of a fixture holding ``daemon``, ``sim``, ``dbs`` and maybe a running ``task``."""
    task = ctx.get("task")
    if task is not None and not task.done():
        ctx["daemon"].request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
    await ctx["sim"].stop()
    await ctx["dbs"].dispose()


def write_config(
    path: Path,
    urls: dict[str, str],
    port: int,
    worker: str,
    token: str,
    *,
    worker_timeout: float = 1,
    recovering: float = 6,
) -> Path:
    """A TOML config for `accountd run` with test timings (seconds, not minutes)."""
    db = "\n".join(f'{key} = "{url}"' for key, url in urls.items())
    path.write_text(
        f"""
state_dir = "{path.parent}"
[databases]
{db}
[ingest]
listen = "127.0.0.1:{port}"
token = "{token}"
[metrics]
listen = "127.0.0.1:0"
[worker]
url = "{worker}"
timeout = {worker_timeout}
[heartbeat]
timeout = 1.5
persist_interval = 0.5
flush_interval = 0.2
db_poll_interval = 0.5
startup_grace = 1.5
[deadlines]
initializing = 5
waiting_qr = 5
waiting_confirm = 5
verifying = 5
recovering = {recovering}
[recovery]
base = 0.2
cap = 1
[supervisor]
poll_interval = 0.3
"""
    )
    return path
