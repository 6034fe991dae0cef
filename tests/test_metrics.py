"""Prometheus metrics, /healthz and /readyz, the shipped alerting rules and dashboard.

The metric names and labels are BRIEF §6's, checked on a fresh `CollectorRegistry` per test. The
counters are checked on a real daemon over real HTTP (SQLite, and MariaDB when
``ACCOUNTD_TEST_MYSQL_URL`` is set) with the worker simulator driving real transitions, and the
scrape goes through ``promtool check metrics``. ``promtool test rules`` runs the unit tests of
``config/prometheus/alerts.yml``. promtool comes from Debian's ``prometheus`` package (installed by
``.ci/run``): where it is missing these tests skip and say why, except in CI (``CI=true``) where a
missing promtool is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import random
import re
import secrets
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert

from accountd.adapters import migrate
from accountd.adapters.db import Databases
from accountd.adapters.repository import AccountRepository
from accountd.adapters.schema import wework_accounts
from accountd.adapters.worker import WorkerClient
from accountd.daemon.app import Daemon
from accountd.daemon.clock import FakeClock
from accountd.daemon.demo import _free_port
from accountd.daemon.metrics import (
    HEARTBEAT_AGE_BUCKETS,
    RECOVERY_OUTCOMES,
    Metrics,
    recovery_outcome,
)
from accountd.daemon.metrics_http import MetricsServer
from accountd.daemon.policy import PolicyConfig
from accountd.daemon.simulator import WorkerSimulator
from accountd.daemon.supervisor import Supervisor
from accountd.settings import MetricsSettings, Settings
from accountd.statemachine import State, Trigger
from tests.conftest import sqlite_urls
from tests.helpers import fast_simulator, stop_stack
from tests.helpers import start_daemon as run_until_ready
from tests.test_e2e import fast_settings, seed_accounts, statuses, wait_for

REPO = Path(__file__).resolve().parent.parent
RULES_TEST = REPO / "config" / "prometheus" / "alerts_test.yml"
RULES = REPO / "config" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "config" / "grafana" / "accountd.json"

# BRIEF §6: exported name → (type, label names). Histograms are named without _bucket/_sum/_count.
BRIEF_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "accountd_accounts": ("gauge", frozenset({"state"})),
    "accountd_transitions_total": ("counter", frozenset({"from_state", "to_state", "trigger"})),
    "accountd_heartbeats_received_total": ("counter", frozenset()),
    "accountd_heartbeat_age_seconds": ("histogram", frozenset()),
    "accountd_state_duration_seconds": ("histogram", frozenset({"state"})),
    "accountd_recoveries_total": ("counter", frozenset({"outcome"})),
    "accountd_recoveries_in_flight": ("gauge", frozenset()),
    "accountd_db_up": ("gauge", frozenset({"database"})),
    "accountd_db_errors_total": ("counter", frozenset({"database"})),
    "accountd_db_latency_seconds": ("histogram", frozenset({"database", "operation"})),
    "accountd_alerts_active": ("gauge", frozenset({"level"})),
    "accountd_build_info": ("gauge", frozenset({"version"})),
}
DATABASES = {"core", "platform", "analytics"}
ALL_STATES = {str(s) for s in State}


# --------------------------------------------------------------------------- helpers


def parse(text: str) -> dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]]:
    """Exposition text → {family name as exposed: (type, [(sample name, labels, value)])}."""
    out: dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]] = {}
    for family in text_string_to_metric_families(text):
        # The parser strips _total from counter family names; put it back as it is exposed.
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = (family.type, [(s.name, dict(s.labels), s.value) for s in family.samples])
    return out


def value(
    families: dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]],
    sample: str,
    **labels: str,
) -> float:
    """The one sample called ``sample`` whose labels include ``labels`` (0 when none matches)."""
    for _, samples in families.values():
        for name, lbl, v in samples:
            if name == sample and all(lbl.get(k) == want for k, want in labels.items()):
                return v
    return 0.0


def label_values(
    families: dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]],
) -> set[str]:
    return {v for _, samples in families.values() for _, lbl, _ in samples for v in lbl.values()}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        reason = "promtool is not installed (Debian: apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; .ci/run installs it, so CI must have it")
        pytest.skip(reason)
    return found


def metrics_settings(**overrides: Any) -> MetricsSettings:
    base: dict[str, Any] = {"listen": "127.0.0.1:0", "refresh_interval": 0.1, "ping_interval": 0.3}
    return MetricsSettings.model_validate({**base, **overrides})


async def get(port: int, path: str, **headers: str) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}", headers=headers) as resp,
    ):
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def scrape(port: int) -> dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]]:
    status, _, body = await get(port, "/metrics")
    assert status == 200
    return parse(body)


# --------------------------------------------------------------------------- the collector alone


def test_fresh_registry_exposes_every_brief_series_with_all_states_at_zero() -> None:
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    Metrics(registry, FakeClock(), metrics_settings())
    families = parse(generate_latest(registry).decode())

    for name, (kind, labels) in BRIEF_METRICS.items():
        assert name in families, name
        got_kind, samples = families[name]
        assert got_kind == kind, name
        for sample, lbl, _ in samples:
            assert set(lbl) - {"le"} == labels, (name, sample, lbl)
    assert {lbl["state"]: v for _, lbl, v in families["accountd_accounts"][1]} == dict.fromkeys(
        ALL_STATES, 0.0
    )
    assert {lbl["level"] for _, lbl, _ in families["accountd_alerts_active"][1]} == {
        "info", "warning", "error", "critical",
    }  # fmt: skip
    assert {lbl["outcome"] for _, lbl, _ in families["accountd_recoveries_total"][1]} == set(
        RECOVERY_OUTCOMES
    )
    assert {lbl["database"] for _, lbl, _ in families["accountd_db_up"][1]} == DATABASES
    # Nothing opened yet: no database counts as up, and nothing else is exported under our prefix
    # but the documented extras.
    assert value(families, "accountd_db_up", database="platform") == 0
    assert value(families, "accountd_build_info", version=metadata.version("accountd")) == 1
    extras = set(families) - set(BRIEF_METRICS)
    assert extras == {
        "accountd_ready",
        "accountd_transitions_pending",
        "accountd_outbox_pending",
        "accountd_outbox_dropped_total",
        "accountd_event_loop_lag_seconds",
    }
    # Per-tenant series only when asked for.
    assert not any("tenant" in name for name in families)


def test_per_tenant_series_only_when_enabled() -> None:
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    Metrics(registry, FakeClock(), metrics_settings(per_tenant=True))
    text = generate_latest(registry).decode()
    assert "# TYPE accountd_tenant_accounts gauge" in text
    assert "# TYPE accountd_tenant_transitions_total counter" in text


def test_one_registry_refuses_a_second_collector_and_registries_do_not_share() -> None:
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    first = Metrics(registry, FakeClock(), metrics_settings())
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry, FakeClock(), metrics_settings())
    other = CollectorRegistry()
    Metrics(other, FakeClock(), metrics_settings())
    first.db_error("core")
    assert b'accountd_db_errors_total{database="core"} 1.0' in generate_latest(registry)
    assert b'accountd_db_errors_total{database="core"} 0.0' in generate_latest(other)


@pytest.mark.parametrize(
    ("new", "trigger", "outcome"),
    [
        (State.online, Trigger.recovered, "success"),
        (State.initializing, Trigger.relogin_required, "relogin"),
        (State.waiting_qr, Trigger.qr_ready, "relogin"),
        (State.offline, Trigger.timeout, "failed"),
        (State.offline, Trigger.logged_out, "failed"),
        (State.error, Trigger.fail, "error"),
        (State.online, Trigger.force, "forced"),
        (State.error, Trigger.force, "forced"),
    ],
)
def test_recovery_outcome_names_how_a_stay_in_recovering_ended(
    new: State, trigger: Trigger, outcome: str
) -> None:
    assert recovery_outcome(new, trigger) == outcome
    assert outcome in RECOVERY_OUTCOMES


async def test_http_healthz_readyz_and_openmetrics_negotiation() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, FakeClock(), metrics_settings(), is_ready=lambda: False)
    server = MetricsServer(metrics)
    port = await server.start("127.0.0.1", 0)
    try:
        status, _, body = await get(port, "/healthz")
        assert status == 200 and json.loads(body)["alive"] is True
        status, ctype, body = await get(port, "/readyz")
        assert status == 503 and ctype.startswith("application/json")
        assert json.loads(body) == {
            "ready": False,
            "reasons": ["databases not opened yet", "accounts not loaded yet"],
        }
        status, ctype, body = await get(port, "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        assert "accountd_ready 0.0" in body
        status, ctype, body = await get(
            port, "/metrics", Accept="application/openmetrics-text; version=1.0.0"
        )
        assert ctype.startswith("application/openmetrics-text") and body.endswith("# EOF\n")
        metrics.mark_stopping()
        status, _, body = await get(port, "/readyz")
        assert status == 503 and json.loads(body)["reasons"] == ["shutting down"]
        status, _, _ = await get(port, "/nope")
        assert status == 404
    finally:
        await server.stop()


async def test_metrics_listen_address_in_use_is_a_config_error_naming_the_key() -> None:
    from accountd.errors import ConfigError

    metrics = Metrics(CollectorRegistry(), FakeClock(), metrics_settings())
    first = MetricsServer(metrics)
    port = await first.start("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match=r"metrics\.listen: cannot listen on 127\.0\.0\.1"):
            await MetricsServer(metrics).start("127.0.0.1", port)
    finally:
        await first.stop()


# --------------------------------------------------------------------------- heartbeat ages


@contextlib.asynccontextmanager
async def load_online(
    tmp_path: Path, n: int, now: float
) -> AsyncIterator[tuple[Supervisor, list[float]]]:
    """A real supervisor that loaded ``n`` online accounts (ages 0..59 s) from SQLite."""
    urls = sqlite_urls(tmp_path)
    await migrate.upgrade(urls)
    dbs = Databases(urls)
    ages = [float(k % 60) for k in range(n)]
    rng = random.Random(5)  # ids decide the load order, and so the sample: keep it repeatable
    rows = [
        {
            "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "tenant_id": f"tenant-{k % 3}",
            "account_name": f"m-{k}",
            "wework_guid": f"m-guid-{k}",
            "status": "online",
            "last_heartbeat_at": dt.datetime.fromtimestamp(now - age, dt.UTC).replace(tzinfo=None),
        }
        for k, age in enumerate(ages)
    ]
    async with dbs.platform.begin() as conn:
        await conn.execute(insert(wework_accounts), rows)
    try:
        async with WorkerClient("http://127.0.0.1:9", timeout=1) as worker:
            sup = Supervisor(
                AccountRepository(dbs.platform), worker, PolicyConfig(), FakeClock(now)
            )
            await sup.load()
            yield sup, ages
    finally:
        await dbs.dispose()


def expected_buckets(ages: list[float]) -> list[float]:
    return [float(sum(1 for a in ages if a <= b)) for b in HEARTBEAT_AGE_BUCKETS] + [len(ages)]


def age_buckets(metrics: Metrics) -> list[float]:
    from prometheus_client import generate_latest

    families = parse(generate_latest(metrics.registry).decode())
    _, samples = families["accountd_heartbeat_age_seconds"]
    return [v for name, _, v in samples if name.endswith("_bucket")]


async def test_heartbeat_age_histogram_is_exact_below_the_sample_size(tmp_path: Path) -> None:
    now = float(int(time.time()))
    async with load_online(tmp_path, 600, now) as (sup, ages):
        metrics = Metrics(CollectorRegistry(), sup.clock, metrics_settings(heartbeat_sample=600))
        metrics.attach(supervisor=sup)
        assert age_buckets(metrics)[-1] == 0  # nothing computed before the first refresh
        await metrics.refresh()
        assert age_buckets(metrics) == expected_buckets(ages)
        assert metrics.heartbeat_ages.total == pytest.approx(sum(ages))


async def test_heartbeat_age_histogram_is_sampled_and_scaled_above_it(tmp_path: Path) -> None:
    now = float(int(time.time()))
    async with load_online(tmp_path, 6000, now) as (sup, ages):
        metrics = Metrics(CollectorRegistry(), sup.clock, metrics_settings(heartbeat_sample=500))
        metrics.attach(supervisor=sup)
        for _ in range(3):  # the sample's offset rotates; every result must hold
            await metrics.refresh()
            assert metrics.heartbeat_ages.count <= 500
            got = age_buckets(metrics)
            want = expected_buckets(ages)
            # +Inf and _count are the exact number of online accounts; the rest is an estimate.
            assert got[-1] == 6000
            assert got == sorted(got)
            for g, w in zip(got, want, strict=True):
                # Within 4.5 standard deviations of a 500-account random sample's estimate.
                p = w / 6000
                assert abs(g - w) <= 4.5 * math.sqrt(p * (1 - p) / 500) * 6000 + 1, (got, want)


async def test_per_tenant_counts_come_from_a_chunked_walk(tmp_path: Path) -> None:
    now = float(int(time.time()))
    async with load_online(tmp_path, 300, now) as (sup, _):
        metrics = Metrics(CollectorRegistry(), sup.clock, metrics_settings(per_tenant=True))
        metrics.attach(supervisor=sup)
        await metrics.refresh_tenants(chunk=64)
        assert metrics.tenant_accounts == {(f"tenant-{k}", "online"): 100 for k in range(3)}


# --------------------------------------------------------------------------- a real daemon


@pytest.fixture
async def live(migrated_urls: dict[str, str], tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """A daemon (fresh registry, per-tenant series on) with the worker simulator, on loopback."""
    token = secrets.token_urlsafe(24)
    port = _free_port()
    sim = fast_simulator(
        ingest_url=f"http://127.0.0.1:{port}",
        token=token,
        seed=11,
        step_latency_max=0.08,
        scan_latency_max=0.15,
    )
    worker = await sim.start()
    dbs = Databases(migrated_urls)
    base = fast_settings(tmp_path, migrated_urls, port, worker, token)
    settings = base.model_copy(update={"metrics": metrics_settings(per_tenant=True)})
    registry = CollectorRegistry()
    daemon = Daemon(settings, registry=registry)
    ctx: dict[str, Any] = {"sim": sim, "dbs": dbs, "daemon": daemon, "registry": registry}
    try:
        yield ctx
    finally:
        await stop_stack(ctx)


async def test_real_transitions_move_the_counters_and_no_label_names_an_account(
    live: dict[str, Any],
) -> None:
    dbs: Databases = live["dbs"]
    daemon: Daemon = live["daemon"]
    sim: WorkerSimulator = live["sim"]
    n = 8
    ids = await seed_accounts(dbs, n)
    task = live["task"] = await run_until_ready(daemon)
    assert daemon.registry is live["registry"] and daemon.metrics_port
    port = daemon.metrics_port

    async def all_online() -> bool:
        return set((await statuses(dbs)).values()) == {"online"}

    await wait_for(all_online, 30, "every account online")

    async def refreshed() -> bool:
        m = await scrape(port)
        return (
            value(m, "accountd_heartbeat_age_seconds_count") == n
            and value(
                m,
                "accountd_db_latency_seconds_count",
                database="platform",
                operation="heartbeat_flush",
            )
            > 0
        )

    await wait_for(refreshed, 10, "heartbeat ages refreshed and heartbeats flushed")
    m = await scrape(port)
    assert {lbl["state"]: v for _, lbl, v in m["accountd_accounts"][1]} == {
        **dict.fromkeys(ALL_STATES, 0.0),
        "online": float(n),
    }
    start = {"from_state": "created", "to_state": "initializing", "trigger": "start"}
    assert value(m, "accountd_transitions_total", **start) == n
    verified = {"from_state": "verifying", "to_state": "online", "trigger": "verified"}
    assert value(m, "accountd_transitions_total", **verified) == n
    assert value(m, "accountd_state_duration_seconds_count", state="created") == n
    assert value(m, "accountd_state_duration_seconds_count", state="online") == 0
    assert value(m, "accountd_heartbeats_received_total") > 0
    # Workers beat every 0.3 s: every online account's last beat is within 5 s.
    assert value(m, "accountd_heartbeat_age_seconds_bucket", le="5.0") == n
    for database in DATABASES:
        assert value(m, "accountd_db_up", database=database) == 1
        assert value(m, "accountd_db_latency_seconds_count", database=database, operation="ping")
    assert value(m, "accountd_db_latency_seconds_count", database="platform", operation="load") == 1
    commits = value(
        m, "accountd_db_latency_seconds_count", database="platform", operation="transition"
    )
    assert commits >= 1
    assert value(m, "accountd_ready") == 1
    assert value(m, "accountd_build_info", version=metadata.version("accountd")) == 1
    tenant_online = [
        v for name, lbl, v in m["accountd_tenant_accounts"][1] if lbl["state"] == "online"
    ]
    assert tenant_online == [n]

    # Two sessions stop beating: heartbeat_lost, recovery, back online.
    for account_id in ids[:2]:
        assert sim.drop(account_id)

    async def recovered() -> bool:
        m = await scrape(port)
        return (
            value(m, "accountd_recoveries_total", outcome="success") >= 2
            and value(m, "accountd_accounts", state="online") == n
        )

    await wait_for(recovered, 30, "two recoveries counted")
    m = await scrape(port)
    lost = {"from_state": "online", "to_state": "offline", "trigger": "heartbeat_lost"}
    assert value(m, "accountd_transitions_total", **lost) >= 2
    assert value(m, "accountd_state_duration_seconds_count", state="online") >= 2
    assert value(m, "accountd_state_duration_seconds_count", state="recovering") >= 2
    assert value(m, "accountd_recoveries_in_flight") == value(
        m, "accountd_accounts", state="recovering"
    )
    assert value(m, "accountd_tenant_transitions_total", to_state="offline") >= 2

    # No series is per account: no label value is an account id or a wework_guid.
    labels = label_values(m)
    assert not labels & set(ids)
    assert not any(v.startswith("e2e-guid-") for v in labels)
    status, _, body = await get(port, "/readyz")
    assert status == 200 and json.loads(body) == {"ready": True, "reasons": []}

    daemon.request_stop()
    assert await asyncio.wait_for(task, 30) == 0


async def test_promtool_check_metrics_on_a_real_scrape_is_clean(live: dict[str, Any]) -> None:
    tool = promtool()
    dbs: Databases = live["dbs"]
    daemon: Daemon = live["daemon"]
    await seed_accounts(dbs, 4)
    live["task"] = await run_until_ready(daemon)
    assert daemon.metrics_port

    async def some_online() -> bool:
        return "online" in set((await statuses(dbs)).values())

    await wait_for(some_online, 30, "an account online")
    status, _, body = await get(daemon.metrics_port, "/metrics")
    assert status == 200 and "accountd_transitions_total{" in body
    checked = subprocess.run(
        [tool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == ""


async def test_readyz_is_503_while_loading_and_200_once_ready(tmp_path: Path) -> None:
    """/healthz answers during start-up; /readyz only once databases and accounts are up.

    A write lock on the SQLite platform database (held from this process, as any other writer
    could) keeps the daemon waiting in its start-up, before the accounts are loaded.
    """
    urls = sqlite_urls(tmp_path)
    await migrate.upgrade(urls)
    settings = Settings.model_validate(
        {
            "state_dir": tmp_path,
            "databases": urls,
            "ingest": {"listen": "127.0.0.1:0", "token": secrets.token_urlsafe(24)},
            "metrics": {"listen": "127.0.0.1:0", "ping_interval": 0.2},
            "worker": {"url": "http://127.0.0.1:9", "timeout": 1},
        }
    )
    daemon = Daemon(settings, registry=CollectorRegistry())
    platform_db = urls["platform"].removeprefix("sqlite+aiosqlite:///")
    lock = sqlite3.connect(platform_db, isolation_level=None, timeout=1)
    lock.execute("BEGIN IMMEDIATE")
    locked = True
    task = asyncio.create_task(daemon.run())
    try:
        deadline = time.monotonic() + 5
        while daemon.metrics_port is None:
            assert not task.done(), "daemon exited early"
            assert time.monotonic() < deadline, "metrics listener did not start"
            await asyncio.sleep(0.01)
        status, _, _ = await get(daemon.metrics_port, "/healthz")
        assert status == 200
        status, _, body = await get(daemon.metrics_port, "/readyz")
        assert status == 503
        assert "accounts not loaded yet" in json.loads(body)["reasons"]
        assert not daemon.ready

        lock.execute("ROLLBACK")
        locked = False

        async def ready() -> bool:
            assert daemon.metrics_port is not None
            return (await get(daemon.metrics_port, "/readyz"))[0] == 200

        await wait_for(ready, 15, "/readyz 200")
        assert daemon.ready
    finally:
        if locked:
            lock.execute("ROLLBACK")
        lock.close()
        daemon.request_stop()
        assert await asyncio.wait_for(task, 30) == 0


# --------------------------------------------------------------------------- rules and dashboard


def test_promtool_unit_tests_of_the_alerting_rules_pass() -> None:
    tool = promtool()
    checked = subprocess.run(
        [tool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [tool, "test", "rules", RULES_TEST.name],
        cwd=RULES_TEST.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def exported_names() -> set[str]:
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    Metrics(registry, FakeClock(), metrics_settings(per_tenant=True))
    names = set()
    for family, (kind, _) in parse(generate_latest(registry).decode()).items():
        # Families without samples yet (no outbox, no tenant seen) count by their exposed names.
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        names.update(family + suffix for suffix in suffixes)
    return names


def referenced_names(text: str) -> set[str]:
    return set(re.findall(r"\baccountd_[a-z_]+\b", text)) - {"accountd"}


def test_rules_and_dashboard_use_only_exported_series() -> None:
    exported = exported_names()
    rules = RULES.read_text(encoding="utf-8")
    exprs = "\n".join(re.findall(r"expr: (?:\|\n)?((?:.*\n)+?)\s+(?:for|labels):", rules))
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
    for where, names in (
        ("alerts.yml", referenced_names(exprs)),
        ("dashboard", referenced_names("\n".join(queries))),
    ):
        unknown = names - exported
        assert not unknown, f"{where} uses series accountd does not export: {sorted(unknown)}"
    # Every BRIEF §6 series is on the dashboard, and every alert class the issue names is a rule.
    on_dashboard = referenced_names("\n".join(queries))
    for name in BRIEF_METRICS:
        assert any(n.startswith(name) for n in on_dashboard), name
    alerts = set(re.findall(r"- alert: (\w+)", rules))
    assert {
        "AccountdAccountsInError",
        "AccountdMassOffline",
        "AccountdRecoveryFailing",
        "AccountdDatabaseDown",
        "AccountdAbsent",
        "AccountdDown",
        "AccountdNotReady",
    } <= alerts


def test_dashboard_is_valid_json_with_a_templated_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'instance=~"$instance"' in target["expr"], panel["title"]
