"""The shipped systemd files: `systemd-analyze verify`, the security exposure, sysusers/tmpfiles,
and the daemon running under MemoryDenyWriteExecute's kernel equivalent.

Tests that need a tool skip, saying which, only where the tool is absent (or, for creating
files owned by another user, where the tests do not run as root).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from accountd.settings import SupervisorSettings, load_settings
from tests.test_e2e import seed_accounts, statuses, wait_for
from tests.test_signals import Rig, open_rig

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "accountd.service"
SYSUSERS = ROOT / "systemd" / "accountd.sysusers.conf"
TMPFILES = ROOT / "systemd" / "accountd.tmpfiles.conf"
# Where distributions keep systemd's own units (sysinit.target, ...), merged-/usr or not.
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed here (Debian: apt-get install systemd)")
    return path


def directives(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values...]}}; keys may repeat, as systemd allows."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def verify_root(tmp_path: Path, unit_text: str) -> Path:
    """A file system root holding systemd's units, our unit and the programs it runs.

    `systemd-analyze verify` checks that ExecStart= and ExecReload= name executables; the
    installed /usr/bin/accountd does not exist on a build machine, so a stand-in does, inside a
    root of its own.
    """
    units = next((d for d in SYSTEM_UNIT_DIRS if (d / "sysinit.target").exists()), None)
    if units is None:
        pytest.skip("systemd's own unit files (sysinit.target) are not installed here")
    root = tmp_path / "root"
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    for program in ("usr/bin/accountd", "bin/kill"):
        path = root / program
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/accountd.service").write_text(unit_text)
    return root


def analyze_verify(tmp_path: Path, unit_text: str) -> subprocess.CompletedProcess[str]:
    analyze = tool("systemd-analyze")
    root = verify_root(tmp_path, unit_text)
    return subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", "accountd.service"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --------------------------------------------------------------------------- the unit


def test_unit_has_what_the_issue_asks_for() -> None:
    unit = directives(UNIT.read_text())
    service = unit["Service"]
    one = {key: values[-1] for key, values in service.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["WatchdogSec"] == "30"
    assert one["ExecStart"] == "/usr/bin/accountd run --config /etc/accountd/accountd.toml"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure" and float(one["RestartSec"]) > 0
    assert one["User"] == one["Group"] == "accountd"
    assert one["RuntimeDirectory"] == one["StateDirectory"] == "accountd"
    assert one["ConfigurationDirectory"] == "accountd"
    assert one["RuntimeDirectoryMode"] == "0750" and one["UMask"] == "0027"
    assert one["CapabilityBoundingSet"] == "" and one["AmbientCapabilities"] == ""
    assert one["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert service["SystemCallFilter"][0] == "@system-service"
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictRealtime",
        "RestrictSUIDSGID",
    ):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert one["SystemCallArchitectures"] == "native"
    # The stop timeout leaves room for the daemon's own bounded drain (supervisor grace plus a
    # few seconds each for ingest, the scheduler and the outbox) before systemd's SIGKILL.
    assert float(one["TimeoutStopSec"]) >= SupervisorSettings().shutdown_timeout + 15


def test_unit_puts_the_control_socket_where_accountctl_looks() -> None:
    service = directives(UNIT.read_text())["Service"]
    env = dict(item.split("=", 1) for line in service["Environment"] for item in line.split())
    # %t is /run for a system service: the BRIEF's /run/accountd/control.sock.
    socket = env["ACCOUNTD_CONTROL__SOCKET"].replace("%t", "/run")
    assert socket == "/run/accountd/control.sock"
    settings = load_settings(None, env={"ACCOUNTD_CONTROL__SOCKET": socket})
    assert settings.control.socket == Path("/run/accountd/control.sock")


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    result = analyze_verify(tmp_path, UNIT.read_text())
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # warnings count as failures here


def test_systemd_analyze_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above can fail: a misspelt directive is reported."""
    broken = UNIT.read_text().replace("NotifyAccess=main", "NotifyAcess=main")
    result = analyze_verify(tmp_path, broken)
    assert "NotifyAcess" in result.stderr


def test_security_exposure_is_ok(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert found, result.stdout + result.stderr
    exposure, verdict = float(found.group(1)), found.group(2)
    assert exposure <= 2.0 and verdict == "OK", result.stdout
    assert result.returncode == 0, result.stdout  # --threshold=20 is 2.0 on systemd's scale


def test_sysusers_and_tmpfiles_create_the_user_and_directories(tmp_path: Path) -> None:
    sysusers, tmpfiles = tool("systemd-sysusers"), tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("creating files owned by another user needs root")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run([sysusers, f"--root={root}", str(SYSUSERS)], check=True, timeout=60)
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    user = passwd["accountd"]
    uid, gid, home = int(user[2]), int(user[3]), user[5]
    assert uid < 1000 and home == "/var/lib/accountd"  # a system user
    subprocess.run([tmpfiles, f"--root={root}", "--create", str(TMPFILES)], check=True, timeout=60)

    def owner_mode(path: str) -> tuple[int, int, int]:
        st = (root / path).stat()
        return st.st_uid, st.st_gid, st.st_mode & 0o7777

    assert owner_mode("etc/accountd") == (0, gid, 0o750)
    assert owner_mode("etc/accountd/accountd.env") == (0, gid, 0o640)
    assert owner_mode("var/lib/accountd") == (uid, gid, 0o750)
    # The unit declares the same modes, so systemd finds nothing to complain about.
    one = {k: v[-1] for k, v in directives(UNIT.read_text())["Service"].items()}
    assert one["StateDirectoryMode"] == one["ConfigurationDirectoryMode"] == "0750"


# --------------------------------------------------------------------------- MemoryDenyWriteExecute

# Runs the command after it under the kernel's "memory deny write execute" (prctl PR_SET_MDWE,
# Linux >= 6.3), which refuses the same mappings as systemd's MemoryDenyWriteExecute=yes and is
# inherited across execve. Exit 77 when the kernel lacks it.
MDWE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""


def under_mdwe(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", MDWE, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_mdwe_refuses_writable_executable_memory() -> None:
    """The control for the test below: under MDWE a W+X mapping really is refused."""
    result = under_mdwe(
        "import mmap\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "except PermissionError:\n"
        "    print('refused')\n"
    )
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
    assert result.stdout.strip() == "refused", result.stderr


@pytest.fixture
async def rig(migrated_urls: dict[str, str], tmp_path: Path) -> AsyncIterator[Rig]:
    async with open_rig(migrated_urls, tmp_path) as r:
        yield r


async def test_daemon_runs_under_memory_deny_write_execute(rig: Rig) -> None:
    if under_mdwe("pass").returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
    rig.write_config()
    ids = await seed_accounts(rig.dbs, 10)
    rig.spawn(prefix=[sys.executable, "-c", MDWE])
    await rig.wait_log("ready:")

    async def online() -> bool:
        current = await statuses(rig.dbs)
        return all(current[a] == "online" for a in ids)

    # Every library on the daemon's path ran: HTTP both ways, the database driver, the policy.
    await wait_for(online, 30, "accounts online under MDWE")
    rig.signal(signal.SIGHUP)
    await rig.wait_log("reload: applied")
    rig.signal(signal.SIGTERM)
    assert await rig.exit_status(30) == 0, rig.log()[-4000:]
