"""`accountctl` on its own: arguments, exit statuses, the socket search order, table output.

The round trips against a running daemon are in tests/test_control.py; these need no daemon.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from accountd import ctl
from accountd.daemon.control_views import ERROR_STATUS
from accountd.statemachine import State

COMMANDS = ("status", "list", "show", "history", "force", "recover", "pause", "resume", "reload")


def test_state_choices_are_exactly_the_nine_states() -> None:
    assert tuple(s.value for s in State) == ctl.STATES


def test_every_daemon_error_code_has_a_documented_exit_status() -> None:
    mapped = {code: ctl.CODE_EXIT.get(code, ctl.EXIT_ERROR) for code in ERROR_STATUS}
    assert mapped == {
        "bad_request": 2,
        "permission_denied": 5,
        "not_found": 3,
        "no_such_endpoint": 1,
        "method_not_allowed": 1,
        "illegal_transition": 4,
        "conflict": 4,
        "payload_too_large": 1,
        "invalid_config": 1,
        "unavailable": 6,
        "internal": 1,
    }
    docs = (Path(__file__).parent.parent / "docs" / "control-api.md").read_text()
    for code, status in ERROR_STATUS.items():
        assert f"`{code}`" in docs, f"{code} is not documented"
        assert f"| {status} " in docs


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_everywhere_lists_the_exit_statuses(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl.main([command, "--help"] if command else ["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit statuses:" in out
    for status in range(7):
        assert f"\n  {status}  " in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nonsense"],
        ["show"],
        ["force", "acc", "online"],  # no --reason
        ["force", "acc", "asleep", "--reason", "x"],
        ["list", "--state", "asleep"],
        ["list", "--limit", "many"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["--socket", "/nonexistent/control.sock", *argv]) == ctl.EXIT_USAGE
    assert "accountctl:" in capsys.readouterr().err


def test_an_empty_reason_is_a_usage_error_before_any_connection(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--socket", "/nonexistent/control.sock", "force", "a", "online", "--reason", " "]
    assert ctl.main(argv) == ctl.EXIT_USAGE
    assert "--reason must not be empty" in capsys.readouterr().err


def test_no_daemon_or_a_silent_one_is_exit_6(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl.main(["--socket", str(tmp_path / "none.sock"), "status"]) == ctl.EXIT_UNREACHABLE
    assert "no control socket" in capsys.readouterr().err
    # A listener that never answers (a hung daemon): the timeout ends the wait.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = tmp_path / "silent.sock"
    with listener:
        listener.bind(str(path))
        listener.listen()
        argv = ["--socket", str(path), "--timeout", "0.5", "status"]
        assert ctl.main(argv) == ctl.EXIT_UNREACHABLE
    assert "no answer from accountd within 0.5s" in capsys.readouterr().err


def test_socket_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert ctl.default_socket({}) == ctl.SYSTEM_SOCKET
    (tmp_path / "var" / "demo").mkdir(parents=True)
    for path in ("var/demo/control.sock", "var/control.sock"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with s:
            s.bind(path)
        assert ctl.default_socket({}) == Path(path)
    assert ctl.default_socket({"ACCOUNTD_SOCKET": "/x/y.sock"}) == Path("/x/y.sock")


def test_tables_align_columns_and_never_break_rows() -> None:
    text = ctl.table(
        ["NAME", "N", "NOTE"],
        [["a", 1, "two\nlines"], ["longer-name", 12345, None], ["b", True, ""]],
        right=frozenset({1}),
    )
    lines = text.splitlines()
    assert lines == [
        "NAME             N  NOTE",
        "a                1  two lines",
        "longer-name  12345  -",
        "b              yes",
    ]
