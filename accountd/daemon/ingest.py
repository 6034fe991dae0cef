"""The ingest listener: workers push heartbeats and events here (docs/worker-protocol.md).

Every batch is validated as a whole before anything reaches the sink, so a bad item never leaves
half a batch applied: the worker fixes the batch and resends all of it. The heartbeat path is the
hot one (≥100,000 items/s on two cores), so its loop touches each item only as much as parsing
requires: one ``json.loads`` over the raw body, one shape check and one ``fromisoformat`` per
timestamp, and two flat lists handed to the sink.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
from datetime import UTC, datetime
from typing import Any, Final, NoReturn

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from accountd.daemon import fastjson
from accountd.daemon.fastjson import loads_strict
from accountd.daemon.priority import AdminLane
from accountd.daemon.protocol import WORKER_EVENTS, IngestSink, ItemResult, WorkerEvent
from accountd.errors import AccountdError, Overloaded

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH: Final = 10_000
# Heartbeats applied between two yields to the event loop (~1-1.5 ms at a million accounts).
INGEST_SLICE: Final = 1_000
DEFAULT_MAX_BODY_BYTES: Final = 8 * 1024 * 1024
# aiohttp bounds neither how long a body may take to arrive nor (beyond an hour of keep-alive)
# how long request headers may trickle in: a client sending a byte a second would hold a
# connection and a handler for as long as it liked. Both are cut at this many seconds.
DEFAULT_REQUEST_TIMEOUT: Final = 30.0
# After an early answer (401, 413, 408) aiohttp keeps reading and discarding the rest of the
# body for a while so the client sees the answer instead of a reset; never longer than this.
MAX_LINGER: Final = 10.0
MAX_ACCOUNT_ID_CHARS: Final = 36  # wework_accounts.id is VARCHAR(36)
# login_qr_code and error_message are TEXT columns: 65,535 bytes on MySQL/MariaDB.
MAX_TEXT_BYTES: Final = 65_535

# RFC 3339 ``date-time``: fromisoformat alone also takes ISO 8601 forms that RFC 3339 does not
# (week dates, basic format, minutes-only times), so the shape is checked first. The regex only
# checks the shape; fromisoformat then rejects impossible values (month 13, hour 24).
_RFC3339: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})"
)

_APPLIED: Final = ItemResult.APPLIED


class BatchRejected(AccountdError):
    """A batch that fails validation: nothing of it reaches the sink; `status` is 400 or 413."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The one error body shape of the protocol: ``{"error": {"code", "message"}}``."""
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


def parse_rfc3339(value: object) -> datetime | None:
    """An aware UTC datetime for an RFC 3339 timestamp with offset, else None."""
    if type(value) is not str or _RFC3339.fullmatch(value) is None:
        return None
    if value[-1] == "z":  # RFC 3339 allows a lower-case zone designator; fromisoformat does not
        value = value[:-1] + "Z"
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    # 'Z' and '+00:00' parse straight to the UTC singleton: converting only the rest keeps the
    # common case free of an extra datetime allocation.
    return at if at.tzinfo is UTC else at.astimezone(UTC)


def _reject(where: str, what: str) -> NoReturn:
    raise BatchRejected(400, "invalid_request", f"{where}: {what}")


def _check_account_id(value: object, where: str) -> str:
    if type(value) is not str or not value or len(value) > MAX_ACCOUNT_ID_CHARS:
        _reject(where, f"must be a non-empty string of at most {MAX_ACCOUNT_ID_CHARS} characters")
    if not value.isascii():
        _check_encodable(value, where)
    return value


def _check_encodable(value: str, where: str) -> None:
    # JSON "\ud800" escapes decode to lone surrogates, which no database column can store.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _reject(where, "contains an unpaired UTF-16 surrogate")


def _decode_body(body: bytes, key: str, *, fast: bool = False) -> list[Any]:
    """The list under `key` of a JSON object body, or a 400.

    `fast` (orjson when installed) only where every value we accept is a string: orjson reads
    an integer beyond 64 bits as a float, which would silently change an event's ``data``.
    """
    try:
        doc = loads_strict(body, use_orjson=fast)
    except UnicodeDecodeError as exc:
        raise BatchRejected(
            400, "malformed_json", f"body is not valid UTF-8: {exc.reason}"
        ) from None
    except (ValueError, RecursionError) as exc:
        # RecursionError: deeply nested arrays; ValueError covers JSONDecodeError and the
        # int-digits limit. Neither may become a 500.
        raise BatchRejected(400, "malformed_json", f"body is not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise BatchRejected(
            400, "invalid_request", f'body must be a JSON object {{"{key}": [...]}}'
        )
    items = doc.get(key)
    if type(items) is not list:
        raise BatchRejected(400, "invalid_request", f"{key}: must be an array")
    return items


