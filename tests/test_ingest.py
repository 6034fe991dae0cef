"""The ingest listener over real HTTP on loopback: auth, validation, limits, per-item results.

The sink is a small in-test implementation of our own `IngestSink` interface over a dict of known
accounts (not a stand-in for an external system); end-to-end tests with the real engine live
elsewhere. Every rejected request also asserts that the sink received nothing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accountd.daemon.ingest import (
    BatchRejected,
    IngestServer,
    make_ingest_app,
    parse_rfc3339,
    validate_events,
    validate_heartbeats,
)
from accountd.daemon.protocol import WORKER_EVENTS, ItemResult, WorkerEvent
from accountd.errors import Overloaded

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BATCH = 5
MAX_BODY = 8192
T0 = "2026-05-09T07:35:25.123456Z"

# The worker-fired rows of the BRIEF §3 table: trigger → (allowed from-states, to-state).
WORKER_MOVES: dict[str, tuple[frozenset[str], str]] = {
    "qr_ready": (frozenset({"initializing", "waiting_qr", "recovering"}), "waiting_qr"),
    "qr_scanned": (frozenset({"waiting_qr"}), "waiting_confirm"),
    "confirmed": (frozenset({"waiting_confirm"}), "verifying"),
    "verified": (frozenset({"verifying"}), "online"),
    "logged_out": (
        frozenset(
            {"initializing", "waiting_qr", "waiting_confirm", "verifying", "online", "recovering"}
        ),
        "offline",
    ),
    "recovered": (frozenset({"recovering"}), "online"),
    "relogin_required": (frozenset({"recovering"}), "initializing"),
    "fail": (
        frozenset(
            {
                "created",
                "initializing",
                "waiting_qr",
                "waiting_confirm",
                "verifying",
                "online",
                "offline",
                "recovering",
            }
        ),
        "error",
    ),
}


class DictSink:
    """`IngestSink` over a dict account_id → state, recording what it was handed."""

    def __init__(self, states: dict[str, str]) -> None:
        self.states = states
        self.heartbeats: list[tuple[str, datetime]] = []
        self.events: list[WorkerEvent] = []
        self.calls = 0
        self.overloaded: Overloaded | None = None
        self.misaligned = False

    def record_heartbeats(
        self, account_ids: Sequence[str], ats: Sequence[datetime]
    ) -> list[ItemResult]:
        self.calls += 1
        if self.overloaded is not None:
            raise self.overloaded
        results = []
        for aid, at in zip(account_ids, ats, strict=True):
            if aid in self.states:
                self.heartbeats.append((aid, at))
                results.append(ItemResult.APPLIED)
            else:
                results.append(ItemResult.UNKNOWN_ACCOUNT)
        return results[:-1] if self.misaligned else results

    async def apply_events(self, events: Sequence[WorkerEvent]) -> list[ItemResult]:
        self.calls += 1
        if self.overloaded is not None:
            raise self.overloaded
        results = []
        for ev in events:
            state = self.states.get(ev.account_id)
            allowed, target = WORKER_MOVES[ev.event]
            if state is None:
                results.append(ItemResult.UNKNOWN_ACCOUNT)
            elif state not in allowed:
                results.append(ItemResult.ILLEGAL)
            else:
                self.states[ev.account_id] = target
                self.events.append(ev)
                results.append(ItemResult.APPLIED)
        return results

    @property
    def received_nothing(self) -> bool:
        return self.calls == 0 and not self.heartbeats and not self.events


@pytest.fixture
def sink() -> DictSink:
    return DictSink({"acc-1": "waiting_qr", "acc-2": "online", "acc-3": "recovering"})


@pytest.fixture
async def base_url(sink: DictSink) -> AsyncIterator[str]:
    app = make_ingest_app(sink, token=TOKEN, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY)
    server = IngestServer(app, shutdown_timeout=1.0)
    port = await server.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession,
    url: str,
    body: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, headers=AUTH if headers is None else headers) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


def hb(account_id: Any = "acc-1", at: Any = T0) -> dict[str, Any]:
    return {"account_id": account_id, "at": at}


def ev(event: Any = "qr_scanned", account_id: Any = "acc-1", **extra: Any) -> dict[str, Any]:
    return {"account_id": account_id, "event": event, "data": {}, "at": T0, **extra}


# -- success ------------------------------------------------------------------------------------


async def test_heartbeats_results_align_with_input_and_times_become_utc(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink
) -> None:
    body = {
        "heartbeats": [
            hb("acc-2", "2026-05-09T15:35:25+08:00"),
            hb("nobody"),
            hb("acc-1", "2026-05-09t07:35:25.123456789z"),
        ]
    }
    status, doc, _ = await post(http, base_url + "/v1/heartbeats", body)
    assert status == 200
    assert doc == {"results": ["applied", "unknown_account", "applied"], "applied": 2}
    assert sink.heartbeats == [
        ("acc-2", datetime(2026, 5, 9, 7, 35, 25, tzinfo=UTC)),
        ("acc-1", datetime(2026, 5, 9, 7, 35, 25, 123456, tzinfo=UTC)),
    ]
    assert all(at.tzinfo is UTC for _, at in sink.heartbeats)


async def test_events_report_applied_unknown_and_illegal_in_order(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink
) -> None:
    body = {
        "events": [
            ev("qr_scanned", "acc-1"),
            ev("qr_scanned", "acc-1"),  # repeated: now waiting_confirm, so illegal
            ev("recovered", "ghost"),
            {"account_id": "acc-3", "event": "recovered", "at": "2026-05-09T08:00:00-02:00"},
        ]
    }
    status, doc, _ = await post(http, base_url + "/v1/events", body)
    assert status == 200
    assert doc == {
        "results": ["applied", "illegal_transition", "unknown_account", "applied"],
        "applied": 2,
    }
    assert [(e.account_id, e.event) for e in sink.events] == [
        ("acc-1", "qr_scanned"),
        ("acc-3", "recovered"),
    ]
    assert sink.events[1].data == {}  # data is optional
    assert sink.events[1].at == datetime(2026, 5, 9, 10, 0, tzinfo=UTC)
    assert sink.states == {"acc-1": "waiting_confirm", "acc-2": "online", "acc-3": "online"}


async def test_qr_ready_and_fail_carry_their_data(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink
) -> None:
    body = {
        "events": [
            ev("qr_ready", data={"qr_code": "data:image/png;base64,AAAA"}),
            ev("fail", "acc-2", data={"error": "device banned", "extra": [1, {"k": "v"}]}),
        ]
    }
    status, doc, _ = await post(http, base_url + "/v1/events", body)
    assert status == 200 and doc["applied"] == 2
    assert sink.events[0].data == {"qr_code": "data:image/png;base64,AAAA"}
    assert sink.events[1].data["error"] == "device banned"


async def test_healthz_needs_no_token(base_url: str, http: aiohttp.ClientSession) -> None:
    async with http.get(base_url + "/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_empty_batch_is_fine(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink
) -> None:
    status, doc, _ = await post(http, base_url + "/v1/heartbeats", {"heartbeats": []})
    assert (status, doc) == (200, {"results": [], "applied": 0})


# -- auth ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"{TOKEN}"},
        {"Authorization": "Bearer tökén"},
    ],
    ids=["none", "empty", "no-credentials", "wrong", "longer", "prefix", "basic", "bare", "utf8"],
)
@pytest.mark.parametrize("path", ["/v1/heartbeats", "/v1/events"])
async def test_missing_or_wrong_token_is_401(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink, headers: dict[str, str], path: str
) -> None:
    body = {"heartbeats": [hb()]} if path.endswith("heartbeats") else {"events": [ev()]}
    status, doc, resp_headers = await post(http, base_url + path, body, headers=headers)
    assert status == 401
    assert doc["error"]["code"] == "unauthorized"
    assert resp_headers["WWW-Authenticate"].startswith("Bearer")
    assert sink.received_nothing


async def test_bearer_scheme_is_case_insensitive(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink
) -> None:
    headers = {"Authorization": f"bearer {TOKEN}"}
    status, _, _ = await post(http, base_url + "/v1/heartbeats", {"heartbeats": [hb()]}, headers)
    assert status == 200
    assert len(sink.heartbeats) == 1


def test_empty_token_is_refused(sink: DictSink) -> None:
    with pytest.raises(ValueError, match="token"):
        make_ingest_app(sink, token="")


# -- malformed bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"heartbeats": [}',
        b"{'heartbeats': []}",
        b'{"heartbeats": []} trailing',
        b"[" * 4000 + b"]" * 4000,  # deeper than the recursion limit: must not be a 500
        b'{"n": ' + b"1" * 5000 + b"}",  # over the int-digits limit
    ],
    ids=["empty", "truncated", "broken", "single-quotes", "trailing", "deep", "huge-int"],
)
@pytest.mark.parametrize("path", ["/v1/heartbeats", "/v1/events"])
async def test_malformed_json_is_400(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink, body: bytes, path: str
) -> None:
    status, doc, _ = await post(http, base_url + path, body)
    assert status == 400
    assert doc["error"]["code"] == "malformed_json"
    assert sink.received_nothing


@pytest.mark.parametrize(
    "body",
    [
        b'{"heartbeats": [{"account_id": "acc-\xff", "at": "2026-05-09T07:35:25Z"}]}',
        b'{"heartbeats": [{"account_id": "acc-\xed\xa0\x80", "at": "2026-05-09T07:35:25Z"}]}',
        '{"heartbeats": []}'.encode("utf-16"),
    ],
    ids=["invalid-byte", "encoded-surrogate", "utf-16"],
)
async def test_body_that_is_not_utf8_is_400(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink, body: bytes
) -> None:
    status, doc, _ = await post(http, base_url + "/v1/heartbeats", body)
    assert status == 400
    assert doc["error"]["code"] == "malformed_json"
    assert sink.received_nothing


BAD_HEARTBEAT_BODIES: list[tuple[str, Any]] = [
    ("top-level-array", [hb()]),
    ("top-level-nan", float("nan")),
    ("missing-key", {"beats": [hb()]}),
    ("not-array", {"heartbeats": {"account_id": "acc-1"}}),
    ("item-not-object", {"heartbeats": [hb(), "acc-1"]}),
    ("id-missing", {"heartbeats": [hb(), {"at": T0}]}),
    ("id-int", {"heartbeats": [hb(), hb(42)]}),
    ("id-null", {"heartbeats": [hb(), hb(None)]}),
    ("id-empty", {"heartbeats": [hb(), hb("")]}),
    ("id-37-chars", {"heartbeats": [hb(), hb("x" * 37)]}),
    ("id-lone-surrogate", {"heartbeats": [hb(), hb("acc-\ud800")]}),
    ("at-missing", {"heartbeats": [hb(), {"account_id": "acc-1"}]}),
    ("at-number", {"heartbeats": [hb(), hb(at=1715239000)]}),
    ("at-no-offset", {"heartbeats": [hb(), hb(at="2026-05-09T07:35:25")]}),
    ("at-date-only", {"heartbeats": [hb(), hb(at="2026-05-09")]}),
    ("at-basic-format", {"heartbeats": [hb(), hb(at="20260509T073525Z")]}),
    ("at-week-date", {"heartbeats": [hb(), hb(at="2026-W19-6T07:35:25Z")]}),
    ("at-no-seconds", {"heartbeats": [hb(), hb(at="2026-05-09T07:35Z")]}),
    ("at-month-13", {"heartbeats": [hb(), hb(at="2026-13-09T07:35:25Z")]}),
    ("at-hour-24", {"heartbeats": [hb(), hb(at="2026-05-09T24:00:00+00:00")]}),
    ("at-garbage", {"heartbeats": [hb(), hb(at="yesterday")]}),
    ("at-empty", {"heartbeats": [hb(), hb(at="")]}),
]


@pytest.mark.parametrize(
    "body", [b for _, b in BAD_HEARTBEAT_BODIES], ids=[i for i, _ in BAD_HEARTBEAT_BODIES]
)
async def test_heartbeat_batch_with_any_bad_item_is_400_and_nothing_applied(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink, body: Any
) -> None:
    raw = json.dumps(body).encode()  # json.dumps writes NaN and lone surrogates as escapes
    status, doc, _ = await post(http, base_url + "/v1/heartbeats", raw)
    assert status == 400
    assert doc["error"]["code"] == "invalid_request"
    assert doc["error"]["message"]
    assert sink.received_nothing


BAD_EVENT_BODIES: list[tuple[str, Any]] = [
    ("missing-key", {"heartbeats": [ev()]}),
    ("not-array", {"events": ev()}),
    ("item-not-object", {"events": [ev(), ["qr_scanned"]]}),
    ("id-int", {"events": [ev(), ev(account_id=7)]}),
    ("id-too-long", {"events": [ev(), ev(account_id="y" * 37)]}),
    ("event-missing", {"events": [ev(), {"account_id": "acc-1", "at": T0}]}),
    ("event-int", {"events": [ev(), ev(3)]}),
    ("event-daemon-trigger-start", {"events": [ev(), ev("start")]}),
    ("event-daemon-trigger-force", {"events": [ev(), ev("force")]}),
    ("event-heartbeat-lost", {"events": [ev(), ev("heartbeat_lost")]}),
    ("event-wrong-case", {"events": [ev(), ev("QR_READY")]}),
    ("data-array", {"events": [ev(), ev(data=[])]}),
    ("data-string", {"events": [ev(), ev(data="x")]}),
    ("data-null", {"events": [ev(), ev(data=None)]}),
    ("data-lone-surrogate", {"events": [ev(), ev(data={"k": "\udc80"})]}),
    ("qr-ready-without-code", {"events": [ev(), ev("qr_ready")]}),
    ("qr-ready-code-not-string", {"events": [ev(), ev("qr_ready", data={"qr_code": 5})]}),
    ("fail-error-not-string", {"events": [ev(), ev("fail", data={"error": {"x": 1}})]}),
    ("at-missing", {"events": [ev(), {"account_id": "acc-1", "event": "qr_scanned"}]}),
    ("at-no-offset", {"events": [ev(), ev(at="2026-05-09 07:35:25")]}),
]


@pytest.mark.parametrize(
    "body", [b for _, b in BAD_EVENT_BODIES], ids=[i for i, _ in BAD_EVENT_BODIES]
)
async def test_event_batch_with_any_bad_item_is_400_and_nothing_applied(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink, body: Any
) -> None:
    status, doc, _ = await post(http, base_url + "/v1/events", body)
    assert status == 400
    assert doc["error"]["code"] == "invalid_request"
    assert sink.received_nothing


async def test_error_message_names_the_bad_item(base_url: str, http: aiohttp.ClientSession) -> None:
    body = {"events": [ev(), ev(), ev("teleport")]}
    _, doc, _ = await post(http, base_url + "/v1/events", body)
    assert doc["error"]["message"].startswith("events[2].event:")


async def test_oversized_qr_code_is_400(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink
) -> None:
    # Exercised through the validator: the fixture's body limit is smaller than TEXT's 64 KiB.
    body = json.dumps({"events": [ev("qr_ready", data={"qr_code": "q" * 70_000})]}).encode()
    with pytest.raises(BatchRejected) as info:
        validate_events(body, MAX_BATCH)
    assert (info.value.status, info.value.code) == (400, "invalid_request")


# -- limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/heartbeats", "/v1/events"])
async def test_body_over_the_limit_is_413(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink, path: str
) -> None:
    body = b'{"heartbeats": [], "pad": "' + b"x" * MAX_BODY + b'"}'
    status, doc, _ = await post(http, base_url + path, body)
    assert status == 413
    assert doc["error"]["code"] == "payload_too_large"
    assert sink.received_nothing


async def test_chunked_body_over_the_limit_is_413(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: the limit must hold while reading, not only from the header.
        yield b'{"heartbeats": [], "pad": "'
        for _ in range(4):
            yield b"x" * 4096
        yield b'"}'

    async with http.post(base_url + "/v1/heartbeats", data=chunks(), headers=AUTH) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "payload_too_large"
    assert sink.received_nothing


@pytest.mark.parametrize("path", ["/v1/heartbeats", "/v1/events"])
async def test_more_than_max_batch_items_is_413(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink, path: str
) -> None:
    key = path.rsplit("/", 1)[1]
    item = hb() if key == "heartbeats" else ev()
    status, doc, _ = await post(http, base_url + path, {key: [item] * (MAX_BATCH + 1)})
    assert status == 413
    assert doc["error"]["code"] == "payload_too_large"
    assert sink.received_nothing
    status, _, _ = await post(http, base_url + path, {key: [item] * MAX_BATCH})
    assert status == 200


# -- routing, overload, sink bugs ---------------------------------------------------------------


async def test_unknown_path_is_404_json(base_url: str, http: aiohttp.ClientSession) -> None:
    status, doc, _ = await post(http, base_url + "/v1/heartbeat", {"heartbeats": []})
    assert status == 404
    assert doc["error"]["code"] == "not_found"


async def test_wrong_method_is_405_json_with_allow(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink
) -> None:
    async with http.get(base_url + "/v1/events", headers=AUTH) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert (await resp.json())["error"]["code"] == "method_not_allowed"
    assert sink.received_nothing


@pytest.mark.parametrize("path", ["/v1/heartbeats", "/v1/events"])
async def test_overloaded_sink_is_503_with_retry_after_rounded_up(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink, path: str
) -> None:
    sink.overloaded = Overloaded(2.2, "heartbeat buffer full")
    body = {"heartbeats": [hb()]} if path.endswith("heartbeats") else {"events": [ev()]}
    status, doc, headers = await post(http, base_url + path, body)
    assert status == 503
    assert headers["Retry-After"] == "3"
    assert doc == {"error": {"code": "overloaded", "message": "heartbeat buffer full"}}
    assert not sink.heartbeats and not sink.events


async def test_sink_returning_misaligned_results_is_a_logged_500_not_a_lie(
    base_url: str, http: aiohttp.ClientSession, sink: DictSink, caplog: pytest.LogCaptureFixture
) -> None:
    sink.misaligned = True
    status, doc, _ = await post(http, base_url + "/v1/heartbeats", {"heartbeats": [hb()]})
    assert status == 500
    assert doc["error"]["code"] == "internal_error"
    assert "sink returned 0 results for 1 items" in caplog.text


async def test_stopped_server_refuses_connections(sink: DictSink) -> None:
    server = IngestServer(make_ingest_app(sink, token=TOKEN))
    port = await server.start("127.0.0.1", 0)
    await server.stop()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"http://127.0.0.1:{port}/healthz")


# -- the validators on their own ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-05-09T07:35:25Z", datetime(2026, 5, 9, 7, 35, 25, tzinfo=UTC)),
        ("2026-05-09 07:35:25+08:00", datetime(2026, 5, 8, 23, 35, 25, tzinfo=UTC)),
        ("2026-05-09T07:35:25.5-00:30", datetime(2026, 5, 9, 8, 5, 25, 500000, tzinfo=UTC)),
        ("2026-05-09T07:35:25+0800", None),
        ("2026-05-09T07:35:25", None),
        ("2026-05-09T07:35:60Z", None),  # leap seconds: Python's datetime has none
        (" 2026-05-09T07:35:25Z", None),
    ],
)
def test_parse_rfc3339(text: str, expected: datetime | None) -> None:
    got = parse_rfc3339(text)
    assert got == expected
    if got is not None:
        assert got.tzinfo is UTC


def test_non_utc_offsets_compare_equal_to_their_utc_instant() -> None:
    local = datetime(2026, 5, 9, 15, 35, 25, tzinfo=timezone(timedelta(hours=8)))
    assert parse_rfc3339(local.isoformat()) == local


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["account_id", "at", "event", "data", "heartbeats", "events", "x"]),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    doc=st.one_of(
        JSON_VALUES,
        st.fixed_dictionaries({"heartbeats": st.lists(JSON_VALUES, max_size=4)}),
        st.fixed_dictionaries({"events": st.lists(JSON_VALUES, max_size=4)}),
    )
)
def test_validators_either_accept_or_reject_cleanly(doc: Any) -> None:
    # Whatever JSON arrives, the only outcomes are a parsed batch or BatchRejected (never a 500).
    body = json.dumps(doc).encode()
    for validate in (validate_heartbeats, validate_events):
        try:
            result = validate(body, 10)
        except BatchRejected as exc:
            assert exc.status in (400, 413)
            continue
        assert isinstance(result, tuple | list)


@settings(max_examples=100, deadline=None)
@given(
    ids=st.lists(
        st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=36), max_size=8
    ),
    offset_minutes=st.integers(min_value=-23 * 60, max_value=23 * 60),
    instant=st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(9998, 12, 31), timezones=st.just(UTC)
    ),
)
def test_valid_heartbeats_round_trip(
    ids: list[str], offset_minutes: int, instant: datetime
) -> None:
    local = instant.astimezone(timezone(timedelta(minutes=offset_minutes)))
    body = json.dumps({"heartbeats": [{"account_id": i, "at": local.isoformat()} for i in ids]})
    got_ids, got_ats = validate_heartbeats(body.encode(), 10)
    assert got_ids == ids
    assert got_ats == [instant] * len(ids)
    assert all(at.tzinfo is UTC for at in got_ats)


def test_every_worker_event_is_accepted() -> None:
    data = {"qr_ready": {"qr_code": "data:,x"}}
    body = json.dumps(
        {"events": [ev(name, data=data.get(name, {})) for name in sorted(WORKER_EVENTS)]}
    ).encode()
    assert [e.event for e in validate_events(body, 100)] == sorted(WORKER_EVENTS)
