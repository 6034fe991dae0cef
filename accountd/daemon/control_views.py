"""The control API's vocabulary: error codes, request parsing and the JSON it answers with.

Kept apart from `accountd.daemon.control` (the server and its endpoints) so each stays small.
The stable error codes live here; docs/control-api.md lists them with their HTTP statuses and
`accountctl` maps them to exit statuses. Everything that leaves the daemon passes `scrub` or is
built from memory without secret fields: ``wework_secret`` and QR codes never leave.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from accountd.adapters.db import fetch_all
from accountd.adapters.schema import account_status_logs, accountd_supervision, wework_accounts
from accountd.daemon.door import Planned
from accountd.daemon.protocol import ItemResult
from accountd.daemon.supervisor import Supervisor
from accountd.errors import ControlError
from accountd.logs import redact
from accountd.statemachine import State
from accountd.statemachine.account import Account

# Stable error codes (docs/control-api.md lists them with their HTTP statuses; accountctl maps
# them to exit statuses). Never rename one: scripts match on them.
BAD_REQUEST: Final = "bad_request"
PERMISSION_DENIED: Final = "permission_denied"
NOT_FOUND: Final = "not_found"
NO_SUCH_ENDPOINT: Final = "no_such_endpoint"
METHOD_NOT_ALLOWED: Final = "method_not_allowed"
PAYLOAD_TOO_LARGE: Final = "payload_too_large"
ILLEGAL_TRANSITION: Final = "illegal_transition"
CONFLICT: Final = "conflict"
INVALID_CONFIG: Final = "invalid_config"
UNAVAILABLE: Final = "unavailable"
INTERNAL: Final = "internal"

ERROR_STATUS: Final[Mapping[str, int]] = {
    BAD_REQUEST: 400,
    PERMISSION_DENIED: 403,
    NOT_FOUND: 404,
    NO_SUCH_ENDPOINT: 404,
    METHOD_NOT_ALLOWED: 405,
    ILLEGAL_TRANSITION: 409,
    CONFLICT: 409,
    PAYLOAD_TOO_LARGE: 413,
    INVALID_CONFIG: 422,
    UNAVAILABLE: 503,
    INTERNAL: 500,
}

MAX_REASON = 200  # change_reason is VARCHAR(255) and starts with "force: "

# wework_accounts columns never shown, not even masked; `show` says only whether they are set.
SECRET_COLUMNS: Final = frozenset({"wework_secret", "login_qr_code"})
# Keys inside JSON columns (proxy_config, device_info) whose values are masked.
_SECRET_KEY = re.compile(r"pass|secret|token|key|cookie|credential|auth", re.IGNORECASE)


def fail(code: str, message: str) -> ControlError:
    return ControlError(code, message, http_status=ERROR_STATUS[code])


def error_response(code: str, message: str, status: int | None = None) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}},
        status=status or ERROR_STATUS.get(code, 400),
    )


# --------------------------------------------------------------------------- parsing


async def json_body(
    request: web.Request, *, required: set[str], optional: set[str]
) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        data: Any = {}
    else:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSON/UTF-8 errors, digit limit, nesting
            raise fail(BAD_REQUEST, f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise fail(BAD_REQUEST, "body must be a JSON object")
    missing = sorted(required - data.keys())
    if missing:
        raise fail(BAD_REQUEST, f"missing field(s): {', '.join(missing)}")
    unknown = sorted(data.keys() - required - optional)
    if unknown:
        raise fail(BAD_REQUEST, f"unknown field(s): {', '.join(unknown)}")
    return data


def parse_state(value: Any, name: str) -> State:
    if not isinstance(value, str) or value not in State.__members__:
        raise fail(BAD_REQUEST, f"{name}: must be one of {', '.join(s.value for s in State)}")
    return State(value)


def parse_reason(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise fail(BAD_REQUEST, "reason: a non-empty text is required")
    text = " ".join(value.split())
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # "\ud800" in the JSON: no database column can store it
        raise fail(BAD_REQUEST, "reason: contains an unpaired UTF-16 surrogate") from None
    if len(text) > MAX_REASON:
        raise fail(BAD_REQUEST, f"reason: at most {MAX_REASON} characters")
    return text


def parse_int(value: str | None, name: str, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise fail(BAD_REQUEST, f"{name}: must be a whole number from {low} to {high}")
    return int(value)


def refusal(result: ItemResult, acc: Account, what: str) -> ControlError | None:
    if result is ItemResult.APPLIED:
        return None
    if result is ItemResult.UNKNOWN_ACCOUNT:
        return fail(NOT_FOUND, f"account {acc.id} is no longer supervised")
    if result is ItemResult.ILLEGAL:
        return fail(ILLEGAL_TRANSITION, f"{what} is not allowed from {acc.status}")
    return fail(CONFLICT, f"{what}: account {acc.id} changed meanwhile (now {acc.status}); retry")


# --------------------------------------------------------------------------- shaping


def json_ok(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return aware.isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)


_dumps = functools.partial(json.dumps, default=_default, ensure_ascii=False)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return (
        dt.datetime.fromtimestamp(ts, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def summary(acc: Account, now: float) -> dict[str, Any]:
    return {
        "id": acc.id,
        "wework_guid": acc.wework_guid,
        "tenant_id": acc.tenant_id,
        "state": str(acc.status),
        "since": iso(acc.entered_at),
        "in_state_seconds": round(max(0.0, now - acc.entered_at), 3),
        "last_heartbeat": iso(acc.last_heartbeat),
        "attempts": acc.attempts,
        "paused": acc.paused,
        "next_action": acc.next_action,
        "next_action_at": iso(acc.next_action_at),
    }


def details(sup: Supervisor, acc: Account, now: float) -> dict[str, Any]:
    """The daemon's view of one account. May run on the side loop: the caller holds
    `Supervisor.view_lock`, so the fields come from one moment between two transitions."""
    pending = sup.deadlines.get(acc.id)
    return {
        **summary(acc, now),
        "paused_reason": sup.paused_reasons.get(acc.id),
        "qr_refreshes": acc.qr_refreshes,
        "online_since": iso(acc.online_since),
        "offline_history": [iso(t) for t in acc.offline_history],
        "scheduled": {"action": pending[1], "at": iso(pending[0])} if pending else None,
        "version": acc.version,
    }


def preview(planned: Planned) -> dict[str, Any]:
    sup = planned.request.supervision or {}
    effects = planned.context
    return {
        "change_reason": planned.request.reason,
        "next_action": sup.get("next_action"),
        "next_action_at": sup.get("next_action_at"),
        "worker_call": getattr(effects, "call", None),
    }


def force_desc(old: State, new: State, reason: str) -> str:
    return f"force {old} -> {new}: {reason}"


async def show_rows(
    engine: AsyncEngine, account_id: str, history: int
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[dict[str, Any]]]:
    """What `show` reads, in one statement: the account's row (secrets left out, whether they
    are set shown instead), its supervision row, and its newest ``history`` log rows (oldest
    first), as one result row per log row with the account's columns repeated beside it.

    One statement, not three, because under load a statement now and then waits tens of ms for
    the database (2026-12-05, MariaDB at a million accounts under the heartbeat flood: one of
    `show`'s reads in parallel stalled while the others were long done, in about half of its
    slowest answers), and each statement is a chance to meet such a wait. The supervision row
    cannot outlive its account (its foreign key cascades), so the outer join loses nothing; the
    log rows are an outer join too, so an account without history still comes back.
    """
    a, s, lg = wework_accounts, accountd_supervision, account_status_logs
    visible = [c for c in a.c if c.name not in SECRET_COLUMNS]
    flags = [
        a.c.wework_secret.is_not(None).label("wework_secret_set"),
        a.c.login_qr_code.is_not(None).label("login_qr_code_set"),
    ]
    supervised = [c.label(f"supervision_{c.name}") for c in s.c]
    newest = (
        select(lg).where(lg.c.account_id == account_id).order_by(lg.c.id.desc()).limit(history)
    ).subquery("newest")
    logged = [c.label(f"history_{c.name}") for c in newest.c]
    stmt = (
        select(*visible, *flags, *supervised, *logged)
        .select_from(
            a.outerjoin(s, s.c.account_id == a.c.id).outerjoin(
                newest, newest.c.account_id == a.c.id
            )
        )
        .where(a.c.id == account_id)
        .order_by(newest.c.id)
    )
    rows = await fetch_all(engine, stmt)
    if not rows:
        return None, None, []
    values = rows[0]._mapping
    # The flags after `scrub`, which would mask them for their names.
    account = scrub({c.name: values[c.name] for c in visible})
    account.update({f.name: bool(values[f.name]) for f in flags})
    logs = [
        {c.name: r._mapping[label.name] for c, label in zip(newest.c, logged, strict=True)}
        for r in rows
        if r._mapping["history_id"] is not None  # the outer join's NULLs: no history yet
    ]
    supervision = {c.name: values[label.name] for c, label in zip(s.c, supervised, strict=True)}
    if supervision["account_id"] is None:  # no supervision row yet (the outer join's NULLs)
        return account, None, logs
    return account, scrub(supervision), logs


def scrub(value: Any) -> Any:
    """Mask secret-looking keys and URL passwords anywhere in a JSON-able value."""
    if isinstance(value, dict):
        return {
            k: ("***" if _SECRET_KEY.search(str(k)) and v not in (None, "") else scrub(v))
            for k, v in value.items()
            if k not in SECRET_COLUMNS
        }
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value


def first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__