def validate_heartbeats(body: bytes, max_batch: int) -> tuple[list[str], list[datetime]]:
    """Parse a heartbeat batch into parallel (account_ids, ats) lists, or raise a 400.

    Every distinct ``at`` string is checked and parsed once per batch: a worker stamps a batch
    with one or a few instants, and the RFC 3339 check and parse per item were two thirds of
    the time spent on a batch.
    """
    fast = fastjson.heartbeat_fields(body)  # msgspec, when installed: strings only
    if fast is not None:
        found, raws = fast
        _check_batch_size(len(found), max_batch)
    else:
        items = _decode_body(body, "heartbeats", fast=True)
        _check_batch_size(len(items), max_batch)
        found, raws = _heartbeat_items(items)
    ids: list[str] = []
    ats: list[datetime] = []
    add_id = ids.append
    add_at = ats.append
    stamps: dict[str, datetime] = {}
    for i, (aid, raw) in enumerate(zip(found, raws, strict=True)):
        # The common case is inlined (no helper calls); anything unusual takes the slow path.
        if type(aid) is not str or not aid or len(aid) > MAX_ACCOUNT_ID_CHARS or not aid.isascii():
            aid = _check_account_id(aid, f"heartbeats[{i}].account_id")
        if type(raw) is str:
            at = stamps.get(raw)
            if at is None:
                at = stamps[raw] = _heartbeat_at(raw, i)
        else:
            at = _heartbeat_at(raw, i)  # raises: only a string is a timestamp
        add_id(aid)
        add_at(at)
    return ids, ats


def _check_batch_size(n: int, max_batch: int) -> None:
    if n > max_batch:
        raise BatchRejected(
            413, "payload_too_large", f"heartbeats: {n} items, at most {max_batch} per batch"
        )


def _heartbeat_items(items: list[Any]) -> tuple[list[Any], list[Any]]:
    """The ``account_id`` and ``at`` values of a decoded batch's items, unchecked (None where
    missing); a 400 for the first item that is not an object."""
    found: list[Any] = []
    raws: list[Any] = []
    for i, item in enumerate(items):
        if type(item) is not dict:
            _reject(f"heartbeats[{i}]", "must be an object")
        found.append(item.get("account_id"))
        raws.append(item.get("at"))
    return found, raws


def _heartbeat_at(raw: object, i: int) -> datetime:
    if type(raw) is str and raw[-1:] == "Z" and _RFC3339.fullmatch(raw) is not None:
        try:
            return datetime.fromisoformat(raw)
        except ValueError:
            _reject(f"heartbeats[{i}].at", "not a valid date-time")
    parsed = parse_rfc3339(raw)
    if parsed is None:
        _reject(f"heartbeats[{i}].at", "must be an RFC 3339 timestamp with offset")
    return parsed


def _check_event_data(event: str, data: dict[str, Any], where: str) -> None:
    # The fields the engine stores are checked here so that a bad one is the worker's 400, not
    # a database error later (login_qr_code and error_message are TEXT columns).
    if event == "qr_ready":
        qr = data.get("qr_code")
        if type(qr) is not str or not qr:
            _reject(f"{where}.data.qr_code", "qr_ready needs a non-empty string")
    elif event == "fail" and "error" in data and type(data["error"]) is not str:
        _reject(f"{where}.data.error", "must be a string")
    try:
        encoded = json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        _reject(f"{where}.data", "contains an unpaired UTF-16 surrogate")
    if len(encoded) > MAX_TEXT_BYTES:
        _reject(f"{where}.data", f"larger than {MAX_TEXT_BYTES} bytes once encoded")


