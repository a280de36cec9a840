"""The usage report: ledger sums turned into money, for `tiered usage` and GET /admin/usage.

Prices are per (model, tier), so the ledger is always summed at least per tenant, model,
tier and spill, priced there, then folded into the grouping that was asked for: grouping
by tenant alone still bills each model and tier at its own price. A spilled request is
billed at the shared price. Rows (`UsageLine`) carry their group in `key` only (one
string per key of `group_by`, e.g. {"tenant": "acme", "day": "2026-12-01"}; "adapter" is
the LoRA adapter's name, "" for the base model); the CSV and the table flatten it into
one column per key. An adapter is billed at its base model's price.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import cast

from pydantic import BaseModel
from rich.table import Table

from deployments.config.prices import PricesSpec
from deployments.state.ledger import Ledger
from deployments.state.types import GROUP_KEYS, GroupKey, UsageAggregate, UsageQuery

DEFAULT_GROUP_BY = "tenant,tier,model"
COMMITMENT_PERIOD_S = 30 * 86400  # committed_monthly is prorated on a 30-day month
COST_DIGITS = 9  # rounding that hides float noise yet keeps one token's price


class UsageQueryError(ValueError):
    """A bad query parameter; `param` names it, the message is one line."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param
        self.reason = reason


def _instant(param: str, raw: str) -> datetime:
    """An ISO date (its first instant) or datetime; naive means UTC."""
    try:
        value = datetime.fromisoformat(raw.strip())
    except ValueError:
        shown = raw if len(raw) <= 40 else raw[:40] + "…"
        raise UsageQueryError(
            param, f"not an ISO date or datetime: {shown!r} (e.g. 2026-12-01 or 2026-12-01T08:00Z)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_usage_query(start: str | None, end: str | None, tenant: str | None,
                      group_by: str | None, now: datetime) -> UsageQuery:
    """The query from its text parameters (CLI flags, HTTP query string). Defaults: this
    UTC month so far, grouped by tenant, tier and model. `end` is exclusive."""
    now = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    lo = _instant("start", start) if start else now.replace(
        day=1, hour=0, minute=0, second=0, microsecond=0)
    hi = _instant("end", end) if end else now
    if hi <= lo:
        raise UsageQueryError(
            "end", f"{hi.isoformat()} is not after start {lo.isoformat()} (end is exclusive)")
    keys = [k.strip() for k in (DEFAULT_GROUP_BY if group_by is None else group_by).split(",")]
    if keys == [""]:
        raise UsageQueryError("group_by", f"empty; a comma list of {','.join(GROUP_KEYS)}")
    for k in keys:
        if k not in GROUP_KEYS:
            raise UsageQueryError(
                "group_by", f"unknown key {k[:40]!r}; choose from {','.join(GROUP_KEYS)}")
    if len(set(keys)) != len(keys):
        raise UsageQueryError("group_by", "repeats a key")
    return UsageQuery(start=lo, end=hi, tenant=(tenant or "").strip() or None,
                      group_by=tuple(cast(GroupKey, k) for k in keys))


