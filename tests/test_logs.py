"""Log rendering (text and JSON) and redaction of registered secrets and URL passwords."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import Iterator

import pytest

from accountd.logs import redact, register_secret, setup_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Where setup_logging writes; the root logger is restored afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    out = io.StringIO()
    yield out
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def fresh_secret() -> str:
    # Unique per test: the registry is process-wide, as the logging it protects.
    return f"tok-{uuid.uuid4().hex}"


def emit_secret_everywhere(secret: str) -> None:
    log = logging.getLogger("accountd.test")
    url = "mysql+aiomysql://accountd:url-pw-1234@db:3306/saas_unified_core"
    log.warning(
        "worker rejected token %s via %s", secret, url, extra={"token": secret, "dsn": url, "n": 3}
    )
    try:
        raise RuntimeError(f"auth failed for {secret}")
    except RuntimeError:
        log.exception("ingest error")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_registered_secret_and_url_password_are_masked(stream: io.StringIO, fmt: str) -> None:
    secret = fresh_secret()
    register_secret(secret)
    setup_logging("info", fmt, stream=stream)
    emit_secret_everywhere(secret)
    out = stream.getvalue()
    assert secret not in out
    assert "url-pw-1234" not in out
    assert "mysql+aiomysql://accountd:***@db:3306/saas_unified_core" in out
    assert "RuntimeError: auth failed for ***" in out


def test_text_format_is_time_level_logger_message_fields(stream: io.StringIO) -> None:
    setup_logging("info", "text", stream=stream)
    logging.getLogger("accountd.ingest").info(
        "flushed %d heartbeats", 120, extra={"database": "core", "reason": "two words"}
    )
    logging.getLogger("accountd.ingest").debug("below the level")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z info accountd\.ingest: flushed 120 heartbeats "
        r"database=core reason='two words'",
        lines[0],
    ), lines[0]


def test_json_format_is_one_object_per_line_with_extra_fields(stream: io.StringIO) -> None:
    secret = fresh_secret() + '"\\'  # characters JSON escapes must still be masked
    register_secret(secret)
    setup_logging("debug", "json", stream=stream)
    emit_secret_everywhere(secret)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["event"] for r in records] == [
        "worker rejected token *** via mysql+aiomysql://accountd:***@db:3306/saas_unified_core",
        "ingest error",
    ]
    first = records[0]
    assert (first["level"], first["logger"], first["token"], first["n"]) == (
        "warning",
        "accountd.test",
        "***",
        3,
    )
    assert first["timestamp"].endswith("Z")
    assert "Traceback" in records[1]["exception"]
    assert secret not in json.dumps(records)


def test_setup_again_replaces_the_handler_and_changes_the_level(stream: io.StringIO) -> None:
    setup_logging("info", "text", stream=stream)
    setup_logging("warning", "text", stream=stream)
    log = logging.getLogger("accountd.reload")
    log.info("hidden")
    log.warning("shown")
    assert [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()] == ["shown"]


def test_redact_handles_urls_and_leaves_other_text_alone() -> None:
    assert redact("postgresql://u:p%40ss@h/db and https://x:y@h2") == (
        "postgresql://u:***@h/db and https://x:***@h2"
    )
    assert redact("sqlite+aiosqlite:////var/lib/accountd/core.db") == (
        "sqlite+aiosqlite:////var/lib/accountd/core.db"
    )
    assert redact("http://127.0.0.1:8480/v1/sessions") == "http://127.0.0.1:8480/v1/sessions"
    assert (
        redact("mysql+aiomysql://root@127.0.0.1:3306/") == "mysql+aiomysql://root@127.0.0.1:3306/"
    )


def test_bad_level_or_format_is_rejected(stream: io.StringIO) -> None:
    with pytest.raises(ValueError, match="log level"):
        setup_logging("loud", "text", stream=stream)
    with pytest.raises(ValueError, match="log format"):
        setup_logging("info", "xml", stream=stream)
