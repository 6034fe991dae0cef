"""The Prometheus listener: ``/metrics``, ``/healthz`` and ``/readyz`` on ``[metrics] listen``.

Served by its own aiohttp `AppRunner` on a TCP site (loopback by default), started first thing in
`Daemon._start` so that ``/healthz`` answers while the databases open and the accounts load, and
stopped last, so that the drain at shutdown stays observable. ``/readyz`` is 200 only once the
databases answer, the accounts are loaded and the daemon said it is ready; otherwise 503 with the
reasons as JSON (``{"ready": false, "reasons": [...]}``). During shutdown it says so, first.

In the daemon the listener runs on the side loop (`accountd.daemon.side_loop`), so a scrape
and a health check answer while a heartbeat flood keeps the main loop busy.

A scrape renders the collector's current numbers: no database query and no walk over the
accounts happens inside it, so its time and size do not grow with the number of accounts.
"""

from __future__ import annotations

import contextlib

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from accountd.daemon.ingest import bound_port
from accountd.daemon.metrics import Metrics
from accountd.daemon.side_loop import SideLoop
from accountd.errors import ConfigError

METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
# /healthz fails once the main loop has not run its 0.1 s timer for this long: a loop stuck
# in one callback (systemd's watchdog, 30 s, would restart the daemon a little later).
STALLED_AFTER = 10.0


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    # OpenMetrics when the scraper asks for it (Prometheus does), the 0.0.4 text format otherwise.
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(metrics.registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    # Served by the side loop in the daemon: answering proves that loop runs, and the main
    # loop's timer (`LoopLag`) says whether the main loop still turns.
    metrics = request.app[METRICS_KEY]
    lag = metrics.loop_lag
    seen_ago = lag.seen_ago()
    alive = seen_ago < STALLED_AFTER
    body = {
        "alive": alive,
        "uptime_seconds": round(metrics.uptime(), 3),
        "loop_lag_seconds": round(lag.last, 4),
        "loop_seen_seconds_ago": round(seen_ago, 3),
    }
    return web.json_response(body, status=200 if alive else 503)


async def _readyz(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    reasons = metrics.not_ready()
    if reasons:
        return web.json_response({"ready": False, "reasons": reasons}, status=503)
    return web.json_response({"ready": True, "reasons": []})


def make_metrics_app(metrics: Metrics) -> web.Application:
    app = web.Application()
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


class MetricsServer:
    """Runs the metrics application on a TCP listener."""

    def __init__(self, metrics: Metrics, *, shutdown_timeout: float = 2.0) -> None:
        self.metrics = metrics
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Bind and serve; returns the bound port (``port=0`` picks a free one)."""
        if self._runner is not None:
            raise RuntimeError("metrics server already started")
        runner = web.AppRunner(
            make_metrics_app(self.metrics),
            handle_signals=False,
            access_log=None,  # a scrape every 15 s is noise in the journal
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(
                f"metrics.listen: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        return bound_port(runner)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


async def serve_metrics(
    stack: contextlib.AsyncExitStack,
    metrics: Metrics,
    host: str,
    port: int,
    side: SideLoop | None = None,
) -> int:
    """Start the listener (on ``side`` when given) and the periodic refresh; register their
    cleanup; return the port."""
    server = MetricsServer(metrics)
    if side is None:
        bound = await server.start(host, port)
        stack.push_async_callback(server.stop)
    else:
        bound = await side.run(server.start(host, port))
        stack.push_async_callback(side.call, server.stop)
    await metrics.start()
    stack.push_async_callback(metrics.stop)
    return bound


__all__ = ["MetricsServer", "make_metrics_app", "serve_metrics"]
