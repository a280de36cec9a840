"""Benchmark scenarios: one YAML file says who sends what, when, and what to conclude.

A scenario names its tenants (key, request shape, optional multi-turn conversations), its
phases (consecutive time windows, each with a load per tenant: an open-loop arrival process
or a closed-loop concurrency), and the figures to derive (`analysis`). Validation happens
at load so a typo fails before a cluster starts, with the field named.

    name: p4-isolation
    model: tiny-llama
    tenants:
      acme: {key: tk-demo-acme-dedicated, prompt_tokens: 64, output_tokens: 16}
    phases:
      - {name: unloaded, duration_s: 20, load: {acme: {rate: 2, arrival: poisson}}}
    analysis:
      - {kind: ratio, name: p99 TTFT, metric: ttft.p99,
         numerator: {tenant: acme, phase: flood}, denominator: {tenant: acme, phase: unloaded},
         goal: "<= 1.25"}
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from bench.analysis_spec import (
    Analysis,
    AutoscaleAnalysis,
    ConversationAnalysis,
    CountAnalysis,
    JainAnalysis,
    RatioAnalysis,
    ScenarioError,
    Selection,
    Strict,
    SweepAnalysis,
)
from deployments.config.files import yaml_problem
from deployments.proxy_mode import ProxyMode

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"


class LengthDist(Strict):
    """A token count per request: fixed, uniform [min, max], normal or lognormal
    (mean/std of the count itself), clipped to [min, max] when those are given."""

    dist: Literal["fixed", "uniform", "normal", "lognormal"] = "fixed"
    value: int | None = Field(None, ge=1)
    min: int | None = Field(None, ge=1)
    max: int | None = Field(None, ge=1)
    mean: float | None = Field(None, gt=0)
    std: float | None = Field(None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"dist": "fixed", "value": data} if isinstance(data, int) else data

    @model_validator(mode="after")
    def _fields_for_dist(self) -> LengthDist:
        need = {
            "fixed": ("value",),
            "uniform": ("min", "max"),
            "normal": ("mean", "std"),
            "lognormal": ("mean", "std"),
        }[self.dist]
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"dist {self.dist!r} needs {', '.join(missing)}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min={self.min} exceeds max={self.max}")
        return self

    def sample(self, rng: random.Random) -> int:
        if self.dist == "fixed":
            return int(self.value)  # type: ignore[arg-type]
        if self.dist == "uniform":
            return rng.randint(self.min, self.max)  # type: ignore[arg-type]
        mean, std = float(self.mean), float(self.std)  # type: ignore[arg-type]
        if self.dist == "normal":
            x = rng.gauss(mean, std)
        else:  # lognormal with the given mean and std of the count
            var = math.log(1 + (std / mean) ** 2)
            x = rng.lognormvariate(math.log(mean) - var / 2, math.sqrt(var))
        lo, hi = self.min or 1, self.max or 1 << 30
        return max(lo, min(hi, round(x)))


class Conversation(Strict):
    """Multi-turn chat. With `api: chat` each turn resends the history (user and assistant
    messages) plus a new user message, which is what a prefix cache is for; with
    `api: responses` each turn sends only the new user message to /v1/responses, with
    `previous_response_id` naming the previous turn (the server holds the history)."""

    turns: int = Field(2, ge=1)
    turn_tokens: LengthDist = LengthDist(value=64)
    think_time_s: float = Field(0.0, ge=0)


class Load(Strict):
    """One tenant's load in one phase. Open loop: `rate` requests/s with `arrival`
    constant, poisson or gamma (`burstiness` < 1 is burstier, 1 is Poisson), or
    `burst_size` requests at once every `burst_every_s`. Closed loop: `concurrency` clients
    back to back, each waiting `think_time_s` between requests. A conversation counts as
    one arrival."""

    arrival: Literal["constant", "poisson", "gamma", "burst"] = "poisson"
    rate: float | None = Field(None, gt=0)
    burstiness: float = Field(1.0, gt=0)
    burst_size: int | None = Field(None, ge=1)
    burst_every_s: float | None = Field(None, gt=0)
    concurrency: int | None = Field(None, ge=1)
    think_time_s: float = Field(0.0, ge=0)
    max_requests: int | None = Field(None, ge=1, description="Stop after this many arrivals.")

    @model_validator(mode="after")
    def _one_mode(self) -> Load:
        if self.concurrency is not None:
            if self.rate is not None or self.burst_size is not None:
                raise ValueError("give either concurrency (closed loop) or an arrival rate")
            return self
        if self.arrival == "burst":
            if self.burst_size is None or self.burst_every_s is None:
                raise ValueError("arrival 'burst' needs burst_size and burst_every_s")
        elif self.rate is None:
            raise ValueError(f"arrival {self.arrival!r} needs rate (requests/s) or concurrency")
        return self

    @property
    def offered_rate(self) -> float | None:
        """Requests per second this load offers (None for closed loop)."""
        if self.concurrency is not None:
            return None
        if self.arrival == "burst":
            return self.burst_size / self.burst_every_s  # type: ignore[operator]
        return self.rate


class TenantLoad(Strict):
    """A tenant: who it is (key), what it sends, and its default load."""

    key: str | None = Field(None, min_length=1)
    key_env: str | None = Field(None, min_length=1, description="Read the key from this variable.")
    endpoint: str = Field("main", description="Which endpoint of the target (main, echo, ...).")
    model: str | None = None
    api: Literal["chat", "completions", "responses"] = "chat"
    weight: float = Field(1.0, gt=0, description="The tenant's weight, for Jain's index.")
    prompt_tokens: LengthDist = LengthDist(value=128)
    output_tokens: LengthDist = LengthDist(value=64)
    ignore_eos: bool = Field(True, description="vLLM's extension (chat, completions); "
                             "the Responses API has none and stops at end of sequence.")
    temperature: float | None = Field(None, ge=0)
    service_tier: str | None = None
    conversation: Conversation | None = None
    load: Load | None = Field(None, description="Used in phases that do not name the tenant.")

    @model_validator(mode="after")
    def _one_key(self) -> TenantLoad:
        if (self.key is None) == (self.key_env is None):
            raise ValueError("give exactly one of key and key_env")
        if self.conversation is not None and self.api == "completions":
            raise ValueError("conversations need api: chat or api: responses")
        if self.api == "responses" and self.ignore_eos and "ignore_eos" in self.model_fields_set:
            raise ValueError("api: responses has no ignore_eos (give ignore_eos: false)")
        return self

    def first_input(self, text: str) -> str | list[dict[str, str]]:
        """A first request's prompt in this tenant's API: messages, or plain text."""
        return text if self.api == "completions" else [{"role": "user", "content": text}]

    def api_key(self) -> str:
        if self.key is not None:
            return self.key
        value = os.environ.get(self.key_env or "")
        if not value:
            raise ScenarioError(f"environment variable {self.key_env} (the API key) is not set")
        return value


class Phase(Strict):
    """A time window; phases run one after another. A tenant not named in `load` runs its
    default load, or nothing when it has none (`idle: [tenant]` silences a default)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    duration_s: float = Field(gt=0)
    load: dict[str, Load] = Field(default_factory=dict)
    idle: list[str] = Field(default_factory=list)


