"""JSON for the ingest hot path: orjson and msgspec when the ``fast`` extra is installed, else
the stdlib.

``pip install 'accountd[fast]'`` brings orjson. On a 10,000-item heartbeat batch it decodes in
1.6 ms instead of 2.2 and encodes the 10,000 per-item results in 0.03 ms instead of 0.32; over
HTTP that is ~15 % more heartbeats/s (docs/benchmarks.md). Without it everything works the same,
a little slower.

The extra also brings msgspec, for heartbeat batches alone (`heartbeat_fields`): decoded against
their schema, a 10,000-item batch takes 0.64 ms instead of orjson's 1.45, and makes no dict per
item for the garbage collector to count, only two lists of strings. At a million accounts
beating every 15 s the decode was 5.6 % of the event loop during a mass event, and one 1.5 ms
call holds the GIL that the control socket's thread waits for (py-spy, 2026-12-04). msgspec
only ever takes the accepting decision too: a batch it refuses (anything but an object whose
``heartbeats`` is an array of objects with string ``account_id`` and ``at``) is parsed again the
general way, and that answer stands.

The two parsers disagree on input that is not strict JSON (``NaN``, lone ``\\ud800``
escapes, BOMs): orjson refuses what the stdlib accepts. So orjson only ever takes the
*accepting* decision; whenever it refuses, the stdlib parses the body again and its answer
stands. They also disagree on integers beyond 64 bits, which orjson reads as floats: callers
use orjson only for documents whose accepted values are all strings (heartbeat batches), where
a number is rejected either way. A worker sees exactly the same replies, error codes included,
with or without the extra.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from typing import Any, Final


def _load_orjson() -> Any:
    try:
        return importlib.import_module("orjson")
    except ModuleNotFoundError:
        return None


_orjson: Final[Any] = _load_orjson()

#: Which implementation is in use: ``"orjson"`` or ``"json"`` (logged at start-up).
BACKEND: Final = "orjson" if _orjson is not None else "json"


try:
    import msgspec  # optional: the `fast` extra
except ModuleNotFoundError:
    msgspec = None  # type: ignore[assignment]


if msgspec is not None:
    # gc=False: the decoded items hold strings only, so the collector need not track them.
    class _Beat(msgspec.Struct, gc=False):
        account_id: str
        at: str

    class _Batch(msgspec.Struct, gc=False):
        heartbeats: list[_Beat]


def _heartbeats_decoder() -> Callable[[bytes], tuple[list[str], list[str]] | None] | None:
    """`heartbeat_fields` with msgspec, or None without it."""
    if msgspec is None:
        return None
    decode = msgspec.json.Decoder(_Batch).decode
    refused = (msgspec.DecodeError, RecursionError)  # ValidationError is a DecodeError

    def fields(body: bytes) -> tuple[list[str], list[str]] | None:
        try:
            beats = decode(body).heartbeats
        except refused:
            return None
        return [b.account_id for b in beats], [b.at for b in beats]

    return fields


_heartbeat_fields: Final = _heartbeats_decoder()

#: What decodes heartbeat batches first: ``"msgspec"``, or the `BACKEND` (logged at start-up).
HEARTBEATS_BACKEND: Final = "msgspec" if _heartbeat_fields is not None else BACKEND


def heartbeat_fields(body: bytes) -> tuple[list[str], list[str]] | None:
    """The ``account_id`` and ``at`` strings of a heartbeat batch, in item order, when msgspec
    is installed and the body is one (``{"heartbeats": [{"account_id": "…", "at": "…"}, …]}``,
    other keys ignored); else None, and the caller parses it the general way (`loads_strict`),
    whose answer stands. The values are not checked further here."""
    return None if _heartbeat_fields is None else _heartbeat_fields(body)


def loads_strict(body: bytes, *, use_orjson: bool = True) -> Any:
    """Parse UTF-8 JSON bytes; raises UnicodeDecodeError, ValueError or RecursionError.

    The stdlib path decodes the bytes first: ``json.loads(bytes)`` would guess UTF-16/32 and
    let lone surrogates through ("surrogatepass").
    """
    if use_orjson and _orjson is not None:
        try:
            return _orjson.loads(body)
        except _orjson.JSONDecodeError:
            pass  # the stdlib decides what is wrong (or that it is acceptable after all)
    return json.loads(body.decode("utf-8"))


def dumps(obj: Any, *, use_orjson: bool = True) -> bytes:
    """Compact JSON bytes of plain data (dicts, lists, str subclasses such as StrEnum)."""
    if use_orjson and _orjson is not None:
        # orjson writes a str subclass (our StrEnum results) as its string value, like json.
        encoded: bytes = _orjson.dumps(obj)
        return encoded
    return json.dumps(obj, separators=(",", ":")).encode()


__all__ = ["BACKEND", "HEARTBEATS_BACKEND", "dumps", "heartbeat_fields", "loads_strict"]
