"""The control socket and `accountctl`, end to end.

The daemon runs in-process against migrated databases (SQLite; MariaDB too when
``ACCOUNTD_TEST_MYSQL_URL`` is set) with the worker simulator on loopback; `accountctl` runs as a
real subprocess over the real unix socket, as root and, through ``setpriv``, as other uids so the
kernel's peer credentials are what the daemon judges. Sockets live in short directories under
/tmp: ``sun_path`` holds 107 bytes, and other uids must be able to traverse to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import event, select

from accountd.adapters.db import Databases
from accountd.adapters.repository import AccountRepository, Applied, history_rows, utcnow
from accountd.adapters.schema import (
    account_status_logs,
    accountd_supervision,
    operation_logs,
    wework_accounts,
)
from accountd.daemon.app import Daemon
from accountd.daemon.control_socket import (
    Acl,
    Peer,
    Role,
    bind_control_socket,
    peer_of,
    role_of,
)
from accountd.daemon.control_views import scrub, show_rows
from accountd.daemon.demo import _free_port
from accountd.daemon.simulator import WorkerSimulator
from accountd.errors import ConfigError
from accountd.settings import load_settings
from tests.helpers import fast_simulator, write_config
from tests.test_e2e import seed_accounts, start, statuses, wait_for
from tests.test_metrics import parse, value

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534  # nobody / nogroup
STRANGER = 65533  # a uid in no list (and without a passwd entry: setpriv takes numbers)
SECRET = "s3cret-never-logged"  # what seed_accounts stores in wework_secret
CAN_SWITCH_USER = os.geteuid() == 0 and shutil.which("setpriv") is not None


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="actl-", dir="/tmp"))
    path.chmod(0o711)  # other uids may traverse (not list) it, as /run/accountd would allow
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Stack:
    daemon: Daemon
    dbs: Databases
    sim: WorkerSimulator
    sock: Path
    config: Path
    ids: list[str]
    task: asyncio.Task[int] | None = None


@contextlib.asynccontextmanager
async def running(
    urls: dict[str, str], tmp_path: Path, sock: Path, control: str, accounts: int = 6
) -> AsyncIterator[Stack]:
    """A daemon with ``[control]`` set to ``control`` (TOML lines), accounts all online."""
    token = secrets.token_urlsafe(24)
    port = _free_port()
    sim = fast_simulator(ingest_url=f"http://127.0.0.1:{port}", token=token, seed=11)
    worker = await sim.start()
    config = write_config(
        tmp_path / "accountd.toml", urls, port, worker, token, worker_timeout=2, recovering=5
    )
    with config.open("a") as fh:
        fh.write(f'[control]\nsocket = "{sock}"\n{control}\n')
    settings = load_settings(config, env={})
    dbs = Databases(urls)
    daemon = Daemon(settings, config_path=config)
    stack = Stack(daemon, dbs, sim, sock, config, [])
    try:
        stack.ids = await seed_accounts(dbs, accounts) if accounts else []
        stack.task = await start(daemon)
        if accounts:

            async def all_online() -> bool:
                return set((await statuses(dbs)).values()) == {"online"}

            await wait_for(all_online, 30, "every account online")
        yield stack
    finally:
        if stack.task is not None and not stack.task.done():
            daemon.request_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stack.task, 30)
        await sim.stop()
        await dbs.dispose()


async def ctl(sock: Path, *args: str, uid: int | None = None, gid: int | None = None) -> Any:
    """Run ``accountctl --socket SOCK ARGS`` as a subprocess; (exit status, stdout, stderr)."""
    cmd = [sys.executable, "-m", "accountd.ctl", "--socket", str(sock), *args]
    if uid is not None:
        cmd = [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid if gid is not None else uid}",
            "--clear-groups",
            *cmd,
        ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCOUNTD_")}
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def status_logs(dbs: Databases, account_id: str) -> list[dict[str, Any]]:
    lg = account_status_logs
    async with dbs.platform.connect() as conn:
        rows = await conn.execute(select(lg).where(lg.c.account_id == account_id).order_by(lg.c.id))
        return [dict(r._mapping) for r in rows]


async def op_logs(dbs: Databases, account_id: str) -> list[dict[str, Any]]:
    ol = operation_logs
    async with dbs.core.connect() as conn:
        rows = await conn.execute(select(ol).where(ol.c.resource_id == account_id))
        return [dict(r._mapping) for r in rows]


async def supervision(dbs: Databases, account_id: str) -> dict[str, Any]:
    s = accountd_supervision
    async with dbs.platform.connect() as conn:
        row = (await conn.execute(select(s).where(s.c.account_id == account_id))).one()
        return dict(row._mapping)


async def state_of(dbs: Databases, account_id: str) -> str:
    return (await statuses(dbs))[account_id]


# --------------------------------------------------------------------------- the socket file


async def test_socket_is_0660_with_the_configured_group_replaces_a_stale_one_and_goes_at_stop(
    migrated_urls: dict[str, str], tmp_path: Path, sock_dir: Path
) -> None:
    sock = sock_dir / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))  # a socket file nobody listens on: what a killed daemon leaves
    stale.close()
    # Only root may give a file to a group it is not in; otherwise use one of our own groups.
    group, gid = ("nogroup", NOBODY) if os.geteuid() == 0 else (str(os.getgid()), os.getgid())
    old_umask = os.umask(0o002)  # a permissive umask must not leak into the socket's mode
    try:
        async with running(
            migrated_urls, tmp_path, sock, f'group = "{group}"', accounts=0
        ) as stack:
            st = os.lstat(sock)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o660
            assert st.st_gid == gid
            code, out, err = await ctl(sock, "status")
            assert code == 0, err
            assert "ready" in out
            stack.daemon.request_stop()
            assert stack.task is not None
            assert await asyncio.wait_for(stack.task, 30) == 0
            assert not os.path.lexists(sock), "the daemon left its socket behind"
    finally:
        os.umask(old_umask)


@pytest.mark.parametrize("kind", ["regular file", "symlink", "directory"])
async def test_something_other_than_a_socket_at_the_path_is_refused_and_left_alone(
    sock_dir: Path, kind: str
) -> None:
    sock = sock_dir / "control.sock"
    target = sock_dir / "precious"
    target.write_text("keep me")
    if kind == "regular file":
        sock.write_text("keep me")
    elif kind == "symlink":
        sock.symlink_to(target)
    else:
        sock.mkdir()
    with pytest.raises(ConfigError, match=r"control\.socket: .*refusing"):
        await bind_control_socket(sock)
    assert os.path.lexists(sock)
    assert target.read_text() == "keep me"
    if kind == "regular file":
        assert sock.read_text() == "keep me"


async def test_a_socket_someone_listens_on_is_refused(sock_dir: Path) -> None:
    sock = sock_dir / "control.sock"
    server = await asyncio.start_unix_server(lambda r, w: w.close(), path=str(sock))
    try:
        with pytest.raises(ConfigError, match="another accountd is listening"):
            await bind_control_socket(sock)
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    finally:
        server.close()
        await server.wait_closed()


async def test_daemon_refuses_to_start_over_a_regular_file(
    migrated_urls: dict[str, str], tmp_path: Path, sock_dir: Path
) -> None:
    sock = sock_dir / "control.sock"
    sock.write_text("not a socket")
    config = write_config(
        tmp_path / "accountd.toml",
        migrated_urls,
        _free_port(),
        "http://127.0.0.1:9",
        "t" * 20,
        worker_timeout=2,
        recovering=5,
    )
    with config.open("a") as fh:
        fh.write(f'[control]\nsocket = "{sock}"\n')
    daemon = Daemon(load_settings(config, env={}), config_path=config)
    assert await asyncio.wait_for(daemon.run(), 60) == 1
    assert sock.read_text() == "not a socket"


def test_peer_credentials_come_from_the_kernel() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = peer_of(a)
    assert peer is not None
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert peer.operator_id == f"uid:{os.getuid()}"
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with tcp:
        assert peer_of(tcp) is None  # only unix sockets carry credentials


def test_roles_from_uids_and_gids() -> None:
    acl = Acl(
        admin_uids=frozenset({1000}),
        admin_gids=frozenset({50}),
        readonly_uids=frozenset({2000}),
        readonly_gids=frozenset({60}),
        own_uid=999,
    )
    assert role_of(Peer(1, 0, 0), acl) is Role.admin  # root, always
    assert role_of(Peer(1, 999, 999), acl) is Role.admin  # the daemon's own uid
    assert role_of(Peer(1, 1000, 1), acl) is Role.admin
    assert role_of(Peer(1, 3000, 1, (7, 50)), acl) is Role.admin  # supplementary group
    assert role_of(Peer(1, 2000, 50), acl) is Role.admin  # admin by group beats readonly uid
    assert role_of(Peer(1, 2000, 1), acl) is Role.readonly
    assert role_of(Peer(1, 3000, 60), acl) is Role.readonly
    assert role_of(Peer(1, 3000, 1, (2, 3)), acl) is Role.none


# --------------------------------------------------------------------------- who may do what


@pytest.mark.skipif(not CAN_SWITCH_USER, reason="needs root and setpriv to act as other uids")
async def test_peers_are_judged_by_their_credentials(
    migrated_urls: dict[str, str], tmp_path: Path, sock_dir: Path
) -> None:
    sock = sock_dir / "control.sock"
    control = f'group = "nogroup"\nreadonly_uids = [{NOBODY}]'
    async with running(migrated_urls, tmp_path, sock, control, accounts=2) as stack:
        account = stack.ids[0]
        # nobody is read-only: may look, may not touch.
        code, out, err = await ctl(sock, "status", uid=NOBODY)
        assert code == 0, err
        code, out, err = await ctl(sock, "show", account, uid=NOBODY)
        assert code == 0, err
        assert account in out
        code, out, err = await ctl(sock, "force", account, "error", "--reason", "x", uid=NOBODY)
        assert code == 5, (out, err)
        assert "permission_denied" in err
        code, _, err = await ctl(sock, "pause", account, uid=NOBODY)
        assert code == 5, err
        # A uid in no list reaches the socket through its group but is refused by the daemon.
        code, out, err = await ctl(sock, "status", uid=STRANGER, gid=NOBODY)
        assert code == 5, (out, err)
        assert f"uid {STRANGER} may not" in err
        # Neither owner nor group: the kernel refuses the connect itself.
        code, out, err = await ctl(sock, "status", uid=STRANGER, gid=STRANGER)
        assert code == 5, (out, err)
        assert "permission denied" in err
        assert await state_of(stack.dbs, account) == "online"
        assert [r for r in await status_logs(stack.dbs, account) if r["operator_id"]] == []


@pytest.mark.skipif(not CAN_SWITCH_USER, reason="needs root and setpriv to act as other uids")
async def test_refusals_are_logged_with_the_peer_uid(
    migrated_urls: dict[str, str],
    tmp_path: Path,
    sock_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sock = sock_dir / "control.sock"
    async with running(migrated_urls, tmp_path, sock, 'group = "nogroup"', accounts=0):
        caplog.set_level("INFO", logger="accountd.daemon.control")
        code, _, _ = await ctl(sock, "status", uid=STRANGER, gid=NOBODY)
        assert code == 5
        code, _, _ = await ctl(sock, "status")
        assert code == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "accountd.daemon.control"]
    assert any(f"uid={STRANGER}" in m and "403 permission_denied" in m for m in lines), lines
    assert any("uid=0" in m and "GET /v1/status -> 200" in m for m in lines), lines


# --------------------------------------------------------------------------- admin round trips


async def test_force_dry_run_recover_and_errors_through_accountctl(
    migrated_urls: dict[str, str], tmp_path: Path, sock_dir: Path
) -> None:
    sock = sock_dir / "control.sock"
    async with running(migrated_urls, tmp_path, sock, "") as stack:
        dbs = stack.dbs
        a, b = stack.ids[0], stack.ids[1]
        before = await status_logs(dbs, a)

        code, out, err = await ctl(sock, "force", a, "error", "--reason", "planned", "--dry-run")
        assert code == 0, err
        assert "dry run, nothing written" in out and "online -> error" in out
        await asyncio.sleep(0.5)  # an outbox write, if any, would have landed by now
        assert await status_logs(dbs, a) == before
        assert await op_logs(dbs, a) == []
        assert await state_of(dbs, a) == "online"

        code, out, err = await ctl(sock, "force", a, "error", "--reason", "disk replaced")
        assert code == 0, err
        assert f"forced {a}: online -> error (operator uid:0)" in out
        after = await status_logs(dbs, a)
        forced = [r for r in after if r["operator_id"] == "uid:0"]
        assert len(forced) == 1
        assert (forced[0]["old_status"], forced[0]["new_status"]) == ("online", "error")
        assert forced[0]["change_reason"].startswith("force: disk replaced")
        assert await state_of(dbs, a) == "error"

        async def audited() -> bool:
            return len(await op_logs(dbs, a)) == 1

        await wait_for(audited, 10, "the operation_logs row in core")
        (op,) = await op_logs(dbs, a)
        assert op["operation_type"] == "account.force"
        assert op["resource_type"] == "wework_account"
        assert op["status"] == "success"
        assert op["tenant_id"] == stack.daemon.supervisor.accounts[a].tenant_id  # type: ignore[union-attr]
        assert op["request_data"]["reason"] == "disk replaced"
        assert op["request_data"]["operator_id"] == "uid:0"
        assert "(by uid:0)" in op["operation_desc"]

        # Usage errors: no --reason, an empty one, a state that does not exist.
        code, _, err = await ctl(sock, "force", a, "online")
        assert code == 2 and "--reason" in err
        code, _, err = await ctl(sock, "force", a, "online", "--reason", "   ")
        assert code == 2, err
        code, _, err = await ctl(sock, "force", a, "sleeping", "--reason", "x")
        assert code == 2, err
        # Illegal: forcing into the state it is in; recovering an online account.
        code, _, err = await ctl(sock, "force", a, "error", "--reason", "again")
        assert code == 4 and "illegal_transition" in err
        code, _, err = await ctl(sock, "recover", b)
        assert code == 4 and "illegal_transition" in err
        # Unknown accounts.
        code, _, err = await ctl(sock, "show", "no-such-account")
        assert code == 3 and "not_found" in err
        code, _, err = await ctl(sock, "force", "no-such-account", "online", "--reason", "x")
        assert code == 3, err

        # Recover from error right away, by wework_guid this time.
        guid = stack.daemon.supervisor.accounts[a].wework_guid  # type: ignore[union-attr]
        code, out, err = await ctl(sock, "recover", guid)
        assert code == 0, err
        assert f"recovering {a} (was error)" in out

        async def online_again() -> bool:
            return await state_of(dbs, a) == "online"

        await wait_for(online_again, 20, "the recovered account online")
        rows = await status_logs(dbs, a)
        recover = [
            r for r in rows if r["old_status"] == "error" and r["new_status"] == "recovering"
        ]
        assert len(recover) == 1 and recover[0]["operator_id"] == "uid:0"

        async def all_audited() -> bool:
            return len(await op_logs(dbs, a)) == 3  # force, the refused force, recover

        await wait_for(all_audited, 10, "operation_logs rows for every admin action")
        kinds = sorted((o["operation_type"], o["status"]) for o in await op_logs(dbs, a))
        assert kinds == [
            ("account.force", "failed"),
            ("account.force", "success"),
            ("account.recover", "success"),
        ]
        assert [r for r in await status_logs(dbs, b) if r["operator_id"]] == []


async def test_show_reads_the_account_its_supervision_row_and_history_in_one_statement(
    migrated_urls: dict[str, str],
) -> None:
    """`show_rows`: the account row without its secrets, the supervision row (or None where
    there is none) and the newest log rows, oldest first, as `history_rows` reads them, from ONE
    statement (each statement under load is a chance to stall)."""
    dbs = Databases(migrated_urls)
    statements: list[str] = []
    try:
        a, b = await seed_accounts(dbs, 2)
        repo = AccountRepository(dbs.platform)
        sup = {"entered_at": utcnow(), "attempts": 2, "next_action": "timeout", "epoch": 0}
        path = ["created", "initializing", "waiting_qr", "waiting_confirm"]
        for old, new in itertools.pairwise(path):
            applied = await repo.apply_transition(a, old, new, f"to {new}", supervision=sup)
            assert isinstance(applied, Applied)
        logged = await history_rows(dbs.platform, a, 10)
        assert [r["new_status"] for r in logged] == path[1:]
        event.listen(
            dbs.platform.sync_engine,
            "before_cursor_execute",
            lambda _c, _cur, sql, *_: statements.append(sql),
        )
        row, supervised, history = await show_rows(dbs.platform, a, 2)
        assert len(statements) == 1
        assert history == logged[-2:]  # the newest two, oldest first
        assert supervised == scrub(await supervision(dbs, a))
        assert supervised is not None and supervised["attempts"] == 2
        assert row is not None and row["id"] == a and row["status"] == "waiting_confirm"
        visible = {c.name for c in wework_accounts.c} - {"wework_secret", "login_qr_code"}
        assert set(row) == visible | {"wework_secret_set", "login_qr_code_set"}
        assert row["wework_secret_set"] is True and row["login_qr_code_set"] is False
        assert SECRET not in json.dumps(row, default=str)
        assert (await show_rows(dbs.platform, a, 10))[2] == logged

        # No supervision row and no history yet: the account alone.
        row, supervised, history = await show_rows(dbs.platform, b, 20)
        assert row is not None and row["id"] == b and supervised is None and history == []
        assert await show_rows(dbs.platform, "no-such-account", 20) == (None, None, [])
    finally:
        await dbs.dispose()


async def test_show_list_history_status_and_reload(
    migrated_urls: dict[str, str], tmp_path: Path, sock_dir: Path
) -> None:
    sock = sock_dir / "control.sock"
    async with running(migrated_urls, tmp_path, sock, "", accounts=5) as stack:
        a = stack.ids[0]
        for args in (("show", a), ("--json", "show", a), ("history", a), ("list",)):
            code, out, err = await ctl(sock, *args)
            assert code == 0, err
            assert SECRET not in out and SECRET not in err
        code, out, _ = await ctl(sock, "show", a)
        assert "wework_secret" in out and "set (never shown)" in out
        assert "initializing" in out and "online" in out
        code, out, _ = await ctl(sock, "show", a, "--json")  # global options after the command
        shown = json.loads(out)
        assert shown["account"]["id"] == a
        assert "wework_secret" not in shown["row"] and shown["row"]["wework_secret_set"] is True
        assert "login_qr_code" not in shown["row"]
        assert [h["new_status"] for h in shown["history"]][-1] == "online"

        code, out, _ = await ctl(sock, "--json", "list", "--state", "online", "--limit", "2")
        page = json.loads(out)
        assert page["total"] == 5 and len(page["accounts"]) == 2 and page["next"]
        code, out, _ = await ctl(sock, "--json", "list", "--limit", "2", "--all")
        assert sorted(x["id"] for x in json.loads(out)["accounts"]) == sorted(stack.ids)
        code, out, _ = await ctl(sock, "list", "--limit", "2")
        assert "2 of 5 account(s); more with: accountctl list --after" in out
        header = out.splitlines()[0]
        assert header.split() == [
            "ID",
            "WEWORK_GUID",
            "TENANT",
            "STATE",
            "SINCE",
            "LAST",
            "HEARTBEAT",
            "ATT",
            "PAUSED",
        ]
        code, out, _ = await ctl(sock, "--json", "list", "--state", "error")
        assert json.loads(out)["accounts"] == []
        code, _, err = await ctl(sock, "list", "--limit", "0")
        assert code == 2 and "bad_request" in err

        code, out, _ = await ctl(sock, "--json", "status")
        status = json.loads(out)
        assert status["ready"] is True
        assert status["states"]["online"] == 5 and len(status["states"]) == 9
        assert all(db["up"] for db in status["databases"].values())
        code, out, _ = await ctl(sock, "status")
        assert code == 0 and "online" in out and "databases: core up" in out

        text = stack.config.read_text().replace("timeout = 1.5", "timeout = 2.5")
        stack.config.write_text(text)
        code, out, err = await ctl(sock, "reload")
        assert code == 0, err
        assert stack.daemon.settings.heartbeat.timeout == 2.5
        stack.config.write_text(text + "\n[heartbeat]\nnot_a_key = 1\n")
        code, out, err = await ctl(sock, "reload")
        assert code == 1 and "invalid_config" in err
        assert stack.daemon.settings.heartbeat.timeout == 2.5


async def test_pause_mutes_automatic_recovery_and_resume_rearms_it(
    migrated_urls: dict[str, str], tmp_path: Path, sock_dir: Path
) -> None:
    sock = sock_dir / "control.sock"
    async with running(migrated_urls, tmp_path, sock, "", accounts=3) as stack:
        dbs = stack.dbs
        paused, control = stack.ids[0], stack.ids[1]
        code, out, err = await ctl(sock, "pause", paused, "--reason", "worker host maintenance")
        assert code == 0, err
        assert f"paused {paused}: worker host maintenance" in out
        row = await supervision(dbs, paused)
        assert row["paused"] and row["paused_reason"] == "worker host maintenance"
        assert await state_of(dbs, paused) == "online"  # pausing is not a status change
        code, out, _ = await ctl(sock, "pause", paused)
        assert code == 0 and "already paused" in out

        for account in (paused, control):
            code, _, err = await ctl(sock, "force", account, "offline", "--reason", "drill")
            assert code == 0, err

        async def control_recovered() -> bool:
            rows = await status_logs(dbs, control)
            return any(r["new_status"] == "recovering" for r in rows)

        # Backoff is 0.2 s doubling to 1 s: the unpaused account is retried well within this.
        await wait_for(control_recovered, 10, "automatic recovery of the unpaused account")
        await asyncio.sleep(2.0)
        assert await state_of(dbs, paused) == "offline"
        assert all(r["new_status"] != "recovering" for r in await status_logs(dbs, paused))
        code, out, _ = await ctl(sock, "--json", "show", paused)
        shown = json.loads(out)["account"]
        assert shown["paused"] is True and shown["paused_reason"] == "worker host maintenance"
        assert shown["scheduled"] is None

        code, out, err = await ctl(sock, "resume", paused)
        assert code == 0, err
        assert f"resumed {paused}" in out
        assert not (await supervision(dbs, paused))["paused"]

        async def back_online() -> bool:
            return await state_of(dbs, paused) == "online"

        await wait_for(back_online, 20, "the resumed account recovered")
        kinds = sorted(o["operation_type"] for o in await op_logs(dbs, paused))
        assert "account.pause" in kinds and "account.resume" in kinds


async def test_daemon_down_is_exit_6(sock_dir: Path) -> None:
    code, _, err = await ctl(sock_dir / "missing.sock", "status")
    assert code == 6 and "no control socket" in err
    stale = sock_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    code, _, err = await ctl(stale, "status")
    assert code == 6 and "nothing is listening" in err
    code, out, _ = await ctl(stale, "--json", "status")
    assert code == 6 and json.loads(out)["exit_status"] == 6


# --------------------------------------------------------------------------- malformed input


async def test_malformed_requests_get_error_codes_never_a_500(
    migrated_urls: dict[str, str], tmp_path: Path, sock_dir: Path
) -> None:
    sock = sock_dir / "control.sock"
    async with running(migrated_urls, tmp_path, sock, "", accounts=1) as stack:
        a = stack.ids[0]
        force = f"/v1/accounts/{a}/force"
        cases: list[tuple[str, str, Any, int, str]] = [
            ("POST", force, b"{not json", 400, "bad_request"),
            ("POST", force, b"\xff\xfe", 400, "bad_request"),
            ("POST", force, b"[1, 2]", 400, "bad_request"),
            ("POST", force, {"state": "online"}, 400, "bad_request"),  # no reason
            ("POST", force, {"state": "online", "reason": ""}, 400, "bad_request"),
            ("POST", force, {"state": "online", "reason": 5}, 400, "bad_request"),
            ("POST", force, {"state": "asleep", "reason": "x"}, 400, "bad_request"),
            ("POST", force, {"state": None, "reason": "x"}, 400, "bad_request"),
            (
                "POST",
                force,
                {"state": "error", "reason": "x", "dry_run": "yes"},
                400,
                "bad_request",
            ),
            ("POST", force, {"state": "error", "reason": "x", "extra": 1}, 400, "bad_request"),
            ("POST", force, {"state": "error", "reason": "x" * 500}, 400, "bad_request"),
            ("POST", force, b"x" * 100_000, 413, "payload_too_large"),
            (
                "POST",
                "/v1/accounts/nope/force",
                {"state": "error", "reason": "x"},
                404,
                "not_found",
            ),
            ("POST", f"/v1/accounts/{a}/pause", {"reason": ["a"]}, 400, "bad_request"),
            ("POST", "/v1/reload", b'"x"', 400, "bad_request"),
            ("GET", "/v1/accounts?limit=abc", None, 400, "bad_request"),
            ("GET", "/v1/accounts?limit=-1", None, 400, "bad_request"),
            ("GET", "/v1/accounts?state=weird", None, 400, "bad_request"),
            ("GET", f"/v1/accounts/{a}/history?limit=99999", None, 400, "bad_request"),
            ("GET", "/v1/nothing-here", None, 404, "no_such_endpoint"),
            ("GET", "/", None, 404, "no_such_endpoint"),
            ("DELETE", "/v1/status", None, 405, "method_not_allowed"),
            ("GET", force, None, 405, "method_not_allowed"),
        ]
        connector = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession(connector=connector) as http:
            for method, path, body, status, code in cases:
                kwargs: dict[str, Any] = {}
                if isinstance(body, bytes):
                    kwargs["data"] = body
                elif body is not None:
                    kwargs["json"] = body
                async with http.request(method, f"http://control{path}", **kwargs) as resp:
                    payload = await resp.json(content_type=None)
                    assert (resp.status, payload["error"]["code"]) == (status, code), (
                        method,
                        path,
                        body,
                        payload,
                    )
                    assert payload["error"]["message"]
            # After all that, the daemon still answers and nothing changed.
            async with http.get("http://control/v1/status") as resp:
                assert resp.status == 200
        assert await state_of(stack.dbs, a) == "online"
        assert [r for r in await status_logs(stack.dbs, a) if r["operator_id"]] == []


async def test_a_raw_garbage_request_does_not_break_the_listener(
    migrated_urls: dict[str, str], tmp_path: Path, sock_dir: Path
) -> None:
    sock = sock_dir / "control.sock"
    async with running(migrated_urls, tmp_path, sock, "", accounts=0):
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(b"\x00\x01 not http at all\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        # Not even HTTP: aiohttp's parser answers 400 (plain text) before our app is involved.
        assert answer.split(b"\r\n", 1)[0] in (
            b"HTTP/1.0 400 Bad Request",
            b"HTTP/1.1 400 Bad Request",
        )
        started = time.monotonic()
        code, _, err = await ctl(sock, "status")
        assert code == 0, err
        assert time.monotonic() - started < 30


async def test_requests_of_known_peers_are_admitted_to_the_admin_lane(
    migrated_urls: dict[str, str], tmp_path: Path, sock_dir: Path
) -> None:
    # The lane lets accountctl requests that run on the main loop go ahead of heartbeat
    # batches (tests/test_priority.py); only peers with a role get that, never a refused one.
    # show runs on the side loop and needs no admission.
    sock = sock_dir / "control.sock"
    async with running(migrated_urls, tmp_path, sock, 'group = "nogroup"', accounts=1) as stack:
        lane = stack.daemon.lane
        before = lane.admitted
        code, _, err = await ctl(sock, "status")
        assert code == 0, err
        code, _, err = await ctl(sock, "show", stack.ids[0])
        assert code == 0, err
        assert lane.admitted == before + 1
        assert lane.admins == 0
        if CAN_SWITCH_USER:
            code, _, _ = await ctl(sock, "status", uid=STRANGER, gid=NOBODY)
            assert code == 5
            assert lane.admitted == before + 1


def _get(family: int, address: Any, path: str) -> tuple[int, bytes, float]:
    """A blocking HTTP/1.0 GET (from a thread): status, body, when it ended."""
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(address)
        conn.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    ended = time.monotonic()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body, ended


async def test_show_history_and_health_answer_while_the_main_loop_is_stuck(
    migrated_urls: dict[str, str], tmp_path: Path, sock_dir: Path
) -> None:
    # The control socket and the metrics listener run on the side loop (side_loop.py): a
    # main loop held by one long callback (a heartbeat flood, in production) does not hold
    # them. `status` walks the accounts, so it runs on the main loop and waits its turn.
    sock = sock_dir / "control.sock"
    async with running(migrated_urls, tmp_path, sock, "", accounts=1) as stack:
        daemon = stack.daemon
        account = stack.ids[0]
        loop = asyncio.get_running_loop()
        stuck = 3.0
        calls = {
            "show": (socket.AF_UNIX, str(sock), f"/v1/accounts/{account}"),
            "history": (socket.AF_UNIX, str(sock), f"/v1/accounts/{account}/history"),
            "status": (socket.AF_UNIX, str(sock), "/v1/status"),
            "healthz": (socket.AF_INET, ("127.0.0.1", daemon.metrics_port), "/healthz"),
            "metrics": (socket.AF_INET, ("127.0.0.1", daemon.metrics_port), "/metrics"),
        }
        futures = {
            name: asyncio.ensure_future(asyncio.to_thread(_get, *call))
            for name, call in calls.items()
        }
        await asyncio.sleep(0)  # the threads are handed their work

        def hold() -> None:
            time.sleep(stuck)  # the main loop runs nothing else meanwhile

        started = time.monotonic()
        loop.call_soon(hold)
        await asyncio.sleep(0)
        released = started + stuck
        results = {name: await fut for name, fut in futures.items()}
        for name in ("show", "history", "healthz", "metrics"):
            status, body, ended = results[name]
            assert status == 200, (name, body)
            assert ended < released, f"{name} waited for the main loop"
        show = json.loads(results["show"][1])
        assert show["account"]["id"] == account
        assert show["row"]["status"] == "online"
        assert json.loads(results["history"][1])["history"]
        assert json.loads(results["healthz"][1])["alive"] is True
        assert b"accountd_accounts{" in results["metrics"][1]
        status, body, ended = results["status"]
        assert status == 200, body
        assert ended >= released  # served by the main loop, after the hold


async def test_main_loop_holds_of_show_and_history_are_exported_as_metrics(
    migrated_urls: dict[str, str], tmp_path: Path, sock_dir: Path
) -> None:
    # What the holds cost the main loop is visible to the operator: one hold per show or
    # history request, none for endpoints served by the main loop itself (status).
    sock = sock_dir / "control.sock"
    async with running(migrated_urls, tmp_path, sock, "", accounts=1) as stack:
        account = stack.ids[0]
        scrape = (socket.AF_INET, ("127.0.0.1", stack.daemon.metrics_port), "/metrics")

        async def holds() -> tuple[float, float]:
            status, body, _ = await asyncio.to_thread(_get, *scrape)
            assert status == 200
            families = parse(body.decode())
            names = ("accountd_main_loop_holds_total", "accountd_main_loop_held_seconds_total")
            assert all(families[name][0] == "counter" for name in names)
            count, seconds = (value(families, name) for name in names)
            return count, seconds

        async def get(path: str) -> None:
            status, body, _ = await asyncio.to_thread(_get, socket.AF_UNIX, str(sock), path)
            assert status == 200, body

        count, seconds = await holds()
        await get(f"/v1/accounts/{account}")
        await get(f"/v1/accounts/{account}/history")
        await asyncio.sleep(0.05)  # each hold's callback has run on this (the main) loop
        count_after, seconds_after = await holds()
        assert count_after == count + 2
        assert seconds_after >= seconds
        await get("/v1/status")
        await asyncio.sleep(0.05)
        assert (await holds())[0] == count_after
