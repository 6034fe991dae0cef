"""The parts that make a million accounts fit: the fast loader, the sliced heartbeat flush, fair
ingest, the optional fast JSON, GC pause metrics and the benchmark's bulk seeding.

Real databases (SQLite; MariaDB with ``ACCOUNTD_TEST_MYSQL_URL``), real HTTP on loopback. The
full-size figures are `bench.scale`'s job (docs/benchmarks.md); these tests pin the behaviour.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import itertools
import json
import random
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import event, insert, select, text, update

from accountd.adapters.db import Databases, make_engine
from accountd.adapters.loader import (
    LoadedRow,
    heartbeats_after,
    iter_loaded,
    unpack_heartbeats,
    unpack_loaded,
)
from accountd.adapters.repository import AccountRepository, from_db_time, to_db_time
from accountd.adapters.schema import accountd_supervision, wework_accounts
from accountd.adapters.worker import WorkerClient
from accountd.daemon import fastjson, supervisor
from accountd.daemon.clock import FakeClock
from accountd.daemon.ingest import (
    INGEST_SLICE,
    BatchRejected,
    IngestServer,
    make_ingest_app,
    validate_heartbeats,
)
from accountd.daemon.policy import PolicyConfig
from accountd.daemon.protocol import ItemResult, WorkerEvent
from accountd.daemon.runtime_metrics import (
    YOUNG_THRESHOLD,
    GcPauses,
    HeartbeatsPersisted,
    freeze_after_load,
)
from accountd.daemon.supervisor import Supervisor
from accountd.statemachine import State
from bench.common import Group, seed

T0 = 1_800_000_000.0


@pytest.fixture
async def dbs(migrated_urls: dict[str, str]) -> AsyncIterator[Databases]:
    d = Databases(migrated_urls)
    try:
        yield d
    finally:
        await d.dispose()


async def insert_rows(dbs: Databases, rows: Sequence[Mapping[str, Any]]) -> None:
    accounts = [
        {
            "id": r["id"],
            "tenant_id": "t1",
            "account_name": r["id"][:8],
            "wework_guid": f"guid-{r['id']}",
            "status": r["status"],
            "last_heartbeat_at": r.get("beat"),
        }
        for r in rows
    ]
    sup = [r["sup"] | {"account_id": r["id"]} for r in rows if r.get("sup") is not None]
    async with dbs.platform.begin() as conn:
        await conn.execute(insert(wework_accounts), accounts)
        if sup:
            await conn.execute(insert(accountd_supervision), sup)


def supervision(status: str, **extra: Any) -> dict[str, Any]:
    at = dt.datetime(2026, 11, 28, 10, 0, 0, 123456)
    return {
        "status": status,
        "entered_at": at,
        "attempts": 0,
        "qr_refreshes": 0,
        "next_action": None,
        "next_action_at": None,
        "online_since": None,
        "offline_history": [],
        "paused": False,
        "paused_reason": None,  # every row must name every column (one executemany)
        "epoch": 0,
        "updated_at": at,
    } | extra


# ---------------------------------------------------------------- the loader


async def test_fast_loader_reads_what_the_repository_reads(dbs: Databases) -> None:
    """Every field the supervisor adopts, exactly (microseconds included), for every kind of row:
    no supervision row, a matching one, one with history, pause and a pending action."""
    entered = dt.datetime(2026, 11, 28, 10, 0, 0, 654321)
    rows = [
        {"id": str(uuid.uuid4()), "status": "created"},
        {
            "id": str(uuid.uuid4()),
            "status": "online",
            "beat": dt.datetime(2026, 11, 28, 11, 0, 5),
            "sup": supervision("online", entered_at=entered, online_since=entered),
        },
        {
            "id": str(uuid.uuid4()),
            "status": "offline",
            "sup": supervision(
                "offline",
                attempts=3,
                next_action="recover",
                next_action_at=dt.datetime(2026, 11, 28, 10, 5, 0, 1),
                offline_history=[T0, T0 + 60.5],
                paused=True,
                paused_reason="maintenance",
            ),
        },
        # Changed behind the daemon's back: the supervision row says online, the row offline.
        {"id": str(uuid.uuid4()), "status": "offline", "sup": supervision("online")},
        # The packed page's separators in an admin's words: that page is read row by row.
        {
            "id": str(uuid.uuid4()),
            "status": "error",
            "sup": supervision("error", paused=True, paused_reason="a\x1fb\x1ec"),
        },
    ]
    await insert_rows(dbs, rows)
    repo = AccountRepository(dbs.platform)
    expected = {r.id: r for page in [p async for p in repo.iter_accounts(2)] for r in page}
    await _loads_as_expected(dbs.platform, expected)
    if dbs.dialect("platform") == "mysql":
        # Every packed page cut short by group_concat_max_len: each is read row by row.
        short = make_engine(dbs.platform.url)

        @event.listens_for(short.sync_engine, "connect")
        def _limit(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("SET SESSION group_concat_max_len = 60")
            cur.close()

        try:
            await _loads_as_expected(short, expected)
        finally:
            await short.dispose()


async def _loads_as_expected(engine: Any, expected: dict[str, Any]) -> None:
    loaded = [LoadedRow._make(r) for page in [p async for p in iter_loaded(engine, 2)]
              for r in page]  # fmt: skip
    assert [r.id for r in loaded] == sorted(expected)
    for got in loaded:
        want = expected[got.id]
        assert (got.tenant_id, got.wework_guid, got.status) == (
            want.tenant_id,
            want.wework_guid,
            want.status,
        )
        assert got.last_heartbeat_at == want.last_heartbeat_at
        sup = want.supervision
        assert bool(got.has_supervision) is (sup is not None)
        if sup is None:
            continue
        assert got.s_status == sup["status"]
        assert got.entered_at == from_db_time(sup["entered_at"])
        assert got.next_action_at == from_db_time(sup["next_action_at"])
        assert got.online_since == from_db_time(sup["online_since"])
        assert json.loads(got.offline_history or "[]") == sup["offline_history"]
        assert (got.attempts, got.next_action, bool(got.paused), got.paused_reason) == (
            sup["attempts"],
            sup["next_action"],
            sup["paused"],
            sup["paused_reason"],
        )


async def test_supervisor_load_restores_state_through_the_fast_loader(dbs: Databases) -> None:
    entered = dt.datetime(2026, 11, 28, 10, 0, 0, 654321)
    online, paused = str(uuid.uuid4()), str(uuid.uuid4())
    await insert_rows(
        dbs,
        [
            {
                "id": online,
                "status": "online",
                "beat": dt.datetime(2026, 11, 28, 11, 0, 5),
                "sup": supervision("online", entered_at=entered, online_since=entered),
            },
            {
                "id": paused,
                "status": "offline",
                "sup": supervision(
                    "offline", attempts=2, offline_history=[T0], paused=True, paused_reason="m"
                ),
            },
        ],
    )
    sup = Supervisor(
        AccountRepository(dbs.platform), WorkerClient("http://127.0.0.1:9"), PolicyConfig(),
        FakeClock(T0), rng=random.Random(1),
    )  # fmt: skip
    assert await sup.load() == 2
    a = sup.accounts[online]
    assert a.status is State.online and a.entered_at == from_db_time(entered)
    assert a.online_since is a.entered_at  # one float object for both
    assert a.last_heartbeat == from_db_time(dt.datetime(2026, 11, 28, 11, 0, 5))
    b = sup.accounts[paused]
    assert (b.attempts, b.offline_history, b.paused) == (2, (T0,), True)
    assert sup.paused_reasons[paused] == "m"


# ---------------------------------------------------------------- heartbeats to the database


@pytest.fixture
async def online_sup(dbs: Databases) -> AsyncIterator[tuple[Supervisor, list[str], FakeClock]]:
    ids = [str(uuid.uuid4()) for _ in range(12)]
    await insert_rows(dbs, [{"id": i, "status": "online", "sup": supervision("online")}
                            for i in ids])  # fmt: skip
    clock = FakeClock(T0)
    sup = Supervisor(
        AccountRepository(dbs.platform), WorkerClient("http://127.0.0.1:9"), PolicyConfig(),
        clock, rng=random.Random(1), persist_interval=15,
    )  # fmt: skip
    await sup.load()
    yield sup, ids, clock


async def beats_in_db(dbs: Databases, ids: Sequence[str]) -> dict[str, float | None]:
    a = wework_accounts
    async with dbs.platform.connect() as conn:
        rows = await conn.execute(select(a.c.id, a.c.last_heartbeat_at).where(a.c.id.in_(ids)))
        return {r[0]: from_db_time(r[1]) for r in rows}


async def test_heartbeats_are_queued_once_per_persist_interval_and_flushed_in_slices(
    dbs: Databases,
    online_sup: tuple[Supervisor, list[str], FakeClock],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sup, ids, clock = online_sup
    monkeypatch.setattr(supervisor, "FLUSH_SLICE", 5)  # 12 accounts → 3 repository calls
    assert sup.record_heartbeats([*ids, "nobody"], []) == [ItemResult.APPLIED] * 12 + [
        ItemResult.UNKNOWN_ACCOUNT
    ]
    await clock.advance(5)
    sup.record_heartbeats(ids, [])  # within persist_interval of the queued ones: not queued
    assert all(sup.accounts[i].last_heartbeat == T0 + 5 for i in ids)  # memory always moves
    assert await sup.flush_heartbeats() == 12
    assert sup.heartbeats_persisted == 12
    assert set((await beats_in_db(dbs, ids)).values()) == {T0}  # the second's first queued value
    assert await sup.flush_heartbeats() == 0
    await clock.advance(15)
    sup.record_heartbeats(ids[:3], [])
    assert await sup.flush_heartbeats() == 3
    assert sup.heartbeats_persisted == 15


async def test_the_flush_gives_way_to_a_mass_event_for_at_most_one_persist_interval(
    dbs: Databases,
    online_sup: tuple[Supervisor, list[str], FakeClock],
    caplog: pytest.LogCaptureFixture,
) -> None:
    sup, ids, clock = online_sup
    sup.record_heartbeats(ids, [])
    # A mass event's round waiting for its re-check (the task that takes it is not running).
    sup._stale_mass.append([sup.accounts[ids[0]]])
    assert sup.mass_under_way
    sup.persist_interval = 0.3  # the hold's bound; the heartbeats are already queued
    with caplog.at_level("INFO", logger="accountd.daemon.supervisor"):
        assert await sup.flush_heartbeats() == 0
        assert set(sup._dirty) == set(ids)  # kept, oldest first
        assert set((await beats_in_db(dbs, ids)).values()) == {None}
        await asyncio.sleep(0.35)
        assert await sup.flush_heartbeats() == 12  # held long enough: written meanwhile
    assert "gives way to a mass event for at most 0.3s (12 heartbeats queued)" in caplog.text
    assert set((await beats_in_db(dbs, ids)).values()) == {T0}

    sup._stale_mass.clear()
    sup.persist_interval = 15
    await clock.advance(15)
    sup.record_heartbeats(ids[:4], [])
    with caplog.at_level("INFO", logger="accountd.daemon.supervisor"):
        assert await sup.flush_heartbeats() == 4  # no mass event: at once
    assert "heartbeat flush resumes" in caplog.text
    await clock.advance(15)
    sup.record_heartbeats(ids[4:], [])
    sup._stale_mass.append([sup.accounts[ids[0]]])
    assert await sup.flush_heartbeats() == 0  # a new event, a new hold
    assert await sup.flush_heartbeats(force=True) == 8  # shutdown's flush never waits


async def test_the_poll_reads_nothing_during_a_mass_event_and_catches_up_after(
    dbs: Databases, online_sup: tuple[Supervisor, list[str], FakeClock]
) -> None:
    sup, ids, _clock = online_sup
    since = sup.clock.now() - 60
    later = T0 + 30  # another service writes heartbeats newer than the daemon's
    a = wework_accounts
    async with dbs.platform.begin() as conn:
        await conn.execute(
            update(a).where(a.c.id.in_(ids[:5])).values(last_heartbeat_at=to_db_time(later))
        )
    sup._stale_mass.append([sup.accounts[ids[-1]]])  # a mass event waiting for its re-check
    assert await sup.poll_db_heartbeats(since) == since
    assert all(sup.accounts[i].last_heartbeat != later for i in ids[:5])
    sup._stale_mass.clear()
    assert await sup.poll_db_heartbeats(since) == later
    assert {sup.accounts[i].last_heartbeat for i in ids[:5]} == {later}


async def test_the_final_flush_at_shutdown_is_bounded(
    dbs: Databases,
    online_sup: tuple[Supervisor, list[str], FakeClock],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Another session holds the rows (SQLite: the write lock; MariaDB: row locks), so the flush
    # at shutdown cannot finish: stop() must still return after its grace, keeping the queue.
    sup, ids, _clock = online_sup
    sup.record_heartbeats(ids, [])
    await sup.start()
    a = wework_accounts
    async with dbs.platform.connect() as blocker:
        if dbs.dialect("platform") == "sqlite":
            await blocker.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            await blocker.execute(select(a.c.id).where(a.c.id.in_(ids)).with_for_update())
        started = asyncio.get_running_loop().time()
        with caplog.at_level("WARNING", logger="accountd.daemon.supervisor"):
            await sup.stop(grace=0.5)
        took = asyncio.get_running_loop().time() - started
        await blocker.rollback()
    # SQLite cannot interrupt a statement waiting for the lock: its rollback waits for the
    # busy timeout (10 s) of the statement in progress. MariaDB's is cancelled at once.
    assert took < (15.0 if dbs.dialect("platform") == "sqlite" else 5.0), took
    assert "final heartbeat flush cut off" in caplog.text
    assert set(sup._dirty) == set(ids)  # kept, not lost half-written
    assert set((await beats_in_db(dbs, ids)).values()) == {None}


async def test_a_failed_flush_keeps_every_heartbeat_for_the_next_one(
    dbs: Databases,
    online_sup: tuple[Supervisor, list[str], FakeClock],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sup, ids, clock = online_sup
    monkeypatch.setattr(supervisor, "FLUSH_SLICE", 5)
    sup.record_heartbeats(ids, [])
    rename = {
        "sqlite": "ALTER TABLE {} RENAME TO {}",
        "mysql": "RENAME TABLE {} TO {}",
    }[dbs.dialect("platform")]
    async with dbs.platform.begin() as conn:  # a real failure: the table is gone
        await conn.execute(text(rename.format("wework_accounts", "wework_accounts_away")))
    with pytest.raises(Exception, match="wework_accounts"):
        await sup.flush_heartbeats()
    assert sup.heartbeats_persisted == 0
    async with dbs.platform.begin() as conn:
        await conn.execute(text(rename.format("wework_accounts_away", "wework_accounts")))
    await clock.advance(1)
    sup.record_heartbeats(ids[:1], [])  # not re-queued: within persist_interval of the first
    assert await sup.flush_heartbeats() == 12
    assert set((await beats_in_db(dbs, ids)).values()) == {T0}


async def test_heartbeats_written_by_others_are_picked_up_in_pages(
    dbs: Databases,
    online_sup: tuple[Supervisor, list[str], FakeClock],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another service writes last_heartbeat_at: 12 rows in ONE second, read 5 a page (a
    second holding more rows than a page must not stall the pick-up), and a later one."""
    sup, ids, _ = online_sup
    monkeypatch.setattr(supervisor, "POLL_PAGE", 5)
    second = T0 + 100
    a = wework_accounts
    async with dbs.platform.begin() as conn:
        await conn.execute(a.update().values(last_heartbeat_at=to_db_time(second)))
    assert await sup.poll_db_heartbeats(T0) == second
    assert {sup.accounts[i].last_heartbeat for i in ids} == {second}
    async with dbs.platform.begin() as conn:
        await conn.execute(
            a.update().where(a.c.id == ids[0]).values(last_heartbeat_at=to_db_time(second + 7))
        )
    assert await sup.poll_db_heartbeats(second) == second + 7
    assert sup.accounts[ids[0]].last_heartbeat == second + 7
    assert await sup.poll_db_heartbeats(second + 7) == second + 7  # nothing newer: unchanged


