"""Settings: defaults, TOML, environment overrides, one-line errors naming the key, and the
``accountd config check`` / ``accountd run`` command lines as real subprocesses."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from accountd.adapters.db import PoolSettings
from accountd.cli import main
from accountd.errors import ConfigError
from accountd.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "config" / "accountd.toml"
EXAMPLE = REPO / "config" / "accountd.example.toml"


def write(tmp_path: Path, text: str, name: str = "accountd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m accountd.cli ARGS` in a clean environment (no ACCOUNTD_* or systemd leaks)."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ACCOUNTD_") and k != "STATE_DIRECTORY"
    }
    base["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "accountd.cli", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --------------------------------------------------------------------------- defaults & sources


def test_defaults_without_file_or_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(None, {})
    var = tmp_path / "var"
    assert s.state_dir == var
    assert s.database_urls() == {
        key: f"sqlite+aiosqlite:///{var}/{key}.db" for key in ("core", "platform", "analytics")
    }
    assert s.control.socket == var / "control.sock"
    assert (s.ingest.host, s.ingest.port) == ("127.0.0.1", 8470)
    assert s.ingest.token is None
    assert s.metrics.listen == "127.0.0.1:9464" and s.metrics.per_tenant is False
    assert s.worker.url == "http://127.0.0.1:8480"
    assert s.heartbeat.timeout == 45 and s.heartbeat.persist_interval == 15
    assert s.deadlines.waiting_qr == 120 and s.deadlines.qr_max_refreshes == 3
    assert (s.recovery.base, s.recovery.cap, s.recovery.max_attempts) == (10, 300, 8)
    assert s.recovery.error_retry_after == 1800 and s.recovery.mass_offline_ratio == 0.3
    assert s.supervisor.shutdown_timeout == 20
    assert (s.logging.level, s.logging.format) == ("info", "text")
    assert s.retention.operation_logs_days == 365
    assert s.pool() == PoolSettings(
        size=10, max_overflow=10, timeout=10, recycle=3600, connect_timeout=5
    )
    assert s.source_path is None


def test_state_directory_from_systemd_places_databases_and_socket(tmp_path: Path) -> None:
    s = load_settings(None, {"STATE_DIRECTORY": f"{tmp_path}/state:{tmp_path}/other"})
    assert s.state_dir == tmp_path / "state"
    assert s.databases.core == f"sqlite+aiosqlite:///{tmp_path}/state/core.db"
    assert s.control.socket == tmp_path / "state" / "control.sock"


def test_toml_file_sets_values_and_keeps_other_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
state_dir = "{tmp_path}/data"
[heartbeat]
timeout = 30.5
[ingest]
listen = "[::1]:9000"
token = "file-token-0123456789"
[control]
admin_uids = [1000, 1001]
[logging]
level = "DEBUG"
format = "json"
""",
    )
    s = load_settings(path, {})
    assert s.source_path == path
    assert s.heartbeat.timeout == 30.5
    assert s.heartbeat.flush_interval == 1
    assert (s.ingest.host, s.ingest.port, s.ingest.listen) == ("::1", 9000, "[::1]:9000")
    assert (
        s.ingest.token is not None and s.ingest.token.get_secret_value() == "file-token-0123456789"
    )
    assert s.control.admin_uids == [1000, 1001]
    assert (s.logging.level, s.logging.format) == ("debug", "json")
    assert s.databases.analytics == f"sqlite+aiosqlite:///{tmp_path}/data/analytics.db"


def test_environment_overrides_file_including_token_and_database_url(tmp_path: Path) -> None:
    path = write(tmp_path, '[heartbeat]\ntimeout = 30\n[ingest]\ntoken = "from-file-token"\n')
    url = "mysql+aiomysql://accountd:p%40ss@db.internal:3306/wework_platform"
    s = load_settings(
        path,
        {
            "ACCOUNTD_HEARTBEAT__TIMEOUT": "60",
            "ACCOUNTD_INGEST__TOKEN": "from-env-token",
            "ACCOUNTD_DATABASES__PLATFORM": url,
            "ACCOUNTD_CONTROL__READONLY_GIDS": "10, 20",
            "ACCOUNTD_METRICS__PER_TENANT": "true",
            "ACCOUNTD_STATE_DIR": str(tmp_path / "st"),
            "ACCOUNTD_TEST_MYSQL_URL": "reserved for the test suite, not a key",
            "PATH": "/usr/bin",
        },
    )
    assert s.heartbeat.timeout == 60
    assert s.ingest.token is not None and s.ingest.token.get_secret_value() == "from-env-token"
    assert s.database_urls()["platform"] == url
    assert s.database_urls()["core"] == f"sqlite+aiosqlite:///{tmp_path}/st/core.db"
    assert s.control.readonly_gids == [10, 20]
    assert s.metrics.per_tenant is True
    assert sorted(s.secrets()) == ["from-env-token", "p@ss"]


