"""Identifiers for rows we create.

The seed's ids are ``VARCHAR(36)``. We write UUIDv7 strings (RFC 9562): time-ordered, so the
``account_status_logs`` rows of one account sort in the order they were written even though
``created_at`` only has one-second resolution. Within one process the sequence is strictly
increasing (a counter in the random bits breaks ties inside one millisecond).
"""

from __future__ import annotations

import os
import threading
import time

_lock = threading.Lock()
_last_ms = 0
_counter = 0
# os.urandom in blocks. One system call per id gives up the GIL, and with the side loop's thread
# running it came back late: 4.2 % of the main thread's samples in a mass event at 1M, 1.3 %
# with the pool (docs/benchmarks.md).
_BLOCK = 8 * 512
_pool = b""
_taken = _BLOCK


def _drop_pool() -> None:
    global _pool, _taken
    _pool, _taken = b"", _BLOCK


# A forked child must not hand out the random bits its parent will also use.
os.register_at_fork(after_in_child=_drop_pool)


def _random_bytes() -> bytes:
    """The next 8 bytes from the OS's random source (call with `_lock` held)."""
    global _pool, _taken
    if _taken >= _BLOCK:
        _pool, _taken = os.urandom(_BLOCK), 0
    _taken += 8
    return _pool[_taken - 8 : _taken]


def uuid7() -> str:
    """A new UUIDv7 as the canonical 36-character string, monotonic within this process."""
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            # Same (or an earlier, after a clock step) millisecond: keep order with the counter.
            ms = _last_ms
            _counter += 1
            if _counter > 0xFFF:
                ms += 1
                _counter = 0
        else:
            _counter = 0
        _last_ms = ms
        counter = _counter
        rand = int.from_bytes(_random_bytes(), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= counter << 64  # rand_a used as a 12-bit counter
    value |= 0b10 << 62  # variant
    value |= rand
    # What str(uuid.UUID(int=value)) gives, without building the object (one per log row).
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
