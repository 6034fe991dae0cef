"""Bad input at the ingest listener of a running daemon changes nothing.

The whole stack is real: daemon, database, the simulator keeping sessions alive. Each malformed
or unauthorised request must get its documented status and leave every status and log row as it
was; semantic refusals (unknown account, illegal event) are per-item results, also changing
nothing.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from accountd.adapters.db import Databases
from accountd.daemon.app import Daemon
from tests.test_e2e import logs, seed_accounts, stack, start, statuses, wait_for

__all__ = ["stack"]  # the fixture, imported so pytest finds it here


async def snapshot(dbs: Databases) -> tuple[dict[str, str], int]:
    history = await logs(dbs)
    return await statuses(dbs), sum(len(v) for v in history.values())


async def test_bad_ingest_requests_get_documented_errors_and_change_nothing(
    stack: dict[str, Any],
) -> None:
    dbs: Databases = stack["dbs"]
    daemon: Daemon = stack["daemon"]
    ids = await seed_accounts(dbs, 3)
    stack["task"] = await start(daemon)

    async def all_online() -> bool:
        return set((await statuses(dbs)).values()) == {"online"}

    await wait_for(all_online, 30, "every account online")
    before = await snapshot(dbs)
    token = stack["settings"].ingest.token.get_secret_value()
    base = f"http://127.0.0.1:{daemon.ingest_port}"
    auth = {"Authorization": f"Bearer {token}"}
    now = "2026-11-28T12:00:00Z"

    async with aiohttp.ClientSession() as http:

        async def post(path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
            async with http.post(base + path, data=body, headers=headers) as resp:
                return resp.status, await resp.json(content_type=None)

        event = {"account_id": ids[0], "event": "qr_scanned", "data": {}, "at": now}
        cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
            ("/v1/events", json.dumps({"events": [event]}).encode(), {}, 401, "unauthorized"),
            (
                "/v1/events",
                json.dumps({"events": [event]}).encode(),
                {"Authorization": "Bearer wrong-token"},
                401,
                "unauthorized",
            ),
            ("/v1/events", b'{"events": [', auth, 400, "malformed_json"),
            ("/v1/heartbeats", b"\xff\xfe not utf-8", auth, 400, "malformed_json"),
            (
                "/v1/events",
                json.dumps({"events": [{**event, "event": 42}]}).encode(),
                auth,
                400,
                "invalid_request",
            ),
            (
                "/v1/events",
                json.dumps({"events": [{**event, "event": "force"}]}).encode(),
                auth,
                400,
                "invalid_request",
            ),
            (
                "/v1/heartbeats",
                json.dumps({"heartbeats": [{"account_id": ids[0], "at": "yesterday"}]}).encode(),
                auth,
                400,
                "invalid_request",
            ),
            (
                "/v1/heartbeats",
                json.dumps({"heartbeats": [{"account_id": ids[0], "at": now}] * 10_001}).encode(),
                auth,
                413,
                "payload_too_large",
            ),
        ]
        for path, body, headers, status, code in cases:
            got_status, doc = await post(path, body, headers)
            assert (got_status, doc["error"]["code"]) == (status, code), (path, body[:80])

        # Well-formed but refused per item: unknown account, event illegal in the state.
        status, doc = await post(
            "/v1/events",
            json.dumps(
                {
                    "events": [
                        {"account_id": "no-such-account", "event": "verified", "at": now},
                        event,  # qr_scanned while online
                    ]
                }
            ).encode(),
            auth,
        )
        assert status == 200
        assert doc["results"] == ["unknown_account", "illegal_transition"]
        status, doc = await post(
            "/v1/heartbeats",
            json.dumps({"heartbeats": [{"account_id": "no-such-account", "at": now}]}).encode(),
            auth,
        )
        assert (status, doc["results"]) == (200, ["unknown_account"])

    assert await snapshot(dbs) == before