class TargetSpec(Strict):
    """The local cluster `tiered bench run` starts when no --url is given."""

    tiered_config: str | None = Field(None, description="Tiered YAML, relative to the scenario.")
    unlimited_tenants: bool = Field(False, description="Drop RPM/TPM/concurrency limits.")
    echo: bool = Field(False, description="Also deploy the plain Serve echo app (P3).")
    watch: list[str] = Field([], description="Deployments whose replica counts are sampled.")
    num_cpus: int = Field(8, ge=1, description="Logical CPUs of the local Ray.")
    proxy: ProxyMode | None = Field(
        None, description="HTTP front of the local cluster (--proxy wins; default haproxy)."
    )


class Scenario(Strict):
    name: str = Field(min_length=1)
    description: str = ""
    model: str = Field(min_length=1)
    seed: int = 0
    target: TargetSpec = TargetSpec()
    tokenizer: str | None = Field(
        None, description="tokenizer.json dir or default:tiny, to size prompts exactly."
    )
    max_concurrency: int | None = Field(None, ge=1, description="Cap on requests in flight.")
    request_timeout_s: float = Field(120.0, gt=0)
    drain_s: float = Field(60.0, ge=0, description="Wait for in-flight requests at the end.")
    warmup_requests: int = Field(2, ge=0, description="Per tenant, before the run, not counted.")
    goodput: dict[Literal["ttft", "tpot", "e2el"], float] = Field(
        {}, description="SLOs in ms; --goodput overrides."
    )
    tenants: dict[str, TenantLoad] = Field(min_length=1)
    phases: list[Phase] = Field(min_length=1)
    analysis: list[Analysis] = Field(default_factory=list)
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phases: duplicate names in {names}")
        for i, phase in enumerate(self.phases):
            for tenant in [*phase.load, *phase.idle]:
                if tenant not in self.tenants:
                    raise ValueError(f"phases[{i}] ({phase.name}): unknown tenant {tenant!r}")
        if not any(self.phase_loads(p) for p in self.phases):
            raise ValueError("no phase has any load: give a phase a load or a tenant a load")
        for i, a in enumerate(self.analysis):
            where = f"analysis[{i}] ({a.name})"
            for sel in _selections(a):
                if sel.tenant is not None and sel.tenant not in self.tenants:
                    raise ValueError(f"{where}: unknown tenant {sel.tenant!r}")
                if sel.phase is not None and sel.phase not in names:
                    raise ValueError(f"{where}: unknown phase {sel.phase!r}")
            for tenant in getattr(a, "tenants", []):
                if tenant not in self.tenants:
                    raise ValueError(f"{where}: unknown tenant {tenant!r}")
        return self

    def phase_loads(self, phase: Phase) -> dict[str, Load]:
        """Each active tenant's load in this phase."""
        loads = {n: t.load for n, t in self.tenants.items() if t.load and n not in phase.idle}
        return {**loads, **phase.load}  # type: ignore[dict-item]

    def phase_windows(self) -> list[tuple[str, float, float]]:
        """(name, start_s, end_s) of each phase, from the start of the run."""
        out, t = [], 0.0
        for phase in self.phases:
            out.append((phase.name, t, t + phase.duration_s))
            t += phase.duration_s
        return out

    @property
    def duration_s(self) -> float:
        return sum(p.duration_s for p in self.phases)


