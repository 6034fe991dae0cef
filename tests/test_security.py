"""Security: who may reach the daemon, what it lets out, and how it builds SQL.

- The control socket is never world-accessible, whatever the umask, and nothing that is not a
  stale socket of ours (a symlink, even to a socket; a FIFO; a dangling link) is ever followed or
  removed. (Peer-credential refusals run as other uids in tests/test_control.py.)
- The ingest token is compared in constant time; every wrong token is a 401 (hypothesis drives
  tokens of every length in tests/test_hostile.py).
- Secrets never leave: a real daemon process with a token and a MariaDB user *with a password*
  is driven through ingest (right and wrong tokens), accountctl (every read command, force, with
  and without --json, errors included), a /metrics scrape, SIGHUP with a changed database URL and
  an induced database outage; then everything it wrote is searched for the secrets.
- Listeners default to loopback, and the running daemon listens on nothing else.
- SQL is built from bound parameters only: an AST lint over accountd/ finds every statement
  assembled from strings and allows only the listed ones, each with the reason it is safe.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from sqlalchemy.engine import make_url

from accountd.adapters.db import Databases
from accountd.daemon import ingest
from accountd.daemon.control_socket import SOCKET_MODE, bind_control_socket
from accountd.daemon.demo import _free_port
from accountd.daemon.ingest import IngestServer
from accountd.errors import ConfigError
from accountd.settings import is_loopback, load_settings, split_listen
from tests.conftest import _pymysql_connect, mysql_server_url
from tests.helpers import fast_simulator
from tests.test_control import ctl
from tests.test_e2e import seed_accounts, statuses, wait_for
from tests.test_restart import wait_ready

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="asec-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- control socket


@pytest.mark.parametrize("umask", [0o000, 0o002, 0o022, 0o077])
async def test_control_socket_is_never_world_accessible(sock_dir: Path, umask: int) -> None:
    sock_path = sock_dir / "control.sock"
    old = os.umask(umask)
    try:
        sock = await bind_control_socket(sock_path)
    finally:
        os.umask(old)
    try:
        mode = stat.S_IMODE(os.lstat(sock_path).st_mode)
        assert mode == SOCKET_MODE == 0o660
        assert mode & 0o007 == 0, "others may neither connect nor see it"
    finally:
        sock.close()


@pytest.mark.parametrize("kind", ["symlink to a stale socket", "dangling symlink", "fifo"])
async def test_what_is_not_our_stale_socket_is_refused_and_left_alone(
    sock_dir: Path, kind: str
) -> None:
    path = sock_dir / "control.sock"
    target = sock_dir / "elsewhere.sock"
    if kind == "symlink to a stale socket":
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(target))  # nobody listens: removing it would be "safe", but not ours
        stale.close()
        path.symlink_to(target)
    elif kind == "dangling symlink":
        path.symlink_to(sock_dir / "nothing-here")
    else:
        os.mkfifo(path)
    before = os.lstat(path)
    with pytest.raises(ConfigError, match=r"control\.socket: .*refusing"):
        await bind_control_socket(path)
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    if kind == "symlink to a stale socket":
        assert stat.S_ISSOCK(os.lstat(target).st_mode), "the link's target was touched"


# --------------------------------------------------------------------------- ingest token


def test_ingest_token_is_compared_in_constant_time() -> None:
    source = inspect.getsource(ingest.make_ingest_app)
    tree = ast.parse(source.lstrip())
    compared = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "compare_digest"
    ]
    assert len(compared) == 1, "the token check must go through hmac.compare_digest"
    # ... and nothing else compares with the token or the expected bytes.
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            assert not names & {"token", "expected", "given", "credentials"}, ast.unparse(node)


# --------------------------------------------------------------------------- loopback defaults


def test_listeners_default_to_loopback(tmp_path: Path) -> None:
    s = load_settings(None, env={})
    for name, listen in (("ingest", s.ingest.listen), ("metrics", s.metrics.listen)):
        host, _ = split_listen(listen)
        assert host == "127.0.0.1" and is_loopback(host), name
    assert urlsplit(s.worker.url).hostname == "127.0.0.1"
    assert s.control.socket.is_absolute()  # a file under state_dir: no network at all
    # The code's own default agrees with the settings'.
    assert inspect.signature(IngestServer.start).parameters["host"].default == "127.0.0.1"
    # The reference config ships the same loopback addresses.
    reference = load_settings(ROOT / "config" / "accountd.toml", env={})
    assert is_loopback(reference.ingest.host) and is_loopback(reference.metrics.host)
    assert not any("loopback" in w for w in s.warnings())


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses process `pid` listens on (from /proc: no tools needed)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found: set[tuple[str, int]] = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            assert len(addr_hex) == width
            raw = bytes.fromhex(addr_hex)
            if width == 8:
                host = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                host = socket.inet_ntop(socket.AF_INET6, words)
            found.add((host, int(port_hex, 16)))
    return found


# --------------------------------------------------------------------------- SQL construction

SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT INTO|UPDATE|DELETE FROM|CREATE|ALTER TABLE|DROP|TRUNCATE|WHERE|VALUES|"
    r"PARTITION)\b"
)
SQL_SINKS = {"text", "exec_driver_sql"}
# (module, function) → why building SQL from strings there is safe. Nothing else may.
SQL_ALLOWED: dict[tuple[str, str], str] = {
    ("accountd/adapters/batch_sql.py", "update_status"): "placeholders and fixed column names; "
    "every value goes through Binds (bound parameters)",
    ("accountd/adapters/batch_sql.py", "insert_logs"): "same: LOG_COLUMNS plus placeholders",
    ("accountd/adapters/batch_sql.py", "update_heartbeats"): "same: one fixed column plus "
    "placeholders",
    ("accountd/adapters/repository.py", "AccountRepository.write_heartbeats"): "runs "
    "batch_sql.update_heartbeats with its Binds parameters",
    ("accountd/adapters/batch_sql.py", "fresh_heartbeats"): "same: two fixed columns plus "
    "placeholders",
    ("accountd/adapters/repository.py", "AccountRepository.fresh_heartbeats"): "runs "
    "batch_sql.fresh_heartbeats with its Binds parameters",
    ("accountd/adapters/batch_sql.py", "upsert_supervision"): "same: SUPERVISION_COLUMNS",
    ("accountd/adapters/repository.py", "AccountRepository._update_statuses"): "runs the "
    "batch_sql text with its bound parameters",
    ("accountd/adapters/repository.py", "AccountRepository._insert_logs"): "same",
    ("accountd/adapters/repository.py", "AccountRepository._upsert_supervision"): "same",
    ("accountd/adapters/loader.py", "load_statement"): "the start-up load query: fixed column "
    "names and per-dialect expressions; the keyset cursor and page size are bound (:after, :limit)",
    ("accountd/adapters/loader.py", "iter_loaded"): "runs load_statement and "
    "load_packed_statement with bound parameters",
    ("accountd/adapters/loader.py", "load_packed_statement"): "the same page packed into one "
    "row: fixed column names and functions; cursor, limit and separators are bound",
    ("accountd/adapters/loader.py", "heartbeats_statement"): "the paged heartbeat read: fixed "
    "column names and a per-dialect timestamp expression; cursor, since and limit are bound",
    ("accountd/adapters/loader.py", "heartbeats_packed_statement"): "the same page packed "
    "into one row: fixed column names and functions; cursor, since and limit are bound",
    ("accountd/adapters/loader.py", "heartbeats_after"): "runs heartbeats_statement or "
    "heartbeats_packed_statement with bound parameters",
    ("accountd/adapters/partitions.py", "_ranges"): "DDL: MySQL cannot bind partition names or "
    "bounds; names come from partition_name(), bounds are integers we compute",
    ("accountd/adapters/partitions.py", "partition_by_sql"): "DDL: table and column from our "
    "own PartitionedTable specs (schema constants), never input",
    ("accountd/adapters/partitions.py", "split_future_sql"): "DDL, as above",
    ("accountd/adapters/partitions.py", "drop_partitions_sql"): "DDL; names read back from "
    "information_schema for our own tables and matched against our naming pattern",
    ("accountd/adapters/partitions.py", "partition_table"): "executes partition_by_sql",
    ("accountd/daemon/partition_upkeep.py", "upkeep"): "executes the partition DDL above",
    ("accountd/adapters/schema/types.py", "updated_at_trigger_sql"): "SQLite DDL trigger for "
    "our own Table names (identifiers cannot be bound)",
    ("accountd/adapters/schema/types.py", "default"): "server defaults of our own schema, "
    "quoted with '' escaping (DDL cannot bind)",
}


def _constant(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return True
    return (
        isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Add)
        and _constant(node.left)
        and _constant(node.right)
    )


def _literals(node: ast.AST) -> str:
    return " ".join(
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    )


def sql_built_from_strings(package: Path) -> set[tuple[str, str, str]]:
    """(module, function, how) for each SQL text assembled at run time in `package`."""
    found: set[tuple[str, str, str]] = set()

    def visit(node: ast.AST, scope: str, module: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = f"{scope}.{child.name}" if scope else child.name
            how = ""
            if isinstance(child, ast.JoinedStr) and SQL_WORDS.search(_literals(child)):
                how = "f-string"
            elif (
                isinstance(child, ast.BinOp)
                and isinstance(child.op, ast.Mod | ast.Add)
                and not _constant(child)
                and SQL_WORDS.search(_literals(child))
            ):
                how = "% or + on SQL text"
            elif isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                owner = child.func.value
                if (
                    child.func.attr in ("format", "join")
                    and isinstance(owner, ast.Constant)
                    and SQL_WORDS.search(str(owner.value))
                ):
                    how = f".{child.func.attr}() on SQL text"
            if isinstance(child, ast.Call) and not how:
                func = child.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in SQL_SINKS and child.args and not _constant(child.args[0]):
                    how = f"{name}() of a run-time string"
            if how:
                found.add((module, inner or "<module>", how))
            visit(child, inner, module)

    for path in sorted(package.rglob("*.py")):
        module = path.relative_to(package.parent).as_posix()
        visit(ast.parse(path.read_text(encoding="utf-8")), "", module)
    return found


def test_sql_is_built_only_from_bound_parameters() -> None:
    found = sql_built_from_strings(ROOT / "accountd")
    unexplained = sorted(f for f in found if (f[0], f[1]) not in SQL_ALLOWED)
    assert unexplained == [], (
        "SQL assembled from strings; use bound parameters (or, for DDL that cannot bind, add "
        f"it to SQL_ALLOWED with the reason it is safe): {unexplained}"
    )
    stale = sorted(set(SQL_ALLOWED) - {(m, f) for m, f, _ in found})
    assert stale == [], f"allow-list entries that no longer build SQL: {stale}"


def test_the_sql_lint_catches_what_it_should(tmp_path: Path) -> None:
    package = tmp_path / "accountd"
    package.mkdir()
    (package / "bad.py").write_text(
        "from sqlalchemy import text\n"
        "def by_name(conn, name):\n"
        "    return conn.execute(text(f\"SELECT * FROM t WHERE name = '{name}'\"))\n"
        "def by_id(conn, i):\n"
        "    return conn.exec_driver_sql('DELETE FROM t WHERE id = %s' % i)\n"
        "def fine(conn, i):\n"
        "    return conn.execute(text('SELECT * FROM t WHERE id = :i'), {'i': i})\n"
    )
    found = {(f, how) for _, f, how in sql_built_from_strings(package)}
    assert ("by_name", "f-string") in found
    assert ("by_id", "% or + on SQL text") in found
    assert not any(f == "fine" for f, _ in found)


# --------------------------------------------------------------------------- secrets


@contextlib.contextmanager
def mariadb_user(database_names: list[str]) -> Iterator[tuple[str, str]]:
    """A throwaway MariaDB user with a random password and rights on `database_names` only."""
    server = mysql_server_url()
    assert server is not None
    user = "acct_" + secrets.token_hex(4)
    password = "pw-" + secrets.token_urlsafe(18)
    conn = _pymysql_connect(server)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE USER %s@'127.0.0.1' IDENTIFIED BY %s", (user, password))
        for name in database_names:
            # Identifiers cannot be bound; these names are the fixture's own.
            cur.execute(f"GRANT ALL PRIVILEGES ON `{name}`.* TO %s@'127.0.0.1'", (user,))
    try:
        yield user, password
    finally:
        conn = _pymysql_connect(server)
        with conn, conn.cursor() as cur:
            cur.execute("DROP USER IF EXISTS %s@'127.0.0.1'", (user,))


def set_password(user: str, password: str, *, kill: bool) -> None:
    server = mysql_server_url()
    assert server is not None
    conn = _pymysql_connect(server)
    with conn, conn.cursor() as cur:
        cur.execute("ALTER USER %s@'127.0.0.1' IDENTIFIED BY %s", (user, password))
        if kill:
            cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s", (user,))
            for (thread,) in cur.fetchall():
                with contextlib.suppress(Exception):
                    cur.execute(f"KILL CONNECTION {int(thread)}")


def secret_config(path: Path, urls: dict[str, str], ports: dict[str, int], worker: str) -> None:
    db = "\n".join(f'{key} = "{url}"' for key, url in urls.items())
    path.write_text(
        f"""
