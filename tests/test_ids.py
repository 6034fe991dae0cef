"""The UUIDv7 strings we write as row ids."""

from __future__ import annotations

import time
import uuid

from accountd.ids import uuid7


def test_uuid7_is_a_canonical_version_7_uuid_with_the_current_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    text = uuid7()
    after = time.time_ns() // 1_000_000
    parsed = uuid.UUID(text)
    assert str(parsed) == text and len(text) == 36
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert before <= parsed.int >> 80 <= after


def test_uuid7_strings_sort_in_the_order_they_were_made() -> None:
    made = [uuid7() for _ in range(20_000)]  # many within one millisecond: the counter orders
    assert made == sorted(made) and len(set(made)) == len(made)


def test_uuid7_random_bits_are_random_and_the_variant_is_rfc_9562() -> None:
    made = [uuid.UUID(uuid7()) for _ in range(4000)]  # across blocks of the random pool
    assert {u.variant for u in made} == {uuid.RFC_4122}
    rand = [u.int & ((1 << 62) - 1) for u in made]
    assert len(set(rand)) == len(rand)
    # Each of the 62 bits is set in some ids and clear in others (a stuck bit would show).
    for bit in range(62):
        ones = sum(r >> bit & 1 for r in rand)
        assert 1500 < ones < 2500, (bit, ones)
