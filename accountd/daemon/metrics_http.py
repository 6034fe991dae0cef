"""The Prometheus listener: ``/metrics``, ``/healthz`` and ``/readyz`` on ``[metrics] listen``.

Served by its own aiohttp `AppRunner` on a TCP site (loopback by default), started first thing in
`Daemon._start` so that ``/healthz`` answers while the databases open and the accounts load, and
stopped last, so that the drain at shutdown stays observable. ``/readyz`` is 200 only once the
databases answer, the accounts are loaded and the daemon said it is ready; otherwise 503 with the
reasons as JSON (``{"ready": false, "reasons": [...]}``). During shutdown it says so, first.

A scrape renders the collector's current numbers: no database query and no walk over the
accounts happens inside it, so its time and size do not grow with the number of accounts.
"""

from __future__ import annotations

import contextlib

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from accountd.daemon.ingest import bound_port
from accountd.daemon.metrics import Metrics
from accountd.errors import ConfigError

METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    # OpenMetrics when the scraper asks for it (Prometheus does), the 0.0.4 text format otherwise.
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(metrics.registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    # Answering at all is the proof: the event loop runs and serves requests.
    metrics = request.app[METRICS_KEY]
    return web.json_response({"alive": True, "uptime_seconds": round(metrics.uptime(), 3)})


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
    stack: contextlib.AsyncExitStack, metrics: Metrics, host: str, port: int
) -> int:
    """Start the listener and the periodic refresh; register their cleanup; return the port."""
    server = MetricsServer(metrics)
    bound = await server.start(host, port)
    stack.push_async_callback(server.stop)
    await metrics.start()
    stack.push_async_callback(metrics.stop)
    return bound


__all__ = ["MetricsServer", "make_metrics_app", "serve_metrics"]
