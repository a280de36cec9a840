"""Read a PEFT LoRA adapter directory: check it against the base model, load this rank's slices.

Everything that can be wrong with an adapter is found here, before a single weight reaches a
slot, and reported as a LoRALoadError whose `param` names the field. Rank 0 runs this first;
the followers run the same code on input rank 0 has already accepted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open

from models.config import ModelConfig
from models.errors import LoRALoadError
from models.tp import ParallelContext
from models.weights import TensorSlice

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROW_PARALLEL = frozenset({"o_proj", "down_proj"})  # A is split by columns, B is whole
_PARENT = {t: "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn" for t in TARGETS}
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.weight")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# PEFT options that change the maths in ways this engine does not implement.
_UNSUPPORTED_IF_SET = (
    "use_dora",
    "modules_to_save",
    "lora_bias",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
)


class AdapterConfig(BaseModel):
    """The adapter_config.json fields the engine uses; others are ignored."""

    model_config = ConfigDict(extra="ignore")

    peft_type: str = "LORA"
    r: int = Field(ge=1)
    lora_alpha: float
    target_modules: list[str] | str
    use_rslora: bool = False
    bias: str = "none"
    base_model_name_or_path: str | None = None

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass(frozen=True)
class AdapterRules:
    """What an adapter must fit: the base model, the rank limit, the base model's names."""

    model: ModelConfig
    max_rank: int
    base_names: frozenset[str]


@dataclass
class AdapterWeights:
    """One rank's slices of one adapter, in CPU memory: (layer, target) -> (A, B)."""

    rank: int
    scaling: float
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(t for _, t in self.tensors)


def base_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target projection in the full base model."""
    h, q = config.hidden_size, config.num_attention_heads * config.head_dim
    kv, inter = config.num_key_value_heads * config.head_dim, config.intermediate_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def rank_spans(config: ModelConfig, tp: ParallelContext) -> dict[str, tuple[int, int]]:
    """This rank's span of each target's sharded dimension (B's rows, or A's columns)."""
    d = config.head_dim
    q0, q1 = tp.shard(config.num_attention_heads, "num_attention_heads")
    k0, k1 = tp.shard(config.num_key_value_heads, "num_key_value_heads")
    mlp = tp.shard(config.intermediate_size, "intermediate_size")
    q, kv = (q0 * d, q1 * d), (k0 * d, k1 * d)
    return {
        "q_proj": q,
        "k_proj": kv,
        "v_proj": kv,
        "o_proj": q,
        "gate_proj": mlp,
        "up_proj": mlp,
        "down_proj": mlp,
    }


def read_adapter(directory: Path, rules: AdapterRules, tp: ParallelContext) -> AdapterWeights:
    """Validate the adapter in `directory` and read this rank's slices of it."""
    config = parse_config(directory / CONFIG_FILE, rules)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise LoRALoadError(f"the adapter directory has no {WEIGHTS_FILE} (only safetensors)")
    with _safetensors_errors(), safe_open(path, framework="pt") as handle:
        slices = {name: handle.get_slice(name) for name in handle.keys()}  # noqa: SIM118
        pairs = _pair_tensors(slices, rules.model)
        _check_shapes(pairs, config.r, rules.model)
        spans = rank_spans(rules.model, tp)
        tensors = {
            (layer, target): _rank_slices(a, b, target, spans[target])
            for (layer, target), (a, b) in pairs.items()
        }
    return AdapterWeights(config.r, config.scaling, tensors)


