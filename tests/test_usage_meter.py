"""Usage per (tenant, model, tier): counters, spill, totals, bad input; one shared actor."""

from __future__ import annotations

import uuid

import pytest

from deployments.tenancy.usage import UsageMeter, get_usage_meter


def _record(meter: UsageMeter, tenant: str, tier: str, spill: bool = False, **tokens: int) -> None:
    counts = {"prompt_tokens": 10, "cached_tokens": 4, "completion_tokens": 5, **tokens}
    meter.record(tenant, "m", tier, spill=spill, **counts)


def test_counters_per_tenant_model_and_tier_with_spill_apart() -> None:
    meter = UsageMeter()
    _record(meter, "acme", "dedicated")
    _record(meter, "acme", "dedicated", prompt_tokens=20, cached_tokens=0)
    _record(meter, "acme", "shared", spill=True, completion_tokens=7)  # overflow
    _record(meter, "globex", "shared")
    meter.record(
        "globex",
        "other",
        "shared",
        spill=False,
        prompt_tokens=1,
        cached_tokens=0,
        completion_tokens=1,
    )
    rows = {(r["tenant"], r["model"], r["service_tier"]): r for r in meter.snapshot()}
    assert list(rows) == sorted(rows)
    dedicated = rows[("acme", "m", "dedicated")]
    assert (dedicated["requests"], dedicated["prompt_tokens"], dedicated["cached_tokens"]) == (
        2,
        30,
        4,
    )
    assert dedicated["completion_tokens"] == 10 and dedicated["spill_requests"] == 0
    spilled = rows[("acme", "m", "shared")]
    assert (spilled["spill_requests"], spilled["spill_tokens"]) == (1, 17)
    assert rows[("globex", "m", "shared")]["spill_tokens"] == 0
    totals = meter.totals()
    assert totals["acme"]["requests"] == 3 and totals["acme"]["spill_tokens"] == 17
    assert totals["globex"]["prompt_tokens"] == 11


@pytest.mark.parametrize(
    ("tier", "spill", "tokens"),
    [
        ("gold", False, {}),
        ("dedicated", True, {}),  # spill is served by the shared pool
        ("shared", False, {"prompt_tokens": -1}),
        ("shared", False, {"cached_tokens": 11}),  # more cached than prompt
    ],
)
def test_impossible_records_are_refused(tier: str, spill: bool, tokens: dict) -> None:
    meter = UsageMeter()
    with pytest.raises(ValueError):
        _record(meter, "acme", tier, spill, **tokens)
    assert meter.snapshot() == []


def test_one_meter_actor_collects_from_two_callers(local_ray) -> None:  # type: ignore[no-untyped-def]
    ray = local_ray
    name = f"usage-{uuid.uuid4().hex[:8]}"

    @ray.remote(num_cpus=0)
    def ingress_replica(name: str, tenant: str, n: int) -> None:
        meter = get_usage_meter(name, namespace="tiered-test")
        usage = {
            "tenant": tenant,
            "model": "m",
            "tier": "shared",
            "spill": False,
            "prompt_tokens": 3,
            "cached_tokens": 1,
            "completion_tokens": 2,
        }
        ray.get([meter.record.remote(usage) for _ in range(n)])

    meter = get_usage_meter(name, namespace="tiered-test")  # the driver owns it
    ray.get([ingress_replica.remote(name, "acme", 5), ingress_replica.remote(name, "acme", 7)])
    (row,) = ray.get(meter.snapshot.remote())
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (12, 36, 24)
    bad = {
        "tenant": "acme",
        "model": "m",
        "tier": "gold",
        "spill": False,
        "prompt_tokens": 1,
        "cached_tokens": 0,
        "completion_tokens": 1,
    }
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(meter.record.remote(bad))
    assert isinstance(err.value.cause, ValueError)
    assert len(ray.get(meter.snapshot.remote())) == 1
    ray.kill(meter)
