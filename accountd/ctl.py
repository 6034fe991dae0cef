"""``accountctl``: administer a running accountd over its control socket.

A short-lived synchronous client: one HTTP/JSON request over the unix socket (``http.client``
with an AF_UNIX connection), the answer printed as an aligned table (default) or as JSON
(``--json``, for scripts), and the daemon's stable error code mapped to a documented exit status
(in the manner of ``supervisorctl`` and Supervisor's xmlrpc ``Faults``). The daemon decides who
may do what from the kernel's peer credentials; this program holds no secret and prints none.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlencode

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_DENIED = 5
EXIT_UNREACHABLE = 6

# The daemon's error codes (docs/control-api.md) → exit statuses. Anything else is EXIT_ERROR.
CODE_EXIT: Mapping[str, int] = {
    "bad_request": EXIT_USAGE,
    "not_found": EXIT_NOT_FOUND,
    "illegal_transition": EXIT_CONFLICT,
    "conflict": EXIT_CONFLICT,
    "permission_denied": EXIT_DENIED,
    "unavailable": EXIT_UNREACHABLE,
}

SOCKET_ENV = "ACCOUNTD_SOCKET"
LOCAL_SOCKET = Path("var/control.sock")  # `accountd run` from a checkout (state_dir ./var)
DEMO_SOCKET = Path("var/demo/control.sock")  # `make run` / `accountd demo`
SYSTEM_SOCKET = Path("/run/accountd/control.sock")  # systemd's RuntimeDirectory=accountd
DEFAULT_TIMEOUT = 40.0  # above the daemon's own 30 s commit timeout

STATES = (
    "created",
    "initializing",
    "waiting_qr",
    "waiting_confirm",
    "verifying",
    "online",
    "offline",
    "error",
    "recovering",
)

EPILOG = f"""\
socket: --socket PATH, else ${SOCKET_ENV}, else the first of ./{LOCAL_SOCKET},
./{DEMO_SOCKET} that exists, else {SYSTEM_SOCKET}.

exit statuses:
  0  ok
  1  other error (unexpected answer, invalid config on reload, internal daemon error)
  2  usage error (bad arguments, missing --reason, a request the daemon calls bad_request)
  3  account not found
  4  illegal transition or conflict (e.g. force to the current state, recover while online)
  5  permission denied (by the socket's file permissions or by the daemon's uid/gid rules)
  6  daemon unreachable or unavailable (not running, no socket, starting, shutting down)
"""


class CtlError(Exception):
    """A failure with the exit status it maps to."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


