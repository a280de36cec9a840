"""The usage report on both backends: exact sums and hand-computed costs, folding of the
grouping (prices stay per model and tier), the [start, end) window, the tenant filter,
reserved capacity against commitments, unpriced pairs; query parsing; `tiered usage`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.main import main
from deployments.config.prices import PricesSpec
from deployments.state.config import StateSpec
from deployments.state.ledger import Ledger
from deployments.state.report import (
    UsageQueryError,
    UsageReport,
    build_usage_report,
    parse_usage_query,
    render_reservations,
    render_table,
    to_csv,
)
from deployments.state.store import StateStore
from deployments.state.types import ReservationSeconds, UsageQuery
from tests.state_fixtures import postgres_server, state_spec  # noqa: F401
from tests.state_helpers import rec, run

START = datetime(2026, 3, 1, tzinfo=UTC)
END = datetime(2026, 3, 3, tzinfo=UTC)  # two days: a commitment prorates to 1/15 month
DAY_A, DAY_B = START + timedelta(hours=10), START + timedelta(days=1, hours=10)
H = timedelta(hours=1)

PRICES = PricesSpec.model_validate({
    "currency": "EUR",
    "tokens": [
        {"model": "m1", "tier": "shared", "input_per_1m": 2.0, "cached_input_per_1m": 0.5,
         "output_per_1m": 8.0},
        {"model": "m1", "tier": "dedicated", "input_per_1m": 1.0, "output_per_1m": 4.0},
        {"model": "m2", "tier": "shared", "input_per_1m": 10.0, "output_per_1m": 30.0},
    ],  # m2 dedicated: covered by the commitment; m3 shared: unpriced
    "committed_monthly": {"acme": 3000.0, "umbrella": 1500.0},
})

RECORDS = [
    # cost = (uncached * input + cached * cached_input + completion * output) / 1e6
    rec("r1", "acme", "m1", "dedicated", False, 1000, 200, 500, DAY_A),  # 0.003
    rec("r2", "acme", "m1", "dedicated", False, 2000, 0, 1000, DAY_B),  # 0.006
    rec("r3", "acme", "m1", "shared", True, 3000, 1000, 2000, DAY_B),  # spill: 0.0205
    rec("r4", "globex", "m1", "shared", False, 4000, 2000, 1000, DAY_A),  # 0.013
    rec("r5", "globex", "m2", "shared", False, 1000, 0, 100, DAY_B),  # 0.013
    rec("r6", "initech", "m3", "shared", False, 500, 0, 50, DAY_A),  # unpriced: 0
    rec("r7", "acme", "m2", "dedicated", False, 100, 0, 10, DAY_A),  # no price, committed: 0
    rec("r10", "initech", "m1", "shared", False, 10, 0, 10, START),  # at start: in; 0.0001
    rec("r8", "globex", "m1", "shared", False, 9000, 0, 9000, END),  # at end: out
    rec("r9", "globex", "m1", "shared", False, 9000, 0, 9000, START - timedelta(seconds=1)),
]
RESERVED = [
    ReservationSeconds("acme", "m1", "ra", START, 3600.0),
    ReservationSeconds("acme", "m1", "ra", START + H, 1800.0),
    ReservationSeconds("acme", "m1", "rb", START + 29 * H, 3600.0),
    ReservationSeconds("acme", "m1", "ra", START - H, 3600.0),  # before the window
    ReservationSeconds("acme", "m1", "ra", END, 3600.0),  # the hour at the end: out
    ReservationSeconds("hooli", "m2", "rh", START + 5 * H, 3600.0),  # no commitment
]

Row = tuple[dict[str, str], int, int, int, int, int, int, int, float]


def rows(report: UsageReport) -> list[Row]:
    return [(r.key, r.requests, r.prompt_tokens, r.cached_tokens, r.completion_tokens,
             r.total_tokens, r.spill_requests, r.spill_tokens, r.cost) for r in report.rows]


async def seed(spec: StateSpec) -> None:
    store = await StateStore.open(spec)
    try:
        ledger = Ledger(store)
        assert await ledger.write(RECORDS) == len(RECORDS)
        await ledger.add_reservation_seconds(RESERVED)
    finally:
        await store.close()


def reports(spec: StateSpec, queries: dict[str, UsageQuery]) -> dict[str, UsageReport]:
    async def go() -> dict[str, UsageReport]:
        await seed(spec)
        store = await StateStore.open(spec)
        try:
            return {n: await build_usage_report(Ledger(store), PRICES, q)
                    for n, q in queries.items()}
        finally:
            await store.close()

    return run(go())


def q(group_by: tuple[Any, ...] = ("tenant", "tier", "model"), tenant: str | None = None,
      start: datetime = START, end: datetime = END) -> UsageQuery:
    return UsageQuery(start=start, end=end, tenant=tenant, group_by=group_by)


def t(tenant: str, tier: str, model: str) -> dict[str, str]:
    return {"tenant": tenant, "tier": tier, "model": model}


DEFAULT_ROWS: list[Row] = [
    (t("acme", "dedicated", "m1"), 2, 3000, 200, 1500, 4500, 0, 0, 0.009),
    (t("acme", "dedicated", "m2"), 1, 100, 0, 10, 110, 0, 0, 0.0),
    (t("acme", "shared", "m1"), 1, 3000, 1000, 2000, 5000, 1, 5000, 0.0205),
    (t("globex", "shared", "m1"), 1, 4000, 2000, 1000, 5000, 0, 0, 0.013),
    (t("globex", "shared", "m2"), 1, 1000, 0, 100, 1100, 0, 0, 0.013),
    (t("initech", "shared", "m1"), 1, 10, 0, 10, 20, 0, 0, 0.0001),
    (t("initech", "shared", "m3"), 1, 500, 0, 50, 550, 0, 0, 0.0),
]
ACME_EFFECTIVE = round(200.0 / 4610 * 1e6, 9)  # 3000 * 2/30 over r1 + r2 + r7 tokens


def test_report_sums_costs_folding_window_filter(state_spec: StateSpec) -> None:  # noqa: F811
    got = reports(state_spec, {
        "default": q(),
        "tenant": q(("tenant",)),
        "day_spill": q(("day", "spill")),
        "total": q(()),
        "acme": q(("model",), tenant="acme"),
        "day_b": q(("tenant",), start=START + timedelta(days=1)),
        "empty": q(start=END + timedelta(days=3), end=END + timedelta(days=4)),
    })
    default = got["default"]
    assert rows(default) == DEFAULT_ROWS
    assert default.totals.model_dump() == {
        "requests": 8, "prompt_tokens": 11610, "cached_tokens": 3200,
        "completion_tokens": 4670, "total_tokens": 16280, "spill_requests": 1,
        "spill_tokens": 5000, "cost": 0.0556}
    assert (default.currency, default.start, default.end) == ("EUR", START, END)
    assert default.group_by == ["tenant", "tier", "model"] and default.tenant is None
    assert [u.model_dump() for u in default.unpriced] == [{"model": "m3", "tier": "shared"}]
    assert [r.model_dump() for r in default.reservations] == [
        {"tenant": "acme", "replica_hours": 2.5, "tokens_served": 4610,
         "tokens_per_replica_hour": 1844.0, "committed_monthly": 3000.0,
         "committed_for_period": 200.0, "effective_price_per_1m_tokens": ACME_EFFECTIVE},
        {"tenant": "hooli", "replica_hours": 1.0, "tokens_served": 0,
         "tokens_per_replica_hour": 0.0, "committed_monthly": 0.0,
         "committed_for_period": 0.0, "effective_price_per_1m_tokens": None},
        {"tenant": "umbrella", "replica_hours": 0.0, "tokens_served": 0,
         "tokens_per_replica_hour": None, "committed_monthly": 1500.0,
         "committed_for_period": 100.0, "effective_price_per_1m_tokens": None},
    ]
    # By tenant only: each model and tier still at its own price (acme mixes three).
    assert rows(got["tenant"]) == [
        ({"tenant": "acme"}, 4, 6100, 1200, 3510, 9610, 1, 5000, 0.0295),
        ({"tenant": "globex"}, 2, 5000, 2000, 1100, 6100, 0, 0, 0.026),
        ({"tenant": "initech"}, 2, 510, 0, 60, 570, 0, 0, 0.0001),
    ]
    assert rows(got["day_spill"]) == [
        ({"day": "2026-03-01", "spill": "false"}, 5, 5610, 2200, 1570, 7180, 0, 0, 0.0161),
        ({"day": "2026-03-02", "spill": "false"}, 2, 3000, 0, 1100, 4100, 0, 0, 0.019),
        ({"day": "2026-03-02", "spill": "true"}, 1, 3000, 1000, 2000, 5000, 1, 5000, 0.0205),
    ]
    assert rows(got["total"]) == [({}, 8, 11610, 3200, 4670, 16280, 1, 5000, 0.0556)]
    acme = got["acme"]
    assert rows(acme) == [
        ({"model": "m1"}, 3, 6000, 1200, 3500, 9500, 1, 5000, 0.0295),
        ({"model": "m2"}, 1, 100, 0, 10, 110, 0, 0, 0.0),
    ]
    assert acme.unpriced == [] and acme.tenant == "acme"
    assert [r.tenant for r in acme.reservations] == ["acme"]
    # One day: one replica-hour (rb at 05:00), the commitment prorated to 1/30.
    day_b = got["day_b"]
    assert rows(day_b) == [
        ({"tenant": "acme"}, 2, 5000, 1000, 3000, 8000, 1, 5000, 0.0265),
        ({"tenant": "globex"}, 1, 1000, 0, 100, 1100, 0, 0, 0.013),
    ]
    assert day_b.unpriced == []
    line = day_b.reservations[0]
    assert (line.tenant, line.replica_hours, line.tokens_served, line.tokens_per_replica_hour,
            line.committed_for_period, line.effective_price_per_1m_tokens) == (
        "acme", 1.0, 3000, 3000.0, 100.0, round(100.0 / 3000 * 1e6, 9))
    empty = got["empty"]
    assert empty.rows == [] and empty.totals.requests == 0 and empty.totals.cost == 0.0
    assert [(r.tenant, r.replica_hours, r.committed_for_period) for r in empty.reservations] == [
        ("acme", 0.0, 100.0), ("umbrella", 0.0, 50.0)]


def test_report_outputs(state_spec: StateSpec) -> None:  # noqa: F811
    report = reports(state_spec, {"r": q(("tenant",))})["r"]
    assert to_csv(report).splitlines() == [
        "tenant,requests,prompt_tokens,cached_tokens,completion_tokens,total_tokens,"
        "spill_requests,spill_tokens,cost",
        "acme,4,6100,1200,3510,9610,1,5000,0.0295",
        "globex,2,5000,2000,1100,6100,0,0,0.026",
        "initech,2,510,0,60,570,0,0,0.0001",
    ]
    body = json.loads(report.model_dump_json())
    assert body == report.model_dump(mode="json")
    assert body["start"] == "2026-03-01T00:00:00Z" and body["end"] == "2026-03-03T00:00:00Z"
    assert body["rows"][0]["key"] == {"tenant": "acme"} and body["totals"]["cost"] == 0.0556
    assert body["unpriced"] == [{"model": "m3", "tier": "shared"}]
    table = render_table(report)
    assert table.row_count == 4 and len(table.columns) == 9
    assert table.caption == "no price for m3/shared: counted as 0"
    reservations = render_reservations(report)
    assert reservations is not None and reservations.row_count == 3


def test_report_groups_by_adapter_at_the_base_price(state_spec: StateSpec) -> None:  # noqa: F811
    """LoRA requests carry their adapter ("" is the base model) and cost the base's price."""
    records = [
        rec("a1", "acme", "m1", "shared", False, 1000, 0, 100, DAY_A, adapter="sql-lora"),
        rec("a2", "acme", "m1", "shared", False, 1000, 0, 100, DAY_B, adapter="sql-lora"),
        rec("a3", "acme", "m1", "shared", False, 1000, 0, 100, DAY_A),
        rec("a4", "globex", "m1", "shared", False, 1000, 0, 100, DAY_A, adapter="chat-lora"),
    ]

    async def go() -> dict[str, UsageReport]:
        store = await StateStore.open(state_spec)
        try:
            await Ledger(store).write(records)
            return {n: await build_usage_report(Ledger(store), PRICES, query) for n, query in {
                "adapter": q(("adapter",)), "tenant_adapter": q(("tenant", "adapter")),
            }.items()}
        finally:
            await store.close()

    got = run(go())
    each = 0.0028  # 1000 * 2.0 + 100 * 8.0, per 1M
    assert [(r.key, r.requests, r.cost) for r in got["adapter"].rows] == [
        ({"adapter": ""}, 1, each), ({"adapter": "chat-lora"}, 1, each),
        ({"adapter": "sql-lora"}, 2, 2 * each),
    ]
    assert [r.key for r in got["tenant_adapter"].rows] == [
        {"tenant": "acme", "adapter": ""}, {"tenant": "acme", "adapter": "sql-lora"},
        {"tenant": "globex", "adapter": "chat-lora"},
    ]
    assert to_csv(got["adapter"]).splitlines()[0].startswith("adapter,requests,")