def parse_config(path: Path, rules: AdapterRules) -> AdapterConfig:
    """Parse adapter_config.json and refuse what the engine cannot serve, naming the field."""
    if not path.is_file():
        raise LoRALoadError(f"no {CONFIG_FILE} at the adapter path")
    try:
        raw: Any = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoRALoadError(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise LoRALoadError(f"{CONFIG_FILE} is not a JSON object")
    for field in _UNSUPPORTED_IF_SET:
        if raw.get(field):
            raise LoRALoadError(f"adapters with {field} set are not supported", field)
    try:
        config = AdapterConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "lora_path"
        raise LoRALoadError(f"{CONFIG_FILE} field {field}: {first['msg']}", field) from exc
    if config.peft_type.upper() != "LORA":
        raise LoRALoadError(f"peft_type {config.peft_type!r} is not a LoRA adapter", "peft_type")
    if config.bias != "none":
        raise LoRALoadError(f"bias={config.bias!r} adapters are not supported", "bias")
    if config.r > rules.max_rank:
        raise LoRALoadError(
            f"adapter rank r={config.r} exceeds max_lora_rank={rules.max_rank}", "r"
        )
    _check_target_names(config.target_modules)
    _check_base(config.base_model_name_or_path, rules.base_names)
    return config


def _check_target_names(targets: list[str] | str) -> None:
    """A list names modules (PEFT matches by suffix); a string is a regex over full names,
    which the tensor names themselves are checked against later."""
    if isinstance(targets, str):
        return
    lacking = [t for t in targets if t.rsplit(".", 1)[-1] not in TARGETS]
    if lacking:
        raise LoRALoadError(
            f"target module {lacking[0]!r} is not one the engine applies adapters to "
            f"(supported: {', '.join(TARGETS)})",
            "target_modules",
        )


def _check_base(declared: str | None, base_names: frozenset[str]) -> None:
    if not declared or not base_names:
        return
    if declared in base_names or PurePosixPath(declared.rstrip("/")).name in base_names:
        return
    names = ", ".join(sorted(base_names))
    raise LoRALoadError(
        f"the adapter was trained on {declared!r}, not on this model ({names})",
        "base_model_name_or_path",
    )


def _pair_tensors(
    slices: dict[str, TensorSlice], model: ModelConfig
) -> dict[tuple[int, str], tuple[TensorSlice, TensorSlice]]:
    found: dict[tuple[int, str], dict[str, TensorSlice]] = {}
    for name, tensor_slice in slices.items():
        match = _KEY.fullmatch(name)
        if match is None:
            raise LoRALoadError(
                f"adapter tensor {name!r} is not a LoRA weight of a decoder-layer projection",
                "target_modules",
            )
        layer, parent, target, which = int(match[1]), match[2], match[3], match[4]
        if _PARENT.get(target) != parent or layer >= model.num_hidden_layers:
            raise LoRALoadError(
                f"adapter tensor {name!r} targets a module the model lacks", "target_modules"
            )
        if tensor_slice.get_dtype() not in _FLOAT_DTYPES:
            raise LoRALoadError(f"adapter tensor {name!r} is not floating point")
        found.setdefault((layer, target), {})[which] = tensor_slice
    if not found:
        raise LoRALoadError(f"{WEIGHTS_FILE} holds no LoRA weights")
    pairs = {}
    for (layer, target), ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise LoRALoadError(f"layer {layer} {target} has lora_A or lora_B but not both")
        pairs[layer, target] = (ab["A"], ab["B"])
    return pairs


def _check_shapes(
    pairs: dict[tuple[int, str], tuple[TensorSlice, TensorSlice]], r: int, model: ModelConfig
) -> None:
    shapes = base_shapes(model)
    for (layer, target), (a, b) in pairs.items():
        fan_in, fan_out = shapes[target]
        got = (tuple(a.get_shape()), tuple(b.get_shape()))
        if got != ((r, fan_in), (fan_out, r)):
            raise LoRALoadError(
                f"layer {layer} {target}: lora_A/lora_B shapes {got[0]}/{got[1]} do not match "
                f"the base model's ({r}, {fan_in})/({fan_out}, {r})"
            )


def _rank_slices(
    a: TensorSlice, b: TensorSlice, target: str, span: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-parallel layers split A's input columns; column-parallel ones split B's rows."""
    if target in ROW_PARALLEL:
        return a[:, span[0] : span[1]], b[:]
    return a[:], b[span[0] : span[1]]


@contextmanager
def _safetensors_errors() -> Iterator[None]:
    """A corrupt or truncated file fails in the safetensors reader, with its own error."""
    try:
        yield
    except (SafetensorError, OSError) as exc:
        raise LoRALoadError(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from exc