def validate_events(body: bytes, max_batch: int) -> list[WorkerEvent]:
    """Parse an event batch, or raise a 400."""
    items = _decode_body(body, "events")
    if len(items) > max_batch:
        raise BatchRejected(
            413, "payload_too_large", f"events: {len(items)} items, at most {max_batch} per batch"
        )
    events: list[WorkerEvent] = []
    for i, item in enumerate(items):
        where = f"events[{i}]"
        if type(item) is not dict:
            _reject(where, "must be an object")
        aid = _check_account_id(item.get("account_id"), f"{where}.account_id")
        event = item.get("event")
        if type(event) is not str or event not in WORKER_EVENTS:
            _reject(f"{where}.event", f"must be one of {', '.join(sorted(WORKER_EVENTS))}")
        data = item.get("data", {})
        if type(data) is not dict:
            _reject(f"{where}.data", "must be an object")
        _check_event_data(event, data, where)
        at = parse_rfc3339(item.get("at"))
        if at is None:
            _reject(f"{where}.at", "must be an RFC 3339 timestamp with offset")
        events.append(WorkerEvent(account_id=aid, event=event, data=data, at=at))
    return events


def _results_response(results: list[ItemResult], expected: int) -> web.Response:
    if len(results) != expected:
        # A sink bug, not bad input: misaligned results would tell the worker lies.
        raise RuntimeError(f"sink returned {len(results)} results for {expected} items")
    applied = results.count(_APPLIED)
    # ItemResult is a StrEnum, so both encoders write the plain strings.
    body = fastjson.dumps({"results": results, "applied": applied})
    return web.Response(body=body, content_type="application/json")


def _overloaded(exc: Overloaded) -> web.Response:
    # Retry-After is delta-seconds, an integer: round up so the worker never comes back early.
    seconds = max(1, math.ceil(exc.retry_after))
    return error_response(
        503, "overloaded", exc.reason or "overloaded", headers={"Retry-After": str(seconds)}
    )


_HTTP_CODES: Final = {
    404: ("not_found", "no such endpoint"),
    405: ("method_not_allowed", "method not allowed on this endpoint"),
    400: ("invalid_request", "bad request"),
    408: ("request_timeout", "request not received in time"),
    413: ("payload_too_large", "request body too large"),
}

# The app's request timeout, read by `IngestServer` to bound slow headers the same way.
REQUEST_TIMEOUT_KEY: Final = web.AppKey("request_timeout", float)


