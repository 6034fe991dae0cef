"""The control API: HTTP/JSON on a unix socket, for `accountctl` (docs/control-api.md).

Every request passes one middleware, which is the boundary of this listener: it reads the
peer's credentials from the kernel (`accountd.daemon.control_socket`), refuses peers without the
role the method needs (GET: read-only, POST: admin), turns every error into the one error body
``{"error": {"code", "message"}}`` with a stable code (in the manner of Supervisor's xmlrpc
``Faults``: one exception type, `ControlError`, carrying the code), and logs one line per request
with the peer's uid. Malformed input is a 4xx with a code, never a 500; only a bug is
``internal`` (500), logged once with its traceback.

Status changes go through the one door like every other change (``force``, ``recover``), with the
operator recorded as ``uid:<peer uid>``; each admin action on an account also leaves an
``operation_logs`` row in ``saas_unified_core``, written through the daemon's outbox (retried,
never silently dropped). Read endpoints answer from memory, plus the database for ``show`` and
``history``. Secrets (``wework_secret``, QR codes, passwords in JSON columns) never leave.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from accountd.adapters.db import DATABASE_KEYS, Databases
from accountd.adapters.repository import history_rows, utcnow
from accountd.adapters.schema import operation_logs
from accountd.daemon.alerts import AlertManager
from accountd.daemon.clock import Clock
from accountd.daemon.control_socket import (
    Acl,
    Peer,
    Role,
    bind_control_socket,
    inode_of,
    peer_of,
    role_of,
    unlink_if_ours,
)
from accountd.daemon.control_views import (
    BAD_REQUEST,
    ERROR_STATUS,
    ILLEGAL_TRANSITION,
    INTERNAL,
    INVALID_CONFIG,
    METHOD_NOT_ALLOWED,
    NO_SUCH_ENDPOINT,
    NOT_FOUND,
    PAYLOAD_TOO_LARGE,
    PERMISSION_DENIED,
    UNAVAILABLE,
    details,
    error_response,
    fail,
    first_line,
    force_desc,
    iso,
    json_body,
    json_ok,
    parse_int,
    parse_reason,
    parse_state,
    preview,
    refusal,
    scrub,
    show_rows,
    summary,
)
from accountd.daemon.door import Change, Planned
from accountd.daemon.outbox import Outbox
from accountd.daemon.priority import AdminLane
from accountd.daemon.protocol import ItemResult
from accountd.daemon.side_loop import MainLoopHold, on_main
from accountd.daemon.supervisor import Supervisor
from accountd.errors import ConfigError, ControlError, DatabaseUnavailable, Overloaded
from accountd.ids import uuid7
from accountd.logs import redact
from accountd.settings import ControlSettings, load_settings
from accountd.statemachine import State, Trigger
from accountd.statemachine.account import Account

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
# aiohttp bounds neither how long a body may take to arrive nor (beyond an hour of keep-alive)
# how long headers may trickle in; a client dribbling bytes would hold a handler forever.
REQUEST_TIMEOUT = 10.0
REQUEST_TIMEOUT_CODE = "request_timeout"  # 408; accountctl exit 1 (docs/control-api.md)
COMMIT_TIMEOUT = 30.0
DB_TIMEOUT = 5.0
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
SHOW_HISTORY = 20
_ERROR_HTTP = {404: NO_SUCH_ENDPOINT, 405: METHOD_NOT_ALLOWED, 413: PAYLOAD_TOO_LARGE}


class ControlHost(Protocol):
    """What the control API needs from the daemon (`accountd.daemon.app.Daemon`)."""

    supervisor: Supervisor | None
    outbox: Outbox | None
    alerts: AlertManager | None
    databases: Databases | None
    ready: bool
    started_at: float
    clock: Clock
    config_path: Path | None

    async def reload(self) -> list[str]: ...


# --------------------------------------------------------------------------- the server


class ControlServer:
    """Serves the control API on ``[control] socket``; `start` after the supervisor is loaded."""

    def __init__(
        self,
        host: ControlHost,
        settings: ControlSettings,
        *,
        version: str | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
        lane: AdminLane | None = None,
        main_loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """``main_loop``: where the supervisor runs, when this server is started on another
        loop (the side loop, `accountd.daemon.side_loop`); None when both are the same."""
        self.host = host
        self.lane = lane
        self.main_loop = main_loop
        self.settings = settings
        self.request_timeout = request_timeout
        self.path = Path(settings.socket)
        self.version = version or _package_version()
        self._runner: web.AppRunner | None = None
        self._inode: tuple[int, int] | None = None
        self._reads: AsyncEngine | None = None
        # Held while show/history run on the side loop; its counts are metrics (app.py).
        self.hold = MainLoopHold(main_loop) if main_loop is not None else None

    async def start(self) -> Path:
        """Bind and serve, on the loop that runs this (the side loop in the daemon)."""
        sock = await bind_control_socket(self.path, group=self.settings.group)
        self._inode = inode_of(self.path)
        dbs = self.host.databases
        if self.main_loop is not None and dbs is not None:
            # The main loop's engines cannot be used from here: this loop reads on its own.
            self._reads = dbs.read_engine()
        app = make_control_app(
            self.host,
            Acl.from_settings(self.settings),
            version=self.version,
            request_timeout=self.request_timeout,
            lane=self.lane,
            main_loop=self.main_loop,
            hold=self.hold,
            reads=self._reads,
        )
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=5.0,
            # The keep-alive timer runs until a complete request head has arrived: it is what
            # closes a connection whose headers trickle in (aiohttp's default is an hour).
            keepalive_timeout=self.request_timeout,
            lingering_time=min(5.0, self.request_timeout),
        )
        try:
            await runner.setup()
            # A SockSite over the socket we bound ourselves (not UnixSite, which binds by path
            # and would silently replace whatever socket file is there, live or not).
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            unlink_if_ours(self.path, self._inode)
            await self._dispose_reads()
            raise
        self._runner = runner
        log.info("control socket listening on %s", self.path)
        return self.path

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        unlink_if_ours(self.path, self._inode)
        self._inode = None
        await self._dispose_reads()

    async def _dispose_reads(self) -> None:
        reads, self._reads = self._reads, None
        if reads is not None:
            await reads.dispose()


def make_control_app(
    host: ControlHost,
    acl: Acl,
    *,
    version: str,
    request_timeout: float = REQUEST_TIMEOUT,
    lane: AdminLane | None = None,
    main_loop: asyncio.AbstractEventLoop | None = None,
    hold: MainLoopHold | None = None,
    reads: AsyncEngine | None = None,
) -> web.Application:
    """The control API.

    `lane`: the daemon's `AdminLane`; an admitted request goes ahead of heartbeat batches.
    `main_loop`: the supervisor's loop when the app is served by another one (the side loop).
    `show` and `history` then run where the app runs, reading the database through `reads`
    (an engine of that loop) and the account under `Supervisor.view_lock`: they answer
    without waiting for a turn of the busy main loop, and with `hold` (of `main_loop`) the
    main loop waits while they run, so they do not wait for its thread's GIL either. Every
    other endpoint walks or changes the daemon's state, so it runs on the main loop, admitted
    to the lane there.
    """
    api = _Api(host, version, reads)
    admin_lane = lane or AdminLane()

    def on_main_loop(handler: Handler) -> Handler:
        async def admitted(request: web.Request) -> web.StreamResponse:
            # Runs on the main loop: the lane is one of its objects.
            with admin_lane.admit():
                return await handler(request)

        async def dispatch(request: web.Request) -> web.StreamResponse:
            return await on_main(main_loop, admitted(request))

        return dispatch

    def held(handler: Handler) -> Handler:
        if hold is None:
            return handler

        async def holding(request: web.Request) -> web.StreamResponse:
            with hold():
                return await handler(request)

        return holding

    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[_boundary(acl, request_timeout)],
    )
    app.router.add_get("/v1/status", on_main_loop(api.status))
    app.router.add_get("/v1/accounts", on_main_loop(api.list_accounts))
    app.router.add_get("/v1/accounts/{ref}", held(api.show))
    app.router.add_get("/v1/accounts/{ref}/history", held(api.history))
    app.router.add_post("/v1/accounts/{ref}/force", on_main_loop(api.force))
    app.router.add_post("/v1/accounts/{ref}/recover", on_main_loop(api.recover))
    app.router.add_post("/v1/accounts/{ref}/pause", on_main_loop(api.pause))
    app.router.add_post("/v1/accounts/{ref}/resume", on_main_loop(api.resume))
    app.router.add_post("/v1/reload", on_main_loop(api.reload))
    return app


def _peer(request: web.Request) -> Peer | None:
    transport = request.transport
    return peer_of(transport.get_extra_info("socket")) if transport is not None else None


def _boundary(acl: Acl, request_timeout: float) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        peer = _peer(request)
        code: str | None = None
        try:
            if peer is None:
                raise fail(PERMISSION_DENIED, "peer credentials unavailable")
            needed = Role.readonly if request.method in ("GET", "HEAD") else Role.admin
            if role_of(peer, acl) < needed:
                what = "use the control socket" if needed is Role.readonly else "change anything"
                raise fail(PERMISSION_DENIED, f"uid {peer.uid} may not {what}")
            if request.can_read_body:
                await _read_body(request, request_timeout)  # cached for the handler's read()
            response = await handler(request)
        except ControlError as exc:
            code = exc.code
            response = error_response(exc.code, exc.message, exc.http_status)
            if exc.code == REQUEST_TIMEOUT_CODE:
                response.force_close()  # a client this slow gets no second request on it
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _ERROR_HTTP.get(exc.status, BAD_REQUEST)
            message = exc.reason
            if exc.status == 413:
                message = f"request body larger than {MAX_BODY_BYTES} bytes"
            response = error_response(code, message, exc.status)
        except Exception:  # boundary: a bug becomes `internal`, logged once with its traceback
            log.exception("control: %s %s failed", request.method, request.path)
            code = INTERNAL
            response = error_response(INTERNAL, "internal error; see the daemon's log")
        elapsed = (time.perf_counter() - started) * 1000
        uid = peer.uid if peer is not None else "?"
        pid = peer.pid if peer is not None else "?"
        level = logging.WARNING if code == PERMISSION_DENIED else logging.INFO
        log.log(
            level,
            "control: uid=%s pid=%s %s %s -> %d%s (%.1f ms)",
            uid,
            pid,
            request.method,
            request.path,
            response.status,
            f" {code}" if code else "",
            elapsed,
        )
        return response

    return middleware


async def _read_body(request: web.Request, limit: float) -> None:
    try:
        async with asyncio.timeout(limit):
            await request.read()
    except TimeoutError:
        raise ControlError(
            REQUEST_TIMEOUT_CODE,
            f"request body not received within {limit:g}s",
            http_status=408,
        ) from None
    except ConnectionResetError:
        # The client hung up mid-body: not our failure (one log line, no traceback).
        raise fail(BAD_REQUEST, "connection closed before the body was complete") from None


# --------------------------------------------------------------------------- endpoints


class _Api:
    def __init__(self, host: ControlHost, version: str, reads: AsyncEngine | None) -> None:
        self.host = host
        self.version = version
        self._reads = reads

    def _reads_engine(self, sup: Supervisor) -> AsyncEngine:
        return self._reads if self._reads is not None else sup.repo.reads

    # -- helpers --------------------------------------------------------------------------

    def _sup(self) -> Supervisor:
        sup = self.host.supervisor
        if sup is None or not sup.loaded:
            raise fail(UNAVAILABLE, "accountd is starting; try again in a moment")
        return sup

    def _account(self, request: web.Request) -> tuple[Supervisor, Account]:
        sup = self._sup()
        ref = request.match_info["ref"]
        acc = sup.find(ref)
        if acc is None:
            raise fail(NOT_FOUND, f"no account with id or wework_guid {ref!r}")
        return sup, acc

    def _ready_for_changes(self) -> None:
        if not self.host.ready:
            raise fail(UNAVAILABLE, "accountd is not ready (starting or stopping)")

    async def _commit(self, sup: Supervisor, change: Change) -> ItemResult:
        try:
            fut = sup.door.fire(change)
        except Overloaded as exc:
            raise fail(UNAVAILABLE, exc.reason) from None
        try:
            # shield: a client that hangs up must not cancel a change the door already holds.
            return await asyncio.wait_for(asyncio.shield(fut), COMMIT_TIMEOUT)
        except TimeoutError:
            raise fail(
                UNAVAILABLE,
                f"not committed within {COMMIT_TIMEOUT:g}s (database slow or down); it stays "
                "queued and may still apply: check with `accountctl show`",
            ) from None
        except Overloaded as exc:
            raise fail(UNAVAILABLE, exc.reason) from None

    def _audit(
        self,
        request: web.Request,
        acc: Account,
        operation: str,
        description: str,
        request_data: Mapping[str, Any],
        error: ControlError | None,
    ) -> None:
        """One ``operation_logs`` row (saas_unified_core) per admin action, via the outbox."""
        outbox = self.host.outbox
        if outbox is None:
            log.error("control: no outbox; operation log of %s for %s lost", operation, acc.id)
            return
        agent = request.headers.get("User-Agent")
        peer = _peer(request)
        operator = peer.operator_id if peer is not None else None
        row = {
            "id": uuid7(),
            "tenant_id": acc.tenant_id,
            "user_id": None,  # the operator is a unix uid, not a platform user
            "operation_type": operation,
            "resource_type": "wework_account",
            "resource_id": acc.id,
            "operation_desc": f"{description} (by {operator})",
            "request_data": {**request_data, "operator_id": operator},
            "response_data": {"code": error.code} if error else {"result": "applied"},
            "ip_address": None,
            "user_agent": agent[:500] if agent else None,
            "status": "failed" if error else "success",
            "error_message": error.message if error else None,
            # Set here, not by the server default: it is part of the primary key (partitioned
            # table), so an outbox retry must carry the same value to be seen as a duplicate.
            "created_at": utcnow().replace(microsecond=0),
        }
        outbox.insert("core", operation_logs, [row])

    # -- read-only ------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        host = self.host
        sup = host.supervisor
        now = host.clock.now()
        body: dict[str, Any] = {
            "version": self.version,
            "pid": os.getpid(),
            "ready": host.ready,
            "started_at": iso(host.started_at),
            "uptime_seconds": round(max(0.0, now - host.started_at), 3),
            "databases": await self._db_health(),
        }
        if sup is not None:
            body.update(
                accounts=len(sup.accounts),
                states=sup.snapshot_counts(),
                paused=sum(1 for a in sup.accounts.values() if a.paused),
                recoveries_in_flight=sup.counts[State.recovering],
                door={
                    "pending": sup.door.pending,
                    "committed": sup.door.stats.committed,
                    "db_healthy": sup.door.db_healthy,
                },
                heartbeats_received=sup.heartbeats_received,
            )
        if host.outbox is not None:
            body["outbox"] = {
                "pending": host.outbox.pending(),
                "healthy": dict(host.outbox.healthy),
                "dropped": host.outbox.dropped,
            }
        return json_ok(body)

    async def _db_health(self) -> dict[str, dict[str, Any]]:
        dbs = self.host.databases
        if dbs is None:
            return {}

        async def one(key: str) -> dict[str, Any]:
            started = time.perf_counter()
            try:
                await asyncio.wait_for(dbs.ping(key), DB_TIMEOUT)
            except DatabaseUnavailable as exc:
                return {"up": False, "error": redact(exc.detail)}
            except TimeoutError:
                return {"up": False, "error": f"no answer within {DB_TIMEOUT:g}s"}
            return {"up": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}

        results = await asyncio.gather(*(one(key) for key in DATABASE_KEYS))
        return dict(zip(DATABASE_KEYS, results, strict=True))

    async def list_accounts(self, request: web.Request) -> web.Response:
        sup = self._sup()
        q = request.query
        state = parse_state(q["state"], "state") if "state" in q else None
        tenant = q.get("tenant") or None
        limit = parse_int(q.get("limit"), "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        after = q.get("after", "")
        ids = sorted(
            acc.id
            for acc in sup.accounts.values()
            if (state is None or acc.status is state)
            and (tenant is None or acc.tenant_id == tenant)
        )
        start = bisect.bisect_right(ids, after) if after else 0
        page = ids[start : start + limit]
        now = sup.clock.now()
        more = start + limit < len(ids)
        return json_ok(
            {
                "accounts": [summary(sup.accounts[i], now) for i in page],
                "total": len(ids),
                "next": page[-1] if more and page else None,
            }
        )

    # show and history may run on the side loop (`make_control_app`).

    async def show(self, request: web.Request) -> web.Response:
        sup, acc = self._account(request)
        with sup.view_lock:
            view = details(sup, acc, sup.clock.now())
        body: dict[str, Any] = {"account": view}
        reads = self._reads_engine(sup)
        try:
            row, supervision, history = await asyncio.wait_for(
                show_rows(reads, acc.id, SHOW_HISTORY), DB_TIMEOUT
            )
        except (OperationalError, DBAPIError, OSError, TimeoutError) as exc:
            # What the daemon knows is still worth showing while the database is away.
            body["database_error"] = redact(first_line(exc))
        else:
            body.update(row=row, supervision=supervision, history=[scrub(h) for h in history])
        return json_ok(body)

    async def history(self, request: web.Request) -> web.Response:
        sup, acc = self._account(request)
        limit = parse_int(request.query.get("limit"), "limit", 50, 1, MAX_LIMIT)
        try:
            rows = await asyncio.wait_for(
                history_rows(self._reads_engine(sup), acc.id, limit), DB_TIMEOUT
            )
        except (OperationalError, DBAPIError, OSError, TimeoutError) as exc:
            raise fail(UNAVAILABLE, f"database: {redact(first_line(exc))}") from None
        return json_ok({"account_id": acc.id, "history": [scrub(r) for r in rows]})

    # -- admin ----------------------------------------------------------------------------

    async def force(self, request: web.Request) -> web.Response:
        body = await json_body(request, required={"state", "reason"}, optional={"dry_run"})
        target = parse_state(body["state"], "state")
        reason = parse_reason(body["reason"])
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise fail(BAD_REQUEST, "dry_run: must be true or false")
        sup, acc = self._account(request)
        peer = _peer(request)
        assert peer is not None  # the middleware refused the request otherwise
        old = acc.status
        # A compare-and-set on the state the admin's request found: if a worker event moves the
        # account while the force waits in the door, the force is refused as `conflict` (look
        # again) instead of applying from a state nobody saw, and the answer's "from" is true.
        change = Change(
            acc.id,
            Trigger.force,
            reason,
            target=target,
            operator_id=peer.operator_id,
            expect_state=old,
        )
        answer: dict[str, Any] = {
            "account_id": acc.id,
            "from": str(old),
            "to": str(target),
            "operator_id": peer.operator_id,
            "dry_run": dry_run,
        }
        if target is old:
            same = fail(ILLEGAL_TRANSITION, f"account {acc.id} is already {old}")
            if not dry_run:
                desc = force_desc(old, target, reason)
                self._audit(request, acc, "account.force", desc, body, same)
            raise same
        if dry_run:
            # What the door would decide, without queuing anything: nothing is written.
            planned = sup.plan(acc, change, target, sup.clock.now())
            if isinstance(planned, Planned):
                answer.update(preview(planned))
            answer["applied"] = False
            return json_ok(answer)
        self._ready_for_changes()
        error = refusal(await self._commit(sup, change), acc, f"force to {target}")
        self._audit(request, acc, "account.force", force_desc(old, target, reason), body, error)
        if error is not None:
            raise error
        answer["applied"] = True
        answer["account"] = summary(acc, sup.clock.now())
        return json_ok(answer)

    async def recover(self, request: web.Request) -> web.Response:
        await json_body(request, required=set(), optional=set())
        sup, acc = self._account(request)
        peer = _peer(request)
        assert peer is not None
        old = acc.status
        description = f"recover from {old} (bypassing backoff and rate limit)"
        if old not in (State.offline, State.error):
            illegal = fail(
                ILLEGAL_TRANSITION,
                f"recover is possible from offline or error; account {acc.id} is {old}",
            )
            self._audit(request, acc, "account.recover", description, {}, illegal)
            raise illegal
        self._ready_for_changes()
        change = Change(
            acc.id,
            Trigger.recover,
            f"admin {peer.operator_id} asked to recover now",
            # An admin's recovery is a deliberate fresh start: a new attempt and QR budget
            # (the automatic retry from error keeps the counters; see RecoveryPolicy).
            data={"reset_attempts": True},
            operator_id=peer.operator_id,
            expect_state=old,
        )
        error = refusal(await self._commit(sup, change), acc, "recover")
        self._audit(request, acc, "account.recover", description, {}, error)
        if error is not None:
            raise error
        return json_ok(
            {"account_id": acc.id, "from": str(old), "to": str(acc.status), "applied": True}
        )

    async def pause(self, request: web.Request) -> web.Response:
        body = await json_body(request, required=set(), optional={"reason"})
        sup, acc = self._account(request)
        peer = _peer(request)
        assert peer is not None
        if "reason" in body:
            reason: str | None = parse_reason(body["reason"])
        elif acc.paused:
            reason = sup.paused_reasons.get(acc.id)  # pausing again keeps the first reason
        else:
            reason = f"paused by {peer.operator_id}"
        return await self._set_paused(request, sup, acc, True, reason, body)

    async def resume(self, request: web.Request) -> web.Response:
        body = await json_body(request, required=set(), optional=set())
        sup, acc = self._account(request)
        return await self._set_paused(request, sup, acc, False, None, body)

    async def _set_paused(
        self,
        request: web.Request,
        sup: Supervisor,
        acc: Account,
        paused: bool,
        reason: str | None,
        body: Mapping[str, Any],
    ) -> web.Response:
        self._ready_for_changes()
        operation = "account.pause" if paused else "account.resume"
        try:
            # No timeout of ours: cancelling halfway would leave memory and database apart.
            changed = await sup.set_paused(acc, paused, reason)
        except (OperationalError, DBAPIError, OSError) as exc:
            error = fail(UNAVAILABLE, f"database: {redact(first_line(exc))}")
            self._audit(request, acc, operation, operation, body, error)
            raise error from None
        if changed:
            self._audit(request, acc, operation, reason or operation, body, None)
            if not paused and self.host.alerts is not None:
                # An account that failed while its alerts were muted gets its alert now.
                self.host.alerts.refresh_account(acc)
        return json_ok(
            {
                "account_id": acc.id,
                "paused": acc.paused,
                "changed": changed,
                "reason": reason,
                "account": summary(acc, sup.clock.now()),
            }
        )

    async def reload(self, request: web.Request) -> web.Response:
        await json_body(request, required=set(), optional=set())
        # Validate first, so a broken file is an error here (the daemon keeps its config
        # either way; SIGHUP would only log it).
        try:
            await asyncio.to_thread(load_settings, self.host.config_path)
        except ConfigError as exc:  # unreadable files included: load_settings names them
            raise fail(INVALID_CONFIG, redact(str(exc))) from None
        notes = await self.host.reload()
        return json_ok({"reloaded": True, "notes": [redact(n) for n in notes]})


def _package_version() -> str:
    try:
        return metadata.version("accountd")
    except metadata.PackageNotFoundError:
        return "unknown"


__all__ = [
    "ERROR_STATUS",
    "ControlHost",
    "ControlServer",
    "make_control_app",
]