state_dir = "{path.parent}"
[databases]
{db}
connect_timeout = 2
[control]
socket = "{path.parent / "control.sock"}"
[ingest]
listen = "127.0.0.1:{ports["ingest"]}"
[metrics]
listen = "127.0.0.1:{ports["metrics"]}"
ping_interval = 0.5
[worker]
url = "{worker}"
timeout = 2
[heartbeat]
timeout = 30
persist_interval = 0.5
flush_interval = 0.2
db_poll_interval = 0.5
[monitoring]
db_check_interval = 0.5
[supervisor]
poll_interval = 0.3
"""
    )


@pytest.mark.parametrize("backend", ["mysql"], indirect=True)
async def test_token_and_database_passwords_never_leave_the_daemon(
    migrated_urls: dict[str, str], tmp_path: Path, sock_dir: Path
) -> None:
    names = [make_url(u).database or "" for u in migrated_urls.values()]
    token = "tok-" + secrets.token_urlsafe(24)
    with mariadb_user(names) as (user, password):
        second_password = "pw2-" + secrets.token_urlsafe(18)
        outage_password = "pw3-" + secrets.token_urlsafe(18)
        urls = {
            key: make_url(u).set(username=user, password=password).render_as_string(False)
            for key, u in migrated_urls.items()
        }
        ports = {"ingest": _free_port(), "metrics": _free_port()}
        sim = fast_simulator(ingest_url=f"http://127.0.0.1:{ports['ingest']}", token=token, seed=2)
        worker = await sim.start()
        state = sock_dir  # short: the control socket lives in state_dir
        config = state / "accountd.toml"
        secret_config(config, urls, ports, worker)
        log = tmp_path / "daemon.log"
        outputs: list[str] = []  # everything the daemon said to anyone, besides its log
        # The token comes from the environment, as the docs advise (never the process list).
        proc = _spawn_with_env(config, log, {"ACCOUNTD_INGEST__TOKEN": token})
        sock = state / "control.sock"
        dbs = Databases(migrated_urls)  # root's URLs: for seeding and reading, not the daemon's
        try:
            ids = await seed_accounts(dbs, 4)
            await wait_ready(log, proc, 1)

            async def online() -> bool:
                return set((await statuses(dbs)).values()) == {"online"}

            await wait_for(online, 30, "accounts online")
            a = ids[0]

            # Ingest: right and wrong tokens (one containing the real one).
            base = f"http://127.0.0.1:{ports['ingest']}"
            async with aiohttp.ClientSession() as http:
                for auth in (token, token + "x", "x" + token[:-1], ""):
                    async with http.post(
                        base + "/v1/events",
                        headers={"Authorization": f"Bearer {auth}"},
                        json={"events": [{"account_id": a, "event": "bogus", "at": "x"}]},
                    ) as resp:
                        outputs.append(f"{resp.status} {dict(resp.headers)} {await resp.text()}")

            # accountctl, every read command and a force, plain and --json, errors included.
            commands = [
                ("status",),
                ("list",),
                ("show", a),
                ("history", a),
                ("force", a, "error", "--reason", "security drill"),
                ("force", a, "error", "--reason", "again: illegal"),
                ("show", "no-such-account"),
                ("recover", a),
            ]
            for args in commands:
                for json_flag in ((), ("--json",)):
                    code, out, err = await ctl(sock, *json_flag, *args)
                    outputs.append(f"{args} {code}\n{out}\n{err}")

            # Raw control API error bodies.
            async with aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(sock))
            ) as http:
                for method, path, body in (
                    ("POST", f"/v1/accounts/{a}/force", b"{bad json"),
                    ("GET", "/v1/accounts?limit=zz", b""),
                    ("POST", "/v1/reload", b"{}"),
                ):
                    async with http.request(method, "http://c" + path, data=body) as resp:
                        outputs.append(await resp.text())

            # SIGHUP with a changed database URL (another password): named, never echoed.
            changed = {
                k: make_url(u).set(password=second_password).render_as_string(False)
                for k, u in urls.items()
            }
            secret_config(config, changed, ports, worker)
            proc.send_signal(signal.SIGHUP)
            await _wait_log(log, "databases.core: changed, needs a restart")
            code, out, err = await ctl(sock, "reload")
            outputs.append(f"reload {code}\n{out}\n{err}")
            secret_config(config, urls, ports, worker)

            # An induced database outage: the password changes under the daemon and its
            # connections are killed; every ping and query now fails with an access error.
            set_password(user, outage_password, kill=True)
            await asyncio.sleep(2.5)
            for args in (("status",), ("--json", "status"), ("show", a), ("history", a)):
                code, out, err = await ctl(sock, *args)
                outputs.append(f"outage {args} {code}\n{out}\n{err}")
            metrics_down = await asyncio.to_thread(_scrape, ports["metrics"])
            assert 'accountd_db_up{database="platform"} 0.0' in metrics_down
            set_password(user, password, kill=False)
            await asyncio.sleep(2.0)
            outputs.append(await asyncio.to_thread(_scrape, ports["metrics"]))
            outputs.append(metrics_down)

            # Listening: loopback only.
            addresses = listening_addresses(proc.pid)
            assert addresses and all(is_loopback(host) for host, _ in addresses), addresses

            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 40) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            await sim.stop()
            await dbs.dispose()

        written = log.read_text() + "\n".join(outputs)
        # The run really exercised the paths that could leak.
        assert "security drill" in written and "illegal_transition" in written
        assert "unauthorized" in written and "databases.core" in written
        assert f"Access denied for user '{user}'" in written  # the outage was real
        for secret in (token, password, second_password, outage_password):
            assert secret not in written, f"a secret leaked: {_context(written, secret)}"


def _spawn_with_env(config: Path, log: Path, extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCOUNTD_")}
    env.update(extra)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "accountd.cli", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


async def _wait_log(log: Path, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"{text!r} not logged:\n{log.read_text()[-3000:]}")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def _context(text: str, secret: str) -> str:
    i = text.find(secret)
    return text[max(0, i - 200) : i].replace(secret, "<SECRET>") + "<SECRET>"
