"""The daemon's client for the worker's session API (docs/worker-protocol.md, "Daemon → worker").

Each call only *asks*: the worker answers 202/204 at once and reports progress later as events on
the ingest listener. Failures are sorted for the recovery policy: anything that may succeed on a
later try (worker down, timeout, 5xx, 408/429) is `WorkerTransient`; any other 4xx is
`WorkerRejected`. Neither message carries request bodies: ``proxy_config`` may hold proxy
credentials, and the account's ``wework_secret`` is never sent at all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote

import aiohttp
from yarl import URL

from accountd.errors import WorkerRejected, WorkerTransient

# Statuses where the same request may succeed later even though they are 4xx.
_RETRYABLE_4XX: Final = frozenset({408, 425, 429})


def _error_code(body: bytes) -> str:
    """The worker's stable error code from a JSON error body, if it sent one."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            return str(err["code"])[:64]
    return ""


class WorkerClient:
    """Calls a worker's session API over one pooled aiohttp session.

    Use as ``async with WorkerClient(url, timeout=5, max_connections=100) as worker:``; the
    session is created on entry (it must live inside the running loop) and closed on exit.
    """

    def __init__(self, base_url: str, *, timeout: float = 5.0, max_connections: int = 100) -> None:
        if timeout <= 0 or max_connections < 1:
            raise ValueError("timeout and max_connections must be positive")
        self._base = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    @property
    def base_url(self) -> str:
        return self._base

    async def __aenter__(self) -> Self:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=self._timeout,
                raise_for_status=False,
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _url(self, account_id: str | None = None, suffix: str = "") -> URL:
        # The id is one path segment whatever it contains ('/' included).
        path = "/v1/sessions"
        if account_id is not None:
            path += "/" + quote(account_id, safe="")
        return URL(self._base + path + suffix, encoded=True)

    async def open_session(
        self,
        account_id: str,
        *,
        wework_guid: str,
        corp_id: str | None,
        device_info: Mapping[str, Any] | None = None,
        proxy_config: Mapping[str, Any] | None = None,
    ) -> None:
        """Ask the worker to open a session for the account and start a QR login."""
        payload = {
            "account_id": account_id,
            "wework_guid": wework_guid,
            "corp_id": corp_id,
            "device_info": dict(device_info) if device_info is not None else None,
            "proxy_config": dict(proxy_config) if proxy_config is not None else None,
        }
        await self._call("POST", self._url(), account_id, payload)

    async def resume_session(self, account_id: str) -> None:
        """Ask the worker to resume the account's session without a new login."""
        await self._call("POST", self._url(account_id, "/resume"), account_id, None)

    async def close_session(self, account_id: str) -> None:
        """Ask the worker to close the account's session; a session already gone is success."""
        await self._call("DELETE", self._url(account_id), account_id, None, ok_404=True)

    async def _call(
        self,
        method: str,
        url: URL,
        account_id: str,
        payload: dict[str, Any] | None,
        *,
        ok_404: bool = False,
    ) -> None:
        session = self._session
        if session is None:
            raise RuntimeError("WorkerClient used outside 'async with'")
        what = f"{method} {url.path}"
        try:
            async with session.request(method, url, json=payload, allow_redirects=False) as resp:
                status = resp.status
                body = b"" if status < 400 else await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            # ClientError covers refused/reset connections and broken responses; TimeoutError
            # is the per-call timeout (asyncio.TimeoutError is the same class on 3.11).
            detail = type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc)
            raise WorkerTransient(f"worker {what} for {account_id!r} failed: {detail}") from exc
        # A redirect is not followed: a worker URL that redirects is misconfigured (rejected).
        if status < 300 or (ok_404 and status == 404):
            return
        code = _error_code(body)
        detail = f"worker answered {status}" + (f" ({code})" if code else "")
        message = f"{what} for {account_id!r}: {detail}"
        if status >= 500 or status in _RETRYABLE_4XX:
            raise WorkerTransient(message)
        raise WorkerRejected(message)
