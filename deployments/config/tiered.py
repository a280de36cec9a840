"""The one Tiered YAML: models, tenants, admin keys, dispatcher and ingress settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.config.files import read_yaml
from deployments.config.fine_tuning import FilesSpec, FineTuningSpec
from deployments.config.models import (
    ConfigError,
    ModelSpec,
    validate_adapters,
    validate_against_checkpoint,
    validate_against_cluster,
)
from deployments.config.plan import deployment_plan
from deployments.config.prices import PricesSpec
from deployments.config.tenants import (
    DispatchSpec,
    IngressSpec,
    KeyHash,
    Tenants,
    TenantSpec,
    check_unique_keys,
    tenant_key_places,
)
from deployments.state.config import StateSpec

# Package data, so a wheel install (the image) has it too.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "serve-default.yaml"


class NodeTypeSpec(BaseModel):
    """A node type of the cluster (a `ray up` node type, a KubeRay worker group): what one
    node provides, custom node-type resources included, and how many may run."""

    model_config = ConfigDict(extra="forbid")

    resources: dict[str, float] = Field(min_length=1)
    min_workers: int = Field(0, ge=0)
    max_workers: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> NodeTypeSpec:
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"min_workers={self.min_workers} exceeds max_workers={self.max_workers}"
            )
        return self


class TieredConfig(BaseModel):
    """The whole YAML. Key lists are typed KeyHash and tenants go through check_tenants so
    that a malformed or doubly listed hash fails at load rather than becoming a key."""

    # No input value in any error: a plaintext key or a state.url password must not leak.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    models: list[ModelSpec] = Field(min_length=1)
    tenants: Tenants = []
    admin_key_hashes: list[KeyHash] = Field(
        [], description="Keys for GET /admin/usage; no tenant may share one."
    )
    revoked_key_hashes: list[KeyHash] = Field(
        [], description="Keys that authenticate no one, tenant or admin, wherever listed."
    )
    dispatch: DispatchSpec = DispatchSpec()
    ingress: IngressSpec = IngressSpec()
    node_types: dict[str, NodeTypeSpec] = Field(
        {}, description="The cluster's node types; when given, every replica must fit one."
    )
    state: StateSpec = Field(
        default_factory=StateSpec,
        description="The database (usage ledger); $TIERED_STATE_URL overrides state.url.",
    )
    prices: PricesSpec = PricesSpec()
    files: FilesSpec = Field(
        default_factory=FilesSpec,
        description="Uploaded files (the Files API): fsspec root and size limit.",
    )
    fine_tuning: FineTuningSpec = FineTuningSpec()

    @model_validator(mode="after")
    def _cross_references(self) -> TieredConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: duplicate names in {names}")
        check_unique_keys(self.key_places())
        for i, tenant in enumerate(self.tenants):
            for model in tenant.models:
                if model not in names:
                    raise ValueError(f"tenants[{i}].models: unknown model {model!r}")
            if tenant.dedicated and tenant.dedicated.model not in names:
                raise ValueError(
                    f"tenants[{i}].dedicated.model: unknown model {tenant.dedicated.model!r}"
                )
        self.prices.check_references(names, [t.name for t in self.tenants if t.dedicated])
        self._check_adapters(names)
        return self

    def _check_adapters(self, names: list[str]) -> None:
        """Adapter names are model ids: unique, never a base model's; their tenants
        exist and may use the base."""
        seen: dict[str, str] = {}
        for i, m in enumerate(self.models):
            if m.adapters and m.engine.max_loras == 0:
                raise ValueError(
                    f"models[{i}].engine.max_loras: 0 turns LoRA off, but the model lists "
                    f"{len(m.adapters)} adapter(s)"
                )
            for j, adapter in enumerate(m.adapters):
                where = f"models[{i}].adapters[{j}]"
                if adapter.name in names:
                    raise ValueError(
                        f"{where}.name: {adapter.name!r} is the name of a base model"
                    )
                if adapter.name in seen:
                    raise ValueError(
                        f"{where}.name: {adapter.name!r} is already the name of "
                        f"{seen[adapter.name]}"
                    )
                seen[adapter.name] = where
                for k, name in enumerate(adapter.tenants):
                    tenant = self.tenant(name)
                    if tenant is None:
                        raise ValueError(f"{where}.tenants[{k}]: unknown tenant {name!r}")
                    if not tenant.may_use(m.name):
                        raise ValueError(
                            f"{where}.tenants[{k}]: tenant {name!r} may not use the base "
                            f"model {m.name!r}"
                        )

    def key_places(self) -> list[tuple[str, str]]:
        """(where, hash) for every tenant and admin key in the YAML (revoked ones aside)."""
        admin = [(f"admin_key_hashes[{i}]", h) for i, h in enumerate(self.admin_key_hashes)]
        return tenant_key_places(self.tenants) + admin

    def validate_node_types(self) -> None:
        """Each replica must fit one node type (GPUs for its tp_size, its node-type
        resource), so a bad pairing fails at load rather than pending forever."""
        if not self.node_types:
            return
        nodes = [dict(n.resources) for n in self.node_types.values()]
        for plan in deployment_plan(self):
            validate_against_cluster(plan.model, nodes, plan.replica, plan.where)

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    def tenant(self, name: str) -> TenantSpec | None:
        return next((t for t in self.tenants if t.name == name), None)

    def validate_checkpoints(self) -> None:
        """Where the weights are on this machine (`tiered serve`): every model's
        checkpoint, its local adapters, and the shapes of every deployment the plan makes.
        A URI checkpoint is checked by each replica once fetched; so is everything here
        when the app is deployed to a cluster, whose head has no weights."""
        for i, m in enumerate(self.models):
            if "://" not in m.path:
                validate_against_checkpoint(m, m.shared_pool, f"models[{i}].shared_pool")
            validate_adapters(m, f"models[{i}]")
        for plan in deployment_plan(self):
            if plan.tier == "dedicated" and "://" not in plan.model.path:
                validate_against_checkpoint(plan.model, plan.replica, plan.where)


def load_config(path: str | Path | None = None, *, checkpoints: bool = True) -> TieredConfig:
    """Parse and validate a Tiered YAML; errors name the field.

    `checkpoints=False` skips the checks that read each model's config.json, for tools
    (like `tiered config render`) that run where the weights are not.
    """
    path = Path(path) if path else DEFAULT_CONFIG
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'models' (and 'tenants', ...)")
    return parse_config(data, str(path), checkpoints=checkpoints)


def _field(loc: tuple[int | str, ...]) -> str:
    """('tenants', 1, 'api_key_hashes', 0) -> 'tenants[1].api_key_hashes[0]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def validation_message(exc: ValidationError) -> str:
    """Pydantic's errors on one line, each naming its field; input values are left out,
    since a plaintext key pasted where a hash belongs must not reach the logs."""
    parts = []
    for error in exc.errors():
        where = _field(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(message if not where or message.startswith(where) else f"{where}: {message}")
    return "; ".join(parts)


def parse_config(data: dict, source: str = "config", *, checkpoints: bool = True) -> TieredConfig:
    try:
        config = TieredConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc)}") from None
    config.validate_node_types()
    if checkpoints:
        config.validate_checkpoints()
    return config