def test_a_packed_heartbeat_page_is_taken_only_when_it_holds_exactly_its_rows() -> None:
    assert unpack_heartbeats(0, None) == []
    assert unpack_heartbeats(2, "a 1800000000,b c 1800000001.5") == [
        ("a", 1_800_000_000.0),
        ("b c", 1_800_000_001.5),  # an id holding a space: the time is split off the end
    ]
    assert unpack_heartbeats(1, "a,b 1800000000") is None  # an id holding a comma
    assert unpack_heartbeats(3, "a 1800000000,b 18") is None  # cut at group_concat_max_len


def test_a_packed_load_page_unpacks_exactly_or_not_at_all() -> None:
    u, r = "\x1f", "\x1e"
    online = u.join(["i1", "t", "g", "online", "1800000000.654321", "1", "online"])
    online += u + u.join(["1800000000", "0", "0", "heartbeat", "1800000045.5", "", "[]", "0", ""])
    created = u.join(["i2", "t", "g2", "created", "", "0", *[""] * 10])
    assert unpack_loaded(2, online + r + created) == [
        ("i1", "t", "g", "online", 1_800_000_000.654321, True, "online", 1_800_000_000.0, 0, 0,
         "heartbeat", 1_800_000_045.5, None, "[]", False, None),
        ("i2", "t", "g2", "created", None, False, *[None] * 8, False, None),
    ]  # fmt: skip
    assert unpack_loaded(0, None) == []
    assert unpack_loaded(3, online + r + created) is None  # cut at group_concat_max_len
    assert unpack_loaded(1, online + u + "extra") is None  # a separator inside a value
    assert unpack_loaded(1, online.replace("heartbeat" + u + "1800000045.5", "x" + u + "y")) is None