class UsageTotals(BaseModel):
    """Sums over a set of ledger rows. total_tokens = prompt + completion (cached tokens
    are part of prompt); spill_*: the part a dedicated tenant spilled to the shared pool."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    spill_requests: int = 0
    spill_tokens: int = 0
    cost: float = 0.0

    def add(self, agg: UsageAggregate, spill: bool, cost: float) -> None:
        tokens = agg.prompt_tokens + agg.completion_tokens
        self.requests += agg.requests
        self.prompt_tokens += agg.prompt_tokens
        self.cached_tokens += agg.cached_tokens
        self.completion_tokens += agg.completion_tokens
        self.total_tokens += tokens
        self.spill_requests += agg.requests if spill else 0
        self.spill_tokens += tokens if spill else 0
        self.cost += cost


class UsageLine(UsageTotals):
    """One group: `key` maps each group_by key to its value (day "YYYY-MM-DD" UTC,
    spill "true"/"false")."""

    key: dict[str, str]


class ReservationLine(BaseModel):
    """A dedicated tenant's reserved capacity against what it served and committed to.
    committed_for_period = committed_monthly x period / 30 days."""

    tenant: str
    replica_hours: float
    tokens_served: int  # prompt + completion on tier "dedicated" (spill excluded)
    tokens_per_replica_hour: float | None  # None: no replica-hours
    committed_monthly: float  # 0 when the tenant has no commitment
    committed_for_period: float
    effective_price_per_1m_tokens: float | None  # None: no tokens served


class UnpricedLine(BaseModel):
    """A (model, tier) served in the period with no price: its cost counts as 0."""

    model: str
    tier: str


class UsageReport(BaseModel):
    """The whole answer; GET /admin/usage returns model_dump(mode="json")."""

    start: datetime
    end: datetime
    tenant: str | None
    group_by: list[GroupKey]
    currency: str
    rows: list[UsageLine]
    totals: UsageTotals
    reservations: list[ReservationLine]
    unpriced: list[UnpricedLine]


def _billing_tier(tier: str, spill: bool) -> str:
    return "shared" if spill else tier  # spill is served, and billed, by the shared pool


async def build_usage_report(ledger: Ledger, prices: PricesSpec,
                             query: UsageQuery) -> UsageReport:
    """Query the ledger once at (group_by + tenant, model, tier, spill), price each row,
    fold into group_by; add reservation lines for dedicated tenants."""
    if query.start is None or query.end is None:
        raise ValueError("a usage report needs both start and end")  # commitments prorate
    fine_keys = query.group_by + tuple(
        k for k in cast(tuple[GroupKey, ...], ("tenant", "model", "tier", "spill"))
        if k not in query.group_by)
    fine = await ledger.aggregate(UsageQuery(query.start, query.end, query.tenant, fine_keys))

    rows: dict[tuple[str, ...], UsageLine] = {}
    totals = UsageTotals()
    unpriced: set[tuple[str, str]] = set()
    dedicated_tokens: dict[str, int] = {}
    for agg in fine:
        spill = agg.key["spill"] == "true"
        model, tier = agg.key["model"], _billing_tier(agg.key["tier"], spill)
        price = prices.price(model, tier)
        cost = price.cost(agg.prompt_tokens, agg.cached_tokens, agg.completion_tokens) \
            if price else 0.0
        if price is None and tier != "dedicated":  # dedicated: covered by the commitment
            unpriced.add((model, tier))
        if tier == "dedicated":
            tenant = agg.key["tenant"]
            dedicated_tokens[tenant] = dedicated_tokens.get(tenant, 0) \
                + agg.prompt_tokens + agg.completion_tokens
        group = tuple(agg.key[k] for k in query.group_by)
        line = rows.get(group)
        if line is None:  # `fine` is ordered by group_by first: rows come out sorted
            line = rows[group] = UsageLine(key=dict(zip(query.group_by, group, strict=True)))
        line.add(agg, spill, cost)
        totals.add(agg, spill, cost)
    for sums in (*rows.values(), totals):
        sums.cost = round(sums.cost, COST_DIGITS)

    seconds = await ledger.reservation_seconds(query)
    period_s = (query.end - query.start).total_seconds()
    tenants = sorted(set(seconds) | {
        t for t in prices.committed_monthly if query.tenant in (None, t)})
    reservations = []
    for tenant in tenants:
        hours = seconds.get(tenant, 0.0) / 3600
        tokens = dedicated_tokens.get(tenant, 0)
        monthly = prices.committed_monthly.get(tenant, 0.0)
        committed = monthly * period_s / COMMITMENT_PERIOD_S
        reservations.append(ReservationLine(
            tenant=tenant,
            replica_hours=hours,
            tokens_served=tokens,
            tokens_per_replica_hour=tokens / hours if hours else None,
            committed_monthly=monthly,
            committed_for_period=round(committed, COST_DIGITS),
            effective_price_per_1m_tokens=(
                round(committed / tokens * 1e6, COST_DIGITS) if tokens else None),
        ))
    return UsageReport(
        start=query.start, end=query.end, tenant=query.tenant, group_by=list(query.group_by),
        currency=prices.currency, rows=list(rows.values()), totals=totals,
        reservations=reservations,
        unpriced=[UnpricedLine(model=m, tier=t) for m, t in sorted(unpriced)],
    )


# ---- output ------------------------------------------------------------------------------
NUMBER_FIELDS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens",
                 "total_tokens", "spill_requests", "spill_tokens")
CSV_HEADER_FIELDS = (*NUMBER_FIELDS, "cost")


def _money(value: float) -> str:
    return f"{value:,.6f}"


def render_table(report: UsageReport) -> Table:
    """The rows and a totals line; the caption names the unpriced (model, tier) pairs."""
    def iso(at: datetime) -> str:
        return at.isoformat().replace("+00:00", "Z")

    title = (f"Usage {iso(report.start)} to {iso(report.end)} (end exclusive)"
             + (f", tenant {report.tenant}" if report.tenant else ""))
    table = Table(title=title, show_footer=False)
    for key in report.group_by:
        table.add_column(key)
    for name in ("requests", "prompt", "cached", "completion", "total", "spill requests",
                 "spill tokens"):
        table.add_column(name, justify="right")
    table.add_column(f"cost ({report.currency})", justify="right")

    def cells(line: UsageTotals) -> list[str]:
        return [f"{getattr(line, n):,}" for n in NUMBER_FIELDS] + [_money(line.cost)]

    for row in report.rows:
        table.add_row(*(row.key[k] for k in report.group_by), *cells(row),
                      end_section=row is report.rows[-1])
    label = ["total"] + [""] * (len(report.group_by) - 1) if report.group_by else []
    table.add_row(*label, *cells(report.totals), style="bold")
    if report.unpriced:
        pairs = ", ".join(f"{u.model}/{u.tier}" for u in report.unpriced)
        table.caption = f"no price for {pairs}: counted as 0"
    return table


def render_reservations(report: UsageReport) -> Table | None:
    """Dedicated tenants' replica-hours and commitments; None when there are none."""
    if not report.reservations:
        return None
    table = Table(title=f"Reserved capacity ({report.currency})")
    for name in ("tenant", "replica hours", "tokens served", "tokens/replica-hour",
                 "committed monthly", "committed for period", "effective per 1M"):
        table.add_column(name, justify="left" if name == "tenant" else "right")
    for r in report.reservations:
        table.add_row(
            r.tenant, f"{r.replica_hours:,.2f}", f"{r.tokens_served:,}",
            "-" if r.tokens_per_replica_hour is None else f"{r.tokens_per_replica_hour:,.1f}",
            _money(r.committed_monthly), _money(r.committed_for_period),
            "-" if r.effective_price_per_1m_tokens is None
            else _money(r.effective_price_per_1m_tokens),
        )
    return table


def to_csv(report: UsageReport) -> str:
    """Header (the group keys, then the sums), then one line per row; no totals line, so
    the file sums cleanly in a spreadsheet."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*report.group_by, *CSV_HEADER_FIELDS])
    for row in report.rows:
        writer.writerow([*(row.key[k] for k in report.group_by),
                         *(getattr(row, n) for n in CSV_HEADER_FIELDS)])
    return out.getvalue()