# --------------------------------------------------------------------------- transport


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def default_socket(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(SOCKET_ENV):
        return Path(env[SOCKET_ENV])
    for local in (LOCAL_SOCKET, DEMO_SOCKET):
        if os.path.lexists(local):
            return local
    return SYSTEM_SOCKET


class Client:
    """One request per call; raises `CtlError` with the exit status for every failure."""

    def __init__(self, path: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, method: str, url: str, body: Mapping[str, Any] | None = None) -> Any:
        conn = _UnixConnection(self.path, self.timeout)
        headers = {"User-Agent": "accountctl", "Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, url, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except FileNotFoundError:
            raise CtlError(
                EXIT_UNREACHABLE,
                f"no control socket at {self.path} (is accountd running? see --socket)",
            ) from None
        except ConnectionRefusedError:
            raise CtlError(
                EXIT_UNREACHABLE, f"nothing is listening on {self.path} (accountd is not running)"
            ) from None
        except PermissionError:
            raise CtlError(
                EXIT_DENIED,
                f"permission denied on {self.path} (you need to be in the socket's group)",
            ) from None
        except TimeoutError:
            raise CtlError(
                EXIT_UNREACHABLE, f"no answer from accountd within {self.timeout:g}s"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise CtlError(
                EXIT_UNREACHABLE, f"cannot talk to accountd at {self.path}: {exc}"
            ) from None
        finally:
            conn.close()
        try:
            data = json.loads(raw)
        except ValueError:
            raise CtlError(
                EXIT_ERROR, f"unexpected answer (HTTP {response.status}, not JSON)"
            ) from None
        if response.status >= 400:
            error = data.get("error") if isinstance(data, dict) else None
            if not isinstance(error, dict):
                raise CtlError(EXIT_ERROR, f"unexpected answer (HTTP {response.status})")
            code = str(error.get("code"))
            status = CODE_EXIT.get(code, EXIT_ERROR)
            raise CtlError(status, str(error.get("message", code)), code)
        return data


# --------------------------------------------------------------------------- output


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], right: frozenset[int] = frozenset()
) -> str:
    """Aligned columns (two spaces apart); columns in ``right`` are right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[i]) if i in right else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return " ".join(str(value).split())  # no newline may break a row


def _when(value: str | None) -> str:
    """``2026-01-02T03:04:05.678Z`` → ``2026-01-02 03:04:05Z`` (tables need no milliseconds)."""
    if not value:
        return "-"
    return value[:19].replace("T", " ") + "Z"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s:02d}s"


def _fields(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in pairs)


def _status_text(data: Mapping[str, Any]) -> str:
    head = (
        f"accountd {data.get('version')}  {'ready' if data.get('ready') else 'NOT READY'}  "
        f"up {_duration(data.get('uptime_seconds'))}  pid {data.get('pid')}"
    )
    door = data.get("door") or {}
    outbox = data.get("outbox") or {}
    second = (
        f"accounts {data.get('accounts', 0)}  paused {data.get('paused', 0)}  "
        f"recoveries in flight {data.get('recoveries_in_flight', 0)}  "
        f"door queue {door.get('pending', 0)}  outbox queue {outbox.get('pending', 0)}"
    )
    dbs = []
    for key, health in (data.get("databases") or {}).items():
        if health.get("up"):
            dbs.append(f"{key} up ({health.get('latency_ms')} ms)")
        else:
            dbs.append(f"{key} DOWN ({health.get('error')})")
    states = data.get("states") or {}
    counts = table(["STATE", "ACCOUNTS"], list(states.items()), right=frozenset({1}))
    return "\n".join([head, second, "databases: " + ", ".join(dbs), "", counts])


_ACCOUNT_HEADERS = [
    "ID",
    "WEWORK_GUID",
    "TENANT",
    "STATE",
    "SINCE",
    "LAST HEARTBEAT",
    "ATT",
    "PAUSED",
]


def _account_rows(accounts: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    return [
        [
            a["id"],
            a["wework_guid"],
            a["tenant_id"],
            a["state"],
            _when(a.get("since")),
            _when(a.get("last_heartbeat")),
            a.get("attempts"),
            a.get("paused"),
        ]
        for a in accounts
    ]


def _history_text(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "(no status changes logged)"
    return table(
        ["TIME", "FROM", "TO", "OPERATOR", "REASON"],
        [
            [
                _when(r.get("created_at")),
                r.get("old_status"),
                r.get("new_status"),
                r.get("operator_id"),
                r.get("change_reason"),
            ]
            for r in rows
        ],
    )


def _show_text(data: Mapping[str, Any]) -> str:
    acc = data["account"]
    row = data.get("row") or {}
    paused = f"yes: {acc.get('paused_reason') or '-'}" if acc.get("paused") else "no"
    next_action = acc.get("next_action")
    if next_action:
        next_action = f"{next_action} at {_when(acc.get('next_action_at'))}"
    pairs: list[tuple[str, Any]] = [
        ("id", acc["id"]),
        ("wework_guid", acc["wework_guid"]),
        ("tenant_id", acc["tenant_id"]),
        ("account_name", row.get("account_name")),
        ("corp_id", row.get("wework_corp_id")),
        (
            "state",
            f"{acc['state']} since {_when(acc.get('since'))} "
            f"({_duration(acc.get('in_state_seconds'))})",
        ),
        ("paused", paused),
        ("last heartbeat", _when(acc.get("last_heartbeat"))),
        ("attempts", acc.get("attempts")),
        ("qr refreshes", acc.get("qr_refreshes")),
        ("next action", next_action),
        ("error_message", row.get("error_message")),
        ("wework_secret", "set (never shown)" if row.get("wework_secret_set") else "not set"),
        ("login QR code", "present (not shown)" if row.get("login_qr_code_set") else "none"),
        ("created_at", _when(row.get("created_at"))),
        ("updated_at", _when(row.get("updated_at"))),
    ]
    parts = [_fields(pairs)]
    if data.get("database_error"):
        parts.append(f"\n(database unavailable: {data['database_error']})")
    else:
        parts += ["", "recent history:", _history_text(data.get("history") or [])]
    return "\n".join(parts)


# --------------------------------------------------------------------------- commands


def _ref(account: str) -> str:
    return quote(account, safe="")


def cmd_status(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    data = client.call("GET", "/v1/status")
    return data, _status_text(data)


def cmd_list(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    query: dict[str, Any] = {"limit": args.limit}
    if args.state:
        query["state"] = args.state
    if args.tenant:
        query["tenant"] = args.tenant
    after = args.after
    accounts: list[Mapping[str, Any]] = []
    while True:
        page = client.call("GET", "/v1/accounts?" + urlencode({**query, "after": after or ""}))
        accounts += page["accounts"]
        after = page.get("next")
        if not args.all or not after:
            break
    data = {"accounts": accounts, "total": page["total"], "next": after}
    text = table(_ACCOUNT_HEADERS, _account_rows(accounts), right=frozenset({6}))
    text += f"\n\n{len(accounts)} of {page['total']} account(s)"
    if after:
        text += f"; more with: accountctl list --after {after} (or --all)"
    return data, text


def cmd_show(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    data = client.call("GET", f"/v1/accounts/{_ref(args.account)}")
    return data, _show_text(data)


def cmd_history(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    data = client.call("GET", f"/v1/accounts/{_ref(args.account)}/history?limit={args.limit}")
    return data, _history_text(data["history"])


def cmd_force(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    if not args.reason.strip():
        raise CtlError(EXIT_USAGE, "force: --reason must not be empty")
    body = {"state": args.state, "reason": args.reason, "dry_run": args.dry_run}
    data = client.call("POST", f"/v1/accounts/{_ref(args.account)}/force", body)
    move = f"{data['from']} -> {data['to']}"
    if data.get("dry_run"):
        text = "\n".join(
            [
                f"dry run, nothing written: {data['account_id']} would go {move}",
                _fields(
                    [
                        ("change_reason", data.get("change_reason")),
                        ("operator_id", data.get("operator_id")),
                        ("next action", data.get("next_action")),
                        ("next action at", _when(data.get("next_action_at"))),
                        ("worker call", data.get("worker_call")),
                    ]
                ),
            ]
        )
    else:
        text = f"forced {data['account_id']}: {move} (operator {data['operator_id']})"
    return data, text


def cmd_recover(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    data = client.call("POST", f"/v1/accounts/{_ref(args.account)}/recover", {})
    return data, f"recovering {data['account_id']} (was {data['from']})"


def cmd_pause(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    body = {"reason": args.reason} if args.reason else {}
    data = client.call("POST", f"/v1/accounts/{_ref(args.account)}/pause", body)
    if not data["changed"]:
        return data, f"{data['account_id']} was already paused"
    return data, f"paused {data['account_id']}: {data.get('reason')}"


def cmd_resume(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    data = client.call("POST", f"/v1/accounts/{_ref(args.account)}/resume", {})
    if not data["changed"]:
        return data, f"{data['account_id']} was not paused"
    return data, f"resumed {data['account_id']}"


def cmd_reload(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    data = client.call("POST", "/v1/reload", {})
    lines = ["configuration reloaded"] + [f"  note: {n}" for n in data.get("notes", [])]
    return data, "\n".join(lines)


Command = Callable[[Client, argparse.Namespace], tuple[Any, str]]


# --------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise CtlError(EXIT_USAGE, f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    # Global options are accepted before or after the command; SUPPRESS keeps a subcommand's
    # unset copy from overwriting a value given before it.
    common = _Parser(add_help=False)
    common.add_argument(
        "--socket",
        metavar="PATH",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"control socket (default: ${SOCKET_ENV}, ./{LOCAL_SOCKET}, ./{DEMO_SOCKET}, "
        f"{SYSTEM_SOCKET})",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
    )
    common.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=argparse.SUPPRESS,
        help=f"how long to wait for the daemon (default {DEFAULT_TIMEOUT:g})",
    )
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="accountctl",
        description="Administer a running accountd over its control socket.",
        epilog=EPILOG,
        formatter_class=formatter,
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Command, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EPILOG,
            formatter_class=formatter,
            parents=[common],
        )
        sub.set_defaults(handler=handler)
        return sub

    add("status", cmd_status, "counts per state, health, queues and uptime")
    ls = add("list", cmd_list, "list supervised accounts (from the daemon's memory)")
    ls.add_argument("--state", choices=STATES, help="only accounts in this state")
    ls.add_argument("--tenant", metavar="TENANT_ID", help="only accounts of this tenant")
    ls.add_argument("--limit", type=int, default=100, help="accounts per page (1-1000)")
    ls.add_argument("--after", metavar="ID", help="start after this account id (paging)")
    ls.add_argument("--all", action="store_true", help="follow every page")
    account_help = "account id or wework_guid"
    show = add("show", cmd_show, "details of one account and its recent history")
    show.add_argument("account", metavar="ACCOUNT", help=account_help)
    history = add("history", cmd_history, "status changes of one account, oldest first")
    history.add_argument("account", metavar="ACCOUNT", help=account_help)
    history.add_argument("--limit", type=int, default=50, help="newest N rows (1-1000)")
    force = add("force", cmd_force, "force an account into STATE (recorded with your uid)")
    force.add_argument("account", metavar="ACCOUNT", help=account_help)
    force.add_argument("state", metavar="STATE", choices=STATES, help=", ".join(STATES))
    force.add_argument("--reason", required=True, help="why (mandatory; goes into the log)")
    force.add_argument(
        "--dry-run", action="store_true", help="show what would happen; write nothing"
    )
    recover = add("recover", cmd_recover, "recover an offline/error account now (no backoff)")
    recover.add_argument("account", metavar="ACCOUNT", help=account_help)
    pause = add("pause", cmd_pause, "maintenance: mute automatic recovery and alerts")
    pause.add_argument("account", metavar="ACCOUNT", help=account_help)
    pause.add_argument("--reason", help="why (kept with the pause)")
    resume = add("resume", cmd_resume, "end maintenance: recovery and alerts again")
    resume.add_argument("account", metavar="ACCOUNT", help=account_help)
    add("reload", cmd_reload, "re-read the daemon's config file (same as SIGHUP)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    as_json = False
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        as_json = bool(getattr(args, "json", False))
        path = getattr(args, "socket", None) or default_socket()
        client = Client(path, getattr(args, "timeout", DEFAULT_TIMEOUT))
        handler: Command = args.handler
        data, text = handler(client, args)
    except CtlError as exc:
        if as_json:
            error = {"code": exc.code or "client_error", "message": exc.message}
            print(json.dumps({"error": error, "exit_status": exc.status}, ensure_ascii=False))
        else:
            suffix = f" ({exc.code})" if exc.code else ""
            print(f"accountctl: {exc.message}{suffix}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("accountctl: interrupted", file=sys.stderr)
        return 130
    if as_json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
