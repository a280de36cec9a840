"""The figures a scenario asks for (`analysis:`), what each is computed on, and goals.

Each kind is a pydantic model; `bench.analysis` computes them on a finished run.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GOAL_PATTERN = r"^\s*(<=|>=|<|>|==)\s*(-?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*$"


class ScenarioError(ValueError):
    """A scenario that cannot run; the message names the file and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Selection(Strict):
    """Which requests a figure is computed on. `skip_s` drops those sent in the first
    seconds of the phase (a warm-up, or the time a flood takes to build up)."""

    tenant: str | None = None
    phase: str | None = None
    turn: int | None = Field(None, ge=1)
    skip_s: float = Field(0.0, ge=0)


Goal = Annotated[str, Field(pattern=GOAL_PATTERN)]
METRICS = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "std", "p50", "p90", "p95", "p99", "min", "max")
SCALARS = (
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "goodput",
    "completed",
    "failed",
    "cached_tokens",
    "prompt_tokens",
    "mean_prompt_tokens",
    "mean_cached_tokens",
)


def check_metric(name: str) -> str:
    """`ttft.p99`, `e2el.median`, ... or a scalar such as `request_throughput`."""
    if name in SCALARS:
        return name
    base, _, stat = name.partition(".")
    if base in METRICS and stat in STATS:
        return name
    raise ValueError(
        f"unknown metric {name!r}: use <{'|'.join(METRICS)}>.<{'|'.join(STATS)}> "
        f"or one of {', '.join(SCALARS)}"
    )


class RatioAnalysis(Strict):
    """metric(numerator) / metric(denominator), and their difference."""

    kind: Literal["ratio"]
    name: str
    metric: str
    numerator: Selection
    denominator: Selection
    goal: Goal | None = None

    @model_validator(mode="after")
    def _metric(self) -> RatioAnalysis:
        check_metric(self.metric)
        return self


class CountAnalysis(Strict):
    """Requests in the selection that ended with `status` (0: transport error), or with
    any error when status is omitted."""

    kind: Literal["count"]
    name: str
    select: Selection = Selection()
    status: int | None = None
    goal: Goal | None = None


class JainAnalysis(Strict):
    """Jain's index on weight-normalised served tokens, over the time in the phase when
    every listed tenant had a request waiting for its first token (all backlogged)."""

    kind: Literal["jain"]
    name: str
    tenants: list[str] = Field(min_length=2)
    phase: str
    skip_s: float = Field(0.0, ge=0)
    goal: Goal | None = None


class SweepAnalysis(Strict):
    """One row per phase: offered rate against throughput, TTFT and TPOT."""

    kind: Literal["sweep"]
    name: str
    tenant: str | None = None
    skip_s: float = Field(0.0, ge=0)


class AutoscaleAnalysis(Strict):
    """A load step on a pool: time to the first token from a replica not seen before the
    step (the `x-tiered-replica` header), the replica count over time when the target is
    watched, and the TTFT before, during and after the scale-up."""

    kind: Literal["autoscale"]
    name: str
    tenant: str
    baseline_phase: str
    step_phase: str
    deployment: str | None = Field(None, description="Watched deployment, local targets.")
    recovery_factor: float = Field(1.5, gt=1, description="TTFT recovered within this factor.")
    goal: Goal | None = Field(None, description="On the step-to-new-replica-token time (s).")


class ConversationAnalysis(Strict):
    """One figure of a tenant's multi-turn conversations, with a per-turn table:

    - cached_share: cached / input tokens;
    - reused_share: cached tokens / the tokens already in the previous turn's prompt and
      output (the history a prefix cache could have kept);
    - affinity: continuations served by the previous turn's replica (`x-tiered-replica`),
      with each replica's share of requests and its peak in flight;
    - cost: billed cost per completed conversation, at the prices of the scenario's Tiered
      config (`prices:`, per model and served tier; TokenPrice.cost).

    Shares are over turns >= `from_turn`: the worst turn's (`over: worst_turn`) or all of
    them pooled (`over: pooled`)."""

    kind: Literal["conversation"]
    name: str
    tenant: str
    figure: Literal["cached_share", "reused_share", "affinity", "cost"]
    phase: str | None = None
    from_turn: int = Field(2, ge=1)
    over: Literal["worst_turn", "pooled"] = "worst_turn"
    goal: Goal | None = None


Analysis = Annotated[
    RatioAnalysis
    | CountAnalysis
    | JainAnalysis
    | SweepAnalysis
    | AutoscaleAnalysis
    | ConversationAnalysis,
    Field(discriminator="kind"),
]


def parse_goal(goal: str) -> tuple[str, float]:
    match = re.match(GOAL_PATTERN, goal)
    if match is None:
        raise ScenarioError(f"goal {goal!r}: expected e.g. '<= 1.25'")
    return match.group(1), float(match.group(2))


def goal_met(goal: str | None, value: float | None) -> bool | None:
    """None when there is no goal or no value to judge."""
    if goal is None or value is None or value != value:  # NaN
        return None
    op, bound = parse_goal(goal)
    return {
        "<=": value <= bound,
        ">=": value >= bound,
        "<": value < bound,
        ">": value > bound,
        "==": value == bound,
    }[op]
