"""Helpers shared by the tests that run a real daemon beside the real worker simulator."""

from __future__ import annotations

from typing import Any

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
