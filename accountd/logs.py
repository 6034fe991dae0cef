"""Logging: stdlib loggers rendered by structlog, one line per record, secrets masked.

Code everywhere logs with ``logging.getLogger(__name__)`` and ``extra={...}`` fields; this module
only decides how records look on stderr (journald adds its own timestamp, but ours is UTC and
precise, which matters when lining logs up with the database). Two renderings:

- text: ``2026-01-02T03:04:05.678901Z info accountd.ingest: flushed batch rows=120``
- json: one object per line, the ``extra`` fields as keys.

Redaction runs on every record we render: values registered with `register_secret` (the ingest
token, database passwords) and the password part of any ``scheme://user:password@host`` URL are
replaced by ``***`` before rendering, and once more on the rendered line, so a secret cannot reach
the logs whether it arrives in the message, an ``extra`` field or a traceback.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

MASK = "***"
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")

# scheme://user:PASSWORD@host — the password stops at the '@' that starts the host.
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)[^@\s/]+(?=@)")
_lock = threading.Lock()
_secrets: set[str] = set()
_secret_pattern: re.Pattern[str] | None = None
# Marks the handler we install, so a second setup_logging (SIGHUP reload) replaces it.
_HANDLER_NAME = "accountd"
_CHATTY = ("aiohttp.access", "apscheduler", "alembic")
# Values the renderers print as they are; anything else is turned into (redacted) text.
_PRIMITIVES = (str, int, float, bool, type(None))


def register_secret(value: str) -> None:
    """Mask `value` wherever it appears in later log output. Empty values are ignored."""
    global _secret_pattern
    if not value:
        return
    with _lock:
        _secrets.add(value)
        # Longest first, so a secret that contains another is masked whole.
        ordered = sorted(_secrets, key=len, reverse=True)
        _secret_pattern = re.compile("|".join(re.escape(s) for s in ordered))


def redact(text: str) -> str:
    """`text` with registered secrets and URL passwords replaced by ``***``."""
    pattern = _secret_pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    return _URL_PASSWORD.sub(rf"\g<head>{MASK}", text)


def _redact_event(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    # Before rendering: a secret with characters that JSON escapes would no longer match the
    # rendered line, so values are cleaned while they are still plain strings.
    for key, value in list(event_dict.items()):
        event_dict[key] = _clean(value)
    return event_dict


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    return redact(str(value))


def _drop_formatter_attributes(
    _logger: WrappedLogger, _name: str, event_dict: EventDict
) -> EventDict:
    # Another handler's Formatter (pytest's, a library's) may already have stored these on the
    # shared LogRecord; ExtraAdder would take them for `extra=` fields.
    event_dict.pop("message", None)
    event_dict.pop("asctime", None)
    return event_dict


def _redact_line(_logger: WrappedLogger, _name: str, line: Any) -> Any:
    return redact(line) if isinstance(line, str) else line


def _render_text(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> str:
    """``<timestamp> <level> <logger>: <message> key=value ...`` then any traceback."""
    ev = dict(event_dict)
    head = f"{ev.pop('timestamp', '-')} {ev.pop('level', '-')} {ev.pop('logger', '-')}: "
    message = str(ev.pop("event", ""))
    exception = ev.pop("exception", None)
    fields = " ".join(f"{key}={_text_value(value)}" for key, value in sorted(ev.items()))
    line = head + message + (" " + fields if fields else "")
    return f"{line}\n{exception}" if exception else line


def _text_value(value: Any) -> str:
    text = str(value)
    # Quote only when needed, so `key=value` stays greppable and unambiguous.
    return repr(text) if not text or any(c.isspace() or c in "\"'=" for c in text) else text


def setup_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Route the root logger to `stream` (stderr) in `fmt` ("text"|"json") at `level`.

    Safe to call again (on reload): the handler installed before is replaced, not duplicated.
    """
    level = level.lower()
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}")
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else _render_text
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            _drop_formatter_attributes,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact_event,
            renderer,
            _redact_line,
        ],
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Per-request and per-job INFO lines (an access line per ingest POST, one per scheduler run
    # every second) would drown our own; at debug level everything shows.
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if level == "debug" else logging.WARNING)