def _selections(a: Any) -> list[Selection]:
    if isinstance(a, RatioAnalysis):
        return [a.numerator, a.denominator]
    if isinstance(a, CountAnalysis):
        return [a.select]
    if isinstance(a, ConversationAnalysis):
        return [Selection(tenant=a.tenant, phase=a.phase)]
    if isinstance(a, JainAnalysis | SweepAnalysis):
        return [Selection(tenant=getattr(a, "tenant", None), phase=getattr(a, "phase", None))]
    if isinstance(a, AutoscaleAnalysis):
        return [
            Selection(tenant=a.tenant, phase=a.baseline_phase),
            Selection(tenant=a.tenant, phase=a.step_phase),
        ]
    return []


def shipped() -> dict[str, Path]:
    """The scenarios that ship in bench/scenarios, by name (file stem)."""
    return {p.stem: p for p in sorted(SCENARIO_DIR.glob("*.yaml")) if not p.stem.startswith("_")}


def resolve(spec: str | Path) -> Path:
    """A path, or the name of a shipped scenario (`p4_isolation`)."""
    path = Path(spec)
    if path.is_file():
        return path
    if str(spec) in shipped():
        return shipped()[str(spec)]
    names = ", ".join(shipped())
    raise ScenarioError(f"no scenario file {str(spec)!r}, and no shipped scenario of that name "
                        f"(shipped: {names})")


def load_scenario(spec: str | Path) -> Scenario:
    """Parse and validate a scenario YAML; errors name the file and the field."""
    path = resolve(spec)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:  # one line: the file, line and column, the problem
        raise ScenarioError(yaml_problem(str(path), exc)) from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: expected a mapping at the top level")
    return parse_scenario(data, path)


def parse_scenario(data: dict, source: Path | None = None) -> Scenario:
    where = str(source) if source else "scenario"
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        lines = [f"{where}: {exc.error_count()} error(s)"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc or '(top level)'}: {err['msg']}")
        raise ScenarioError("\n".join(lines)) from None
    scenario.source = source
    return scenario
