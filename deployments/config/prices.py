"""`prices:` in the Tiered config: what a token costs per model and tier, and what each
dedicated tenant commits to per month. The usage report turns ledger sums into money
with it; nothing on the request path reads it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.config.plan import BilledTier


class TokenPrice(BaseModel):
    """Prices per 1M tokens of one model on one tier. Cached input defaults to the input
    price (no discount). Spilled requests are served, and billed, as tier "shared". Tier
    "training" prices the tokens fine-tuning jobs train on that base model (input_per_1m;
    they have no output)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    tier: BilledTier
    input_per_1m: float = Field(ge=0)
    cached_input_per_1m: float | None = Field(None, ge=0)
    output_per_1m: float = Field(ge=0)

    @property
    def cached_price(self) -> float:
        return self.input_per_1m if self.cached_input_per_1m is None else self.cached_input_per_1m

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        uncached = prompt_tokens - cached_tokens
        return (
            uncached * self.input_per_1m
            + cached_tokens * self.cached_price
            + completion_tokens * self.output_per_1m
        ) / 1e6


class PricesSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    currency: str = Field("USD", min_length=1, max_length=8)
    tokens: list[TokenPrice] = []
    committed_monthly: dict[str, float] = Field(
        {}, description="Dedicated tenant -> the amount it commits to per month."
    )

    @model_validator(mode="after")
    def _unique(self) -> PricesSpec:
        seen: set[tuple[str, str]] = set()
        for i, price in enumerate(self.tokens):
            key = (price.model, price.tier)
            if key in seen:
                raise ValueError(
                    f"tokens[{i}]: a second price for model {price.model!r} tier {price.tier!r}"
                )
            seen.add(key)
        for tenant, amount in self.committed_monthly.items():
            if amount < 0:
                raise ValueError(f"committed_monthly.{tenant}: must be >= 0")
        return self

    def price(self, model: str, tier: str) -> TokenPrice | None:
        return next((p for p in self.tokens if p.model == model and p.tier == tier), None)

    def check_references(self, models: list[str], dedicated_tenants: list[str]) -> None:
        """Every priced model exists; every commitment is a dedicated tenant's."""
        for i, price in enumerate(self.tokens):
            if price.model not in models:
                raise ValueError(f"prices.tokens[{i}].model: unknown model {price.model!r}")
        for tenant in self.committed_monthly:
            if tenant not in dedicated_tenants:
                raise ValueError(
                    f"prices.committed_monthly.{tenant}: not a dedicated tenant"
                )