def test_masked_hides_token_and_passwords_but_database_urls_keep_them(tmp_path: Path) -> None:
    url = "mysql+aiomysql://accountd:hunter2-pw@db:3306/saas_unified_core"
    s = load_settings(
        None, {"ACCOUNTD_DATABASES__CORE": url, "ACCOUNTD_INGEST__TOKEN": "tok-abcdefghijklmnop"}
    )
    masked = s.masked()
    assert masked["ingest"]["token"] == "***"
    assert masked["databases"]["core"] == "mysql+aiomysql://accountd:***@db:3306/saas_unified_core"
    assert "hunter2-pw" not in json.dumps(masked) and "tok-abc" not in json.dumps(masked)
    assert s.database_urls()["core"] == url


def test_run_requires_a_token_but_check_only_warns(tmp_path: Path) -> None:
    s = load_settings(None, {"ACCOUNTD_STATE_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"^config error: ingest\.token: required"):
        s.require_runnable()
    assert any(w.startswith("ingest.token: not set") for w in s.warnings())
    load_settings(None, {"ACCOUNTD_INGEST__TOKEN": "x" * 32}).require_runnable()


def test_non_loopback_listen_is_allowed_with_a_warning() -> None:
    s = load_settings(
        None,
        {
            "ACCOUNTD_INGEST__LISTEN": "0.0.0.0:8470",
            "ACCOUNTD_INGEST__TOKEN": "t" * 32,
            "ACCOUNTD_METRICS__LISTEN": "localhost:9464",
        },
    )
    assert [w.split(":")[0] for w in s.warnings()] == ["ingest.listen"]


# --------------------------------------------------------------------------- errors name the key

BAD_FILES = [
    pytest.param('[ingest]\ntokn = "x"\n', "ingest.tokn: unknown key", id="unknown-key"),
    pytest.param("[nosuch]\nx = 1\n", "nosuch: unknown key", id="unknown-section"),
    pytest.param(
        '[heartbeat]\ntimeout = "abc"\n',
        "heartbeat.timeout: Input should be a valid number",
        id="wrong-type",
    ),
    pytest.param("[heartbeat]\ntimeout = true\n", "heartbeat.timeout:", id="bool-as-number"),
    pytest.param(
        "[heartbeat]\ntimeout = 0\n",
        "heartbeat.timeout: Input should be greater than 0",
        id="zero-timeout",
    ),
    pytest.param(
        '[databases]\ncore = "postgresql://u:hunter2@h/db"\n',
        "databases.core: unsupported driver 'postgresql'",
        id="bad-driver",
    ),
    pytest.param(
        '[databases]\nplatform = "::not a url::"\n',
        "databases.platform: not a valid SQLAlchemy URL",
        id="bad-url",
    ),
    pytest.param(
        '[databases]\nanalytics = "mysql+aiomysql://u:hunter2@h"\n',
        "databases.analytics: needs a database name",
        id="url-without-db",
    ),
    pytest.param(
        '[ingest]\nlisten = "127.0.0.1"\n',
        "ingest.listen: expected 'host:port'",
        id="listen-no-port",
    ),
    pytest.param(
        '[metrics]\nlisten = "127.0.0.1:70000"\n',
        "metrics.listen: port '70000'",
        id="listen-bad-port",
    ),
    pytest.param(
        '[metrics]\nlisten = "::1:9464"\n',
        "metrics.listen: an IPv6 address must be written in brackets",
        id="listen-v6-unbracketed",
    ),
    pytest.param('[worker]\nurl = "ftp://x"\n', "worker.url: expected an http", id="worker-url"),
    pytest.param(
        "[recovery]\nbase = 60\ncap = 30\n",
        "recovery.cap: must be >= recovery.base",
        id="cap-below-base",
    ),
    pytest.param(
        "[recovery]\nmass_offline_ratio = 1.5\n",
        "recovery.mass_offline_ratio:",
        id="ratio-above-one",
    ),
    pytest.param(
        "[recovery]\nerror_retry_after = -1\n", "recovery.error_retry_after:", id="negative-retry"
    ),
    pytest.param('[logging]\nlevel = "loud"\n', "logging.level:", id="log-level"),
    pytest.param("[control]\nadmin_uids = [0, -5]\n", "control.admin_uids[1]:", id="negative-uid"),
    pytest.param('[ingest]\ntoken = ""\n', "ingest.token: must not be empty", id="empty-token"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_FILES)
def test_bad_file_is_one_line_config_error_naming_the_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), {})
    message = str(info.value)
    assert message.startswith("config error: " + expected), message
    assert "\n" not in message
    assert "hunter2" not in message  # a URL that failed validation is never echoed


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ACCOUNTD_INGEST__TOKN": "x"}, "ingest.tokn: unknown key (from ACCOUNTD_INGEST__TOKN)"),
        ({"ACCOUNTD_NOSUCH__KEY": "1"}, "nosuch: unknown section"),
        ({"ACCOUNTD_STATEDIR": "/x"}, "statedir: unknown key"),
        ({"ACCOUNTD_INGEST": "x"}, "ingest: is a section"),
        (
            {"ACCOUNTD_HEARTBEAT__TIMEOUT": "abc"},
            "heartbeat.timeout: Input should be a valid number",
        ),
        ({"ACCOUNTD_CONTROL__ADMIN_UIDS": "1,x"}, "control.admin_uids[1]:"),
        (
            {"ACCOUNTD_DATABASES__CORE": "sqlite:///x.db"},
            "databases.core: unsupported driver 'sqlite'",
        ),
    ],
)
def test_bad_environment_variable_names_the_key(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env)
    assert str(info.value).startswith("config error: " + expected), str(info.value)


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[heartbeat]\ntimeout = 45\nflush_interval 1\n")
    with pytest.raises(
        ConfigError, match=rf"^config error: {re.escape(str(path))}: invalid TOML: .*line 3"
    ):
        load_settings(path, {})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "absent.toml", {})