def json_errors_middleware(max_body_bytes: int) -> Middleware:
    """Turn aiohttp's own HTTP errors (404, 405, 413, ...) into the protocol's JSON errors.

    This is the boundary of the listener: an unexpected exception is logged once with its
    traceback and becomes a JSON 500, so a worker always gets a parseable reply.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code, message = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
            if exc.status == 413:
                message = f"request body larger than {max_body_bytes} bytes"
            elif exc.status in (400, 408) and exc.text:
                message = exc.text
            headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
            response = error_response(exc.status, code, message, headers=headers)
            if exc.status == 408:
                response.force_close()  # a client this slow gets no second request on it
            return response
        except Exception:
            log.exception("HTTP request failed: %s %s", request.method, request.path)
            return error_response(500, "internal_error", "internal error; see the daemon's log")

    return middleware


def make_ingest_app(
    sink: IngestSink,
    *,
    token: str,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    lane: AdminLane | None = None,
) -> web.Application:
    """The ingest application: ``POST /v1/heartbeats``, ``POST /v1/events``, ``GET /healthz``.

    `request_timeout` ([ingest] request_timeout) bounds how long a body may take to arrive
    (408 ``request_timeout``); `IngestServer` applies it to request headers too. `lane`: the
    daemon's `AdminLane`; heartbeat batches give way to admin requests step by step.
    """
    if not token:
        raise ValueError("the ingest token must not be empty")
    if max_batch < 1 or max_body_bytes < 1:
        raise ValueError("max_batch and max_body_bytes must be positive")
    if not request_timeout > 0:
        raise ValueError("request_timeout must be positive")
    expected = token.encode("utf-8")

    def authorized(request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Bytes, not str: compare_digest refuses non-ASCII str, and a header may hold any byte.
        given = credentials.strip().encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, expected)

    async def read_body(request: web.Request) -> bytes:
        # Refuse a declared oversize body before reading it; chunked bodies are cut off by
        # client_max_size inside request.read() (raising HTTPRequestEntityTooLarge).
        if request.content_length is not None and request.content_length > max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_body_bytes, request.content_length)
        try:
            # The clock starts when the headers are complete (slow headers: `IngestServer`).
            async with asyncio.timeout(request_timeout):
                return await request.read()
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                text=f"request body not received within {request_timeout:g}s"
            ) from None
        except ConnectionResetError:
            # The client hung up mid-body: not our failure (no traceback in the log), and
            # nobody is left to read the answer.
            raise web.HTTPBadRequest(
                text="connection closed before the body was complete"
            ) from None

    def unauthorized() -> web.Response:
        return error_response(
            401,
            "unauthorized",
            "missing or wrong bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="accountd-ingest"'},
        )

    # Fairness under a flood: one heartbeat batch does its CPU work at a time, and applies its
    # items in slices of `INGEST_SLICE` with a yield to the event loop between them. Without
    # this, every connection's batch became ready in the same loop iteration and each ran for
    # ~10 ms at a stretch, so anything else waiting on I/O (the heartbeat flush's statements,
    # accountctl, /metrics) waited that long per round trip, times the number of connections:
    # a 100,000-row flush took 10 s. Now they wait for one slice. Parsing and validation stay
    # one step (~4 ms for 10,000 items): the parsed JSON objects are dropped right after it,
    # before they can live through collections into the old generation. The lock is FIFO.
    # Each CPU step also asks the admin lane first: an accountctl request in flight goes ahead
    # of it, within the lane's bounds (accountd/daemon/priority.py).
    turn = asyncio.Lock()
    lanes = lane if lane is not None else AdminLane()

    async def heartbeats(request: web.Request) -> web.Response:
        if not authorized(request):
            return unauthorized()
        body = await read_body(request)
        async with turn:
            try:
                async with lanes.bulk_step():
                    ids, ats = validate_heartbeats(body, max_batch)
            except BatchRejected as exc:
                return error_response(exc.status, exc.code, exc.message)
            # Validated as a whole above; applied slice by slice (heartbeats are independent,
            # and a retried batch only repeats what it already did).
            results: list[ItemResult] = []
            try:
                for start in range(0, len(ids), INGEST_SLICE):
                    if start:
                        await asyncio.sleep(0)
                    stop = start + INGEST_SLICE
                    async with lanes.bulk_step():
                        results += sink.record_heartbeats(ids[start:stop], ats[start:stop])
            except Overloaded as exc:
                return _overloaded(exc)
        return _results_response(results, len(ids))

    async def events(request: web.Request) -> web.Response:
        if not authorized(request):
            return unauthorized()
        body = await read_body(request)
        try:
            batch = validate_events(body, max_batch)
        except BatchRejected as exc:
            return error_response(exc.status, exc.code, exc.message)
        try:
            results = await sink.apply_events(batch)
        except Overloaded as exc:
            return _overloaded(exc)
        return _results_response(results, len(batch))

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(
        client_max_size=max_body_bytes, middlewares=[json_errors_middleware(max_body_bytes)]
    )
    app[REQUEST_TIMEOUT_KEY] = float(request_timeout)
    app.router.add_post("/v1/heartbeats", heartbeats)
    app.router.add_post("/v1/events", events)
    app.router.add_get("/healthz", healthz)
    return app


class IngestServer:
    """Runs an ingest application on a TCP listener (loopback by default)."""

    def __init__(self, app: web.Application, *, shutdown_timeout: float = 5.0) -> None:
        self._app = app
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 8470) -> int:
        """Bind and serve; returns the bound port (useful with ``port=0``)."""
        if self._runner is not None:
            raise RuntimeError("ingest server already started")
        # access_log=None: at thousands of batches a minute the access log is pure cost; the
        # metrics carry the counts.
        timeout = self._app.get(REQUEST_TIMEOUT_KEY, DEFAULT_REQUEST_TIMEOUT)
        runner = web.AppRunner(
            self._app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=self._shutdown_timeout,
            # aiohttp's keep-alive timer runs from the connection's start (or its last answer)
            # until a complete request head has arrived, and its default is an hour: as the
            # request timeout it also closes a connection whose headers trickle in.
            keepalive_timeout=timeout,
            lingering_time=min(MAX_LINGER, timeout),
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        return bound_port(runner)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the shutdown timeout, close."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


def bound_port(runner: web.BaseRunner) -> int:
    """The TCP port the runner's first site listens on."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("runner has no TCP address")