# ---- query parsing ---------------------------------------------------------------------
NOW = datetime(2026, 12, 15, 10, 30, tzinfo=UTC)


def test_parse_usage_query_defaults_and_forms() -> None:
    assert parse_usage_query(None, None, None, None, NOW) == UsageQuery(
        start=datetime(2026, 12, 1, tzinfo=UTC), end=NOW, tenant=None,
        group_by=("tenant", "tier", "model"))
    got = parse_usage_query("2026-11-01", "2026-11-02T08:00Z", " acme ", "day, spill", NOW)
    assert got == UsageQuery(start=datetime(2026, 11, 1, tzinfo=UTC),
                             end=datetime(2026, 11, 2, 8, tzinfo=UTC), tenant="acme",
                             group_by=("day", "spill"))
    got = parse_usage_query("2026-11-01T12:00:00", "2026-11-01T15:00:00+02:00", "", "tier",
                            NOW)
    assert (got.start, got.end, got.tenant) == (datetime(2026, 11, 1, 12, tzinfo=UTC),
                                                datetime(2026, 11, 1, 13, tzinfo=UTC), None)


@pytest.mark.parametrize(("args", "param", "text"), [
    (("2026-13-01", None, None, None), "start", "not an ISO date or datetime: '2026-13-01'"),
    (("2026-11-01", "yesterday", None, None), "end", "not an ISO date or datetime"),
    (("2026-11-05", "2026-11-01", None, None), "end", "is not after start"),
    (("2026-11-05", "2026-11-05", None, None), "end", "is not after start"),
    (("2026-12-20", None, None, None), "end", "is not after start"),  # default end: now
    ((None, None, None, "tenant,week"), "group_by", "unknown key 'week'"),
    ((None, None, None, ""), "group_by", "empty"),
    ((None, None, None, "tier,tier"), "group_by", "repeats a key"),
])
def test_parse_usage_query_errors_name_the_param(
    args: tuple[str | None, ...], param: str, text: str
) -> None:
    with pytest.raises(UsageQueryError) as err:
        parse_usage_query(*args, now=NOW)  # type: ignore[misc]
    assert err.value.param == param
    assert str(err.value).startswith(f"{param}: ") and text in str(err.value)
    assert "\n" not in str(err.value)