# --------------------------------------------------------------------------- the shipped files


def _documented_keys(text: str) -> dict[str, set[str]]:
    """{section: keys} for `key = ...` lines, active or commented out (`# key = ...`)."""
    found: dict[str, set[str]] = {"": set()}
    section = ""
    for line in text.splitlines():
        if m := re.match(r"^\[(\w+)\]\s*$", line):
            section = m.group(1)
            found.setdefault(section, set())
        elif m := re.match(r"^(?:# )?(\w+) = ", line):
            found[section].add(m.group(1))
    return found


def test_reference_file_documents_every_key_and_loads_to_the_defaults(tmp_path: Path) -> None:
    documented = _documented_keys(REFERENCE.read_text(encoding="utf-8"))
    top_level = {name for name, f in Settings.model_fields.items() if not _is_section(f.annotation)}
    assert documented[""] == top_level
    for name, field in Settings.model_fields.items():
        if _is_section(field.annotation):
            assert isinstance(field.annotation, type)
            assert documented.get(name) == set(field.annotation.model_fields), name
    env = {"ACCOUNTD_STATE_DIR": str(tmp_path)}
    assert load_settings(REFERENCE, env).model_dump() == load_settings(None, env).model_dump()


def _is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def test_example_file_loads_with_secrets_from_the_environment() -> None:
    url = "mysql+aiomysql://accountd:ex-pw@db.internal:3306/saas_unified_core"
    s = load_settings(
        EXAMPLE, {"ACCOUNTD_INGEST__TOKEN": "e" * 64, "ACCOUNTD_DATABASES__CORE": url}
    )
    s.require_runnable()
    assert s.database_urls()["core"] == url
    assert all(u.startswith("mysql+aiomysql://") for u in s.database_urls().values())
    assert str(s.control.socket) == "/run/accountd/control.sock"


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize(("text", "expected"), BAD_FILES)
def test_config_check_on_bad_file_exits_2_with_one_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    proc = run_cli("config", "check", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("accountd: config error: " + expected), lines[0]


def test_config_check_masks_secrets_and_round_trips(tmp_path: Path) -> None:
    token = "tok-Very-Secret-4f1b2c3d"
    password = "pw-Very-Secret-9a8b"
    core = f"mysql+aiomysql://accountd:{password}@db:3306/saas_unified_core"
    env = {
        "ACCOUNTD_INGEST__TOKEN": token,
        "ACCOUNTD_DATABASES__CORE": core,
        "ACCOUNTD_INGEST__LISTEN": "0.0.0.0:8470",
    }
    proc = run_cli("config", "check", "--config", str(REFERENCE), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    for secret in (token, password):
        assert secret not in proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        "accountd: warning: ingest.listen: 0.0.0.0:8470 is not a loopback address; "
        "make sure a firewall keeps it off untrusted networks"
    ]
    printed = tomllib.loads(proc.stdout)
    assert printed["ingest"]["token"] == "***"
    assert printed["databases"]["core"] == "mysql+aiomysql://accountd:***@db:3306/saas_unified_core"
    # Apart from the masked values, the printed config is the effective config.
    expected = load_settings(
        REFERENCE, {**env, "ACCOUNTD_STATE_DIR": str(tmp_path / "var")}
    ).masked()
    _drop_none(expected)
    assert printed == expected


def _drop_none(data: dict[str, object]) -> None:
    for key, value in list(data.items()):
        if value is None:
            del data[key]
        elif isinstance(value, dict):
            _drop_none(value)


def test_config_check_json_without_token_warns(tmp_path: Path) -> None:
    proc = run_cli("config", "check", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ingest"]["token"] is None
    assert data["state_dir"] == str(tmp_path / "var")
    assert "ingest.token: not set" in proc.stderr


def test_run_without_token_refuses_with_exit_2(tmp_path: Path) -> None:
    proc = run_cli("run", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "accountd: config error: ingest.token: required to run the daemon "
        "(set it in the config file or in ACCOUNTD_INGEST__TOKEN)"
    ]


def test_usage_errors_exit_2_and_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 2
    assert main(["db", "downgrade"]) == 2
    assert main(["demo", "--accounts", "0"]) == 2
    assert "usage: accountd" in capsys.readouterr().err
    assert main(["db", "verify", "--help"]) == 0
    assert "--config PATH" in capsys.readouterr().out


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_database_exits_1_with_one_line_and_no_password(tmp_path: Path) -> None:
    pytest.importorskip("accountd.adapters.migrate")
    password = "pw-never-printed-77"
    url = f"mysql+aiomysql://root:{password}@127.0.0.1:{_closed_port()}/saas_unified_core"
    proc = run_cli(
        "db",
        "current",
        cwd=tmp_path,
        env={"ACCOUNTD_DATABASES__CORE": url, "ACCOUNTD_DATABASES__CONNECT_TIMEOUT": "2"},
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert password not in proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("accountd: ")


def test_db_upgrade_current_downgrade_through_the_cli(
    tmp_path: Path, db_urls: dict[str, str]
) -> None:
    pytest.importorskip("accountd.adapters.migrate")
    env = {f"ACCOUNTD_DATABASES__{key.upper()}": url for key, url in db_urls.items()}
    before = run_cli("db", "current", cwd=tmp_path, env=env)
    assert before.returncode == 0, before.stderr
    assert before.stdout.splitlines() == [
        f"{key}: (empty: no revision)" for key in ("core", "platform", "analytics")
    ]
    up = run_cli("db", "upgrade", cwd=tmp_path, env=env)
    assert up.returncode == 0, up.stderr
    revisions = dict(line.split(": ", 1) for line in up.stdout.splitlines())
    assert sorted(revisions) == ["analytics", "core", "platform"]
    assert all(rev.startswith(key) for key, rev in revisions.items()), revisions
    bad = run_cli("db", "downgrade", "no-such-revision", cwd=tmp_path, env=env)
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1].startswith("accountd: db downgrade: ")
    down = run_cli("db", "downgrade", "base", cwd=tmp_path, env=env)
    assert down.returncode == 0, down.stderr
    assert down.stdout == before.stdout