async def test_heartbeat_poll_pages_hold_odd_ids_and_survive_a_short_concat_limit(
    dbs: Databases,
) -> None:
    """Ids with the packed page's separators in them, and (MySQL) a page longer than the
    session's ``group_concat_max_len``: every row is read once, in keyset order."""
    # Mixed case too: the keyset must follow the database's collation, not Python's order.
    odd = ["a,b", "c d", "e, f", "B", "b2", *(f"{k:03d}-{uuid.uuid4().hex[:24]}" for k in range(9))]
    a = wework_accounts
    async with dbs.platform.begin() as conn:
        await conn.execute(
            insert(a),
            [
                {
                    "id": i,
                    "tenant_id": "t1",
                    "account_name": f"acc-{k}",
                    "wework_guid": f"guid-{k}",
                    "status": "online",
                    "last_heartbeat_at": to_db_time(T0 + k % 4),
                }
                for k, i in enumerate(odd)
            ],
        )
    want = sorted(((T0 + k % 4, i) for k, i in enumerate(odd)))

    async def read_all(engine: Any) -> list[tuple[float, str]]:
        seen: list[tuple[float, str]] = []
        mark, after = to_db_time(T0 - 1), ""
        while True:
            assert mark is not None
            page = await heartbeats_after(engine, mark, after, 4)
            seen += [(ts, i) for i, ts in page]
            if len(page) < 4:
                return seen
            after, newest = page[-1]
            mark = to_db_time(newest)

    got = await read_all(dbs.platform)
    assert sorted(got) == want and len(got) == len(want)
    assert [ts for ts, _ in got] == sorted(ts for ts, _ in got)
    if dbs.dialect("platform") == "mysql":
        short = make_engine(dbs.platform.url)

        @event.listens_for(short.sync_engine, "connect")
        def _limit(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("SET SESSION group_concat_max_len = 60")  # about one row of a page
            cur.close()

        try:
            assert sorted(await read_all(short)) == want
        finally:
            await short.dispose()


# ---------------------------------------------------------------- fair ingest


class TickingSink:
    """Our own `IngestSink` over a set of ids, noting how far a background ticker had counted
    at each call: proof that other tasks ran between the slices of a batch."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.ticks = 0
        self.calls: list[tuple[str, int, int]] = []  # (batch prefix, items, ticks seen)

    def record_heartbeats(self, account_ids: Sequence[str], ats: Sequence[datetime]) -> list[Any]:
        self.calls.append((account_ids[0][:2], len(account_ids), self.ticks))
        return [
            ItemResult.APPLIED if a in self.known else ItemResult.UNKNOWN_ACCOUNT
            for a in account_ids
        ]

    async def apply_events(self, events: Sequence[WorkerEvent]) -> list[ItemResult]:
        return [ItemResult.ILLEGAL for _ in events]

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(0)
            self.ticks += 1


async def test_a_big_batch_yields_between_slices_and_batches_take_turns() -> None:
    n = 3 * INGEST_SLICE + 7
    batches = {p: [f"{p}-{i}" for i in range(n)] for p in ("aa", "bb", "cc")}
    sink = TickingSink({i for ids in batches.values() for i in ids})
    server = IngestServer(make_ingest_app(sink, token="t", max_batch=10_000))
    port = await server.start("127.0.0.1", 0)
    ticker = asyncio.create_task(sink.tick())
    at = "2026-11-28T10:00:00Z"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer t"}) as http:

            async def post(ids: list[str]) -> dict[str, Any]:
                body = json.dumps({"heartbeats": [{"account_id": i, "at": at} for i in ids]})
                url = f"http://127.0.0.1:{port}/v1/heartbeats"
                async with http.post(url, data=body) as resp:
                    assert resp.status == 200
                    reply: dict[str, Any] = await resp.json()
                    return reply

            replies = await asyncio.gather(*(post(ids) for ids in batches.values()))
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
        await server.stop()
    assert [r["applied"] for r in replies] == [n, n, n]
    assert all(r["results"] == ["applied"] * n for r in replies)
    # Each batch arrives in 4 slices, one batch after another (never interleaved) ...
    order = [p for p, _, _ in sink.calls]
    assert len(order) == 12 and all(len(set(order[k : k + 4])) == 1 for k in (0, 4, 8))
    assert [size for _, size, _ in sink.calls[:4]] == [INGEST_SLICE] * 3 + [7]
    # ... and the ticker ran between every two slices of a batch.
    seen = [t for _, _, t in sink.calls]
    assert all(b > a for a, b in itertools.pairwise(seen))


# ---------------------------------------------------------------- the optional fast paths


# (body, whether both parsers give the same value when they accept it)
BODIES = [
    (b'{"heartbeats": [{"account_id": "a", "at": "2026-11-28T10:00:00Z"}]}', True),
    (b'{"n": NaN}', True),  # not strict JSON: the stdlib takes it, orjson does not
    (b'{"s": "\\ud800"}', True),  # a lone surrogate escape: the same
    (b'{"n": 123456789012345678901234567890}', False),  # beyond 64 bits: orjson reads a float
    (b"[1, 2", True),
    (b"\xff", True),
]


@pytest.mark.parametrize(("body", "same_value"), BODIES)
def test_fast_json_decides_exactly_like_the_stdlib(body: bytes, same_value: bool) -> None:
    """Accept/refuse decisions always agree; values agree but for huge integers, which is why
    only heartbeat batches (strings only) are parsed with orjson."""

    def outcome(use_orjson: bool) -> Any:
        try:
            doc = fastjson.loads_strict(body, use_orjson=use_orjson)
        except (ValueError, RecursionError) as exc:
            return ("error", type(exc).__name__)
        return ("ok", json.dumps(doc) if same_value else "")

    assert outcome(True) == outcome(False)


def test_fast_json_encodes_results_like_the_stdlib() -> None:
    doc = {"results": [ItemResult.APPLIED, ItemResult.UNKNOWN_ACCOUNT], "applied": 1}
    want = {"results": ["applied", "unknown_account"], "applied": 1}
    assert json.loads(fastjson.dumps(doc)) == want
    assert json.loads(fastjson.dumps(doc, use_orjson=False)) == want


def test_orjson_is_used_when_installed() -> None:
    pytest.importorskip("orjson", reason="the `fast` extra is not installed")
    assert fastjson.BACKEND == "orjson"


def _beat(account_id: Any = "acc-1", at: Any = "2026-11-28T10:00:00Z", **extra: Any) -> bytes:
    return json.dumps({"account_id": account_id, "at": at, **extra}).encode()


def _batch(*items: bytes, head: bytes = b'{"heartbeats": [', tail: bytes = b"]}") -> bytes:
    return head + b", ".join(items) + tail


# Heartbeat batches msgspec takes or refuses; the general way decides the same in every case.
HEARTBEAT_BATCHES = {
    "plain": _batch(_beat(), _beat("acc-2", "2026-11-28T10:00:01+08:00")),
    "empty": _batch(),
    "extra-keys": _batch(_beat(extra=[1, {"deep": [[[]]]}]), head=b'{"v": 2, "heartbeats": ['),
    "ignored-nan": _batch(b'{"account_id": "a", "at": "2026-11-28T10:00:00Z", "n": NaN}'),
    "ignored-huge-int": _batch(_beat(n=10**30)),
    "duplicate-key": _batch(
        b'{"account_id": "a", "account_id": "b", "at": "2026-11-28T10:00:00Z"}'
    ),
    "nul-escape": _batch(_beat("a\u0000b".encode().decode("unicode_escape"))),
    "lone-surrogate": _batch(b'{"account_id": "a\\ud800", "at": "2026-11-28T10:00:00Z"}'),
    "raw-control": _batch(b'{"account_id": "a\x01", "at": "2026-11-28T10:00:00Z"}'),
    "not-an-object": _batch(_beat(), b'"acc-1"'),
    "id-number": _batch(_beat(42)),
    "at-missing": _batch(b'{"account_id": "acc-1"}'),
    "at-number": _batch(_beat(at=1)),
    "at-bad": _batch(_beat(at="yesterday")),
    "id-too-long": _batch(_beat("x" * 37)),
    "top-level-array": b"[" + _beat() + b"]",
    "not-array": b'{"heartbeats": {}}',
    "bom": b"\xef\xbb\xbf" + _batch(_beat()),
    "invalid-utf8": _batch(b'{"account_id": "acc-\xff", "at": "2026-11-28T10:00:00Z"}'),
    "trailing": _batch(_beat()) + b" x",
    "deep-in-ignored": _batch(
        b'{"account_id": "a", "at": "2026-11-28T10:00:00Z", "d": '
        + b"[" * 3000
        + b"]" * 3000
        + b"}"
    ),
    "too-many-one-bad": _batch(*[_beat()] * 4, b"7"),
}


@pytest.mark.parametrize("body", HEARTBEAT_BATCHES.values(), ids=HEARTBEAT_BATCHES.keys())
def test_heartbeat_batches_get_one_answer_with_or_without_msgspec(
    body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("msgspec", reason="the `fast` extra is not installed")

    def outcome() -> Any:
        try:
            return ("ok", validate_heartbeats(body, max_batch=4))
        except BatchRejected as exc:
            return ("rejected", exc.status, exc.code, exc.message)

    fast = outcome()
    monkeypatch.setattr(fastjson, "_heartbeat_fields", None)
    assert fastjson.heartbeat_fields(body) is None
    assert fast == outcome()


def test_msgspec_decodes_heartbeat_batches_when_installed() -> None:
    pytest.importorskip("msgspec", reason="the `fast` extra is not installed")
    assert fastjson.HEARTBEATS_BACKEND == "msgspec"
    assert fastjson.heartbeat_fields(HEARTBEAT_BATCHES["extra-keys"]) == (
        ["acc-1"],
        ["2026-11-28T10:00:00Z"],
    )
    for refused in ("ignored-nan", "lone-surrogate", "not-an-object", "at-missing"):
        assert fastjson.heartbeat_fields(HEARTBEAT_BATCHES[refused]) is None


# ---------------------------------------------------------------- runtime metrics


def test_gc_pauses_are_timed_and_exposed() -> None:
    pauses = GcPauses()
    registry = CollectorRegistry()
    registry.register(pauses)
    registry.register(HeartbeatsPersisted(lambda: 42))
    pauses.install()
    try:
        gc.collect()
        gc.collect(0)
    finally:
        pauses.remove()
    assert pauses.count(2) >= 1 and pauses.count(0) >= 1
    assert 0 < pauses.longest(2) < 5
    text_ = generate_latest(registry).decode()
    assert 'accountd_gc_pause_seconds_bucket{generation="2",le="+Inf"}' in text_
    assert 'accountd_gc_pause_max_seconds{generation="2"}' in text_
    assert "accountd_heartbeats_persisted_total 42.0" in text_


def test_freeze_after_load_moves_live_objects_out_of_full_collections() -> None:
    keep = [[i] for i in range(200_000)]  # tracked containers, like loaded accounts
    thresholds = gc.get_threshold()
    try:
        frozen, seconds = freeze_after_load()
        assert frozen >= len(keep)
        assert seconds < 0.5
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


# ---------------------------------------------------------------- the benchmark's seeding


async def test_bench_seed_generates_distinct_accounts_with_supervision(
    migrated_urls: dict[str, str],
) -> None:
    groups = [Group("bulk", 2500, "online"), Group("new", 7, "created")]
    ids = await seed(migrated_urls, groups)
    assert {k: len(v) for k, v in ids.items()} == {"bulk": 2500, "new": 7}
    assert len(set(ids["bulk"]) | set(ids["new"])) == 2507
    assert all(len(i) == 36 and i[14] == "4" for i in ids["bulk"])  # v4 UUID shape
    d = Databases(migrated_urls)
    try:
        async with d.platform.connect() as conn:
            s = accountd_supervision
            rows = (
                await conn.execute(select(s.c.account_id, s.c.entered_at, s.c.online_since))
            ).all()
            guids = (await conn.execute(select(wework_accounts.c.wework_guid))).scalars().all()
    finally:
        await d.dispose()
    assert {r[0] for r in rows} == set(ids["bulk"])  # created accounts have none
    assert len({r[1] for r in rows}) > 2400  # spread timestamps, microseconds included
    assert all(r[1] == r[2] for r in rows)
    assert len(set(guids)) == 2507 and all(len(g) == 32 for g in guids)
    assert to_db_time(T0) is not None