# ---- the CLI -----------------------------------------------------------------------------
def write_config(tmp_path: Path, state: dict[str, Any], prices: PricesSpec = PRICES) -> Path:
    models = [{"name": m, "path": "/nonexistent/weights", "shared_pool": {"tp_size": 1}}
              for m in ("m1", "m2", "m3")]
    tenants: list[dict[str, Any]] = [
        {"name": n, "tier": "dedicated", "dedicated": {"model": m}}
        for n, m in (("acme", "m1"), ("hooli", "m2"), ("umbrella", "m1"))
    ] + [{"name": "globex"}, {"name": "initech"}]
    path = tmp_path / "tiered.yaml"
    path.write_text(yaml.safe_dump({
        "models": models, "tenants": tenants, "state": state,
        "prices": prices.model_dump(exclude_none=True),
    }))
    return path


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines()
            if line.startswith("│")]


WINDOW = ["--start", "2026-03-01", "--end", "2026-03-03"]


def test_cli_formats(state_spec: StateSpec, tmp_path: Path,  # noqa: F811
                     capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIERED_STATE_URL", raising=False)
    run(seed(state_spec))
    config = write_config(tmp_path, {"url": f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}"})
    base = ["usage", "--config", str(config), "--state-url", state_spec.url, *WINDOW]

    assert main([*base, "--format", "json"]) == 0
    out, err = capsys.readouterr()
    body = json.loads(out)
    assert err == "" and body["currency"] == "EUR" and body["totals"]["cost"] == 0.0556
    assert [(r["key"], r["requests"], r["cost"]) for r in body["rows"]] == [
        (k, n, c) for k, n, *_, c in DEFAULT_ROWS]
    assert body["reservations"][0]["effective_price_per_1m_tokens"] == ACME_EFFECTIVE

    assert main([*base, "--format", "csv", "--group-by", "tenant", "--tenant", "globex"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.splitlines()[1:] == ["globex,2,5000,2000,1100,6100,0,0,0.026"]

    assert main([*base, "--group-by", "tenant"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    got = table_rows(out)
    assert got[:4] == [
        ["acme", "4", "6,100", "1,200", "3,510", "9,610", "1", "5,000", "0.029500"],
        ["globex", "2", "5,000", "2,000", "1,100", "6,100", "0", "0", "0.026000"],
        ["initech", "2", "510", "0", "60", "570", "0", "0", "0.000100"],
        ["total", "8", "11,610", "3,200", "4,670", "16,280", "1", "5,000", "0.055600"],
    ]
    assert got[4:] == [
        ["acme", "2.50", "4,610", "1,844.0", "3,000.000000", "200.000000",
         f"{ACME_EFFECTIVE:,.6f}"],
        ["hooli", "1.00", "0", "0.0", "0.000000", "0.000000", "-"],
        ["umbrella", "0.00", "0", "-", "1,500.000000", "100.000000", "-"],
    ]
    assert "no price for m3/shared" in out


def test_cli_state_url_from_config_and_env(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIERED_STATE_URL", raising=False)
    seeded = StateSpec(url=f"sqlite+aiosqlite:///{tmp_path / 'seeded.db'}")
    run(seed(seeded))
    config = write_config(tmp_path, {"url": seeded.url})
    argv = ["usage", "--config", str(config), *WINDOW, "--format", "csv", "--group-by", "spill"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "false,7,8610,2200,2670,11280,0,0,0.0351", "true,1,3000,1000,2000,5000,1,5000,0.0205"]
    monkeypatch.setenv("TIERED_STATE_URL", f"sqlite+aiosqlite:///{tmp_path / 'other.db'}")
    assert main(argv) == 0  # the env wins over the config: an empty (fresh) database
    assert capsys.readouterr().out.splitlines()[1:] == []


SECRET = "s3cr3t-pw"
DEAD_PG = f"postgresql+psycopg://billing:{SECRET}@127.0.0.1:1/tiered"


@pytest.mark.parametrize(("extra", "config_state", "env", "expect"), [
    (["--start", "2026-13-01"], None, None, "error: --start: not an ISO date"),
    (["--start", "2026-03-05", "--end", "2026-03-01"], None, None, "error: --end: "),
    (["--group-by", "tenant,week"], None, None, "error: --group-by: unknown key 'week'"),
    (["--state-url", f"mysql://u:{SECRET}@h/db"], None, None,
     "error: --state-url: unsupported database driver 'mysql'"),
    (["--state-url", "::nonsense::"], None, None, "error: --state-url: state.url is not"),
    ([], None, f"oracle://u:{SECRET}@h/db", "error: TIERED_STATE_URL: unsupported"),
    ([], {"url": DEAD_PG, "connect_timeout_s": 1}, None,
     "error: state.url: cannot connect to postgresql+psycopg://billing:***@127.0.0.1:1/tiered"),
    (["--state-url", DEAD_PG], None, None, "error: state.url: cannot connect to "),
    ([], {"url": f"mysql://u:{SECRET}@h/db"}, None, "error: "),  # ConfigError
])
def test_cli_errors_one_line_no_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    extra: list[str], config_state: dict[str, Any] | None, env: str | None, expect: str,
) -> None:
    monkeypatch.delenv("TIERED_STATE_URL", raising=False)
    if env is not None:
        monkeypatch.setenv("TIERED_STATE_URL", env)
    state = config_state or {"url": f"sqlite+aiosqlite:///{tmp_path / 'ok.db'}",
                             "connect_timeout_s": 1}
    config = write_config(tmp_path, state)
    assert main(["usage", "--config", str(config), *extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(expect) and err.endswith("\n")
    assert len(err.splitlines()) == 1 and SECRET not in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("content", "expect"), [
    (None, "bad.yaml: no such file"),
    ("models: [\n  - {name: : :", "bad.yaml:2:3: not valid YAML/JSON"),  # line:column
    ("models: []\n", "models: List should have at least 1 item"),  # ConfigError
])
def test_cli_bad_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             content: str | None, expect: str) -> None:
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["usage", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and expect in err
    assert len(err.splitlines()) == 1
