"""Llama-family architecture settings read from an HF `config.json`.

Llama, Mistral and Qwen2 share one shape (RMSNorm, RoPE, GQA, SwiGLU); only a few keys
differ. Anything outside that shape is refused with a clear error instead of running wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import UnsupportedModelError

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}
SUPPORTED_ACTIVATIONS = {"silu"}
# Keys that change the maths; if present with a non-default value we refuse the checkpoint.
_UNSUPPORTED_IF_TRUTHY = (
    "sliding_window_pattern",
    "attn_logit_softcapping",
    "final_logit_softcapping",
)


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling; `rope_type` "default" means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise UnsupportedModelError(f"no config.json in {path}")
        return cls.from_dict(json.loads(config_path.read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; "
                f"supported: {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        act = raw.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")
        for key in _UNSUPPORTED_IF_TRUTHY:
            if raw.get(key):
                raise UnsupportedModelError(f"config key {key!r} is not supported")
        if model_type == "mistral" and raw.get("sliding_window") is not None:
            max_pos = raw.get("max_position_embeddings", 0)
            if raw["sliding_window"] < max_pos:
                raise UnsupportedModelError(
                    f"sliding_window={raw['sliding_window']} is not supported"
                )
        if model_type == "qwen2" and raw.get("use_sliding_window"):
            raise UnsupportedModelError("qwen2 use_sliding_window=true is not supported")

        heads = _required_int(raw, "num_attention_heads")
        hidden = _required_int(raw, "hidden_size")
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        head_dim = int(raw.get("head_dim") or hidden // heads)
        # transformers 5 writes `rope_parameters` (theta inside); older: rope_theta/rope_scaling.
        rope = raw.get("rope_parameters") or {}
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=_required_int(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_required_int(raw, "intermediate_size"),
            num_hidden_layers=_required_int(raw, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling(rope or raw.get("rope_scaling")),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # qwen2 always has q/k/v biases; llama and mistral declare it with attention_bias.
            attention_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def check_tp(self, tp_size: int) -> None:
        """Refuse a TP degree that cannot split the heads evenly."""
        for name, value in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("intermediate_size", self.intermediate_size),
        ):
            if value % tp_size:
                raise UnsupportedModelError(f"tp_size={tp_size} does not divide {name}={value}")


def _required_int(raw: dict[str, Any], key: str) -> int:
    if key not in raw:
        raise UnsupportedModelError(f"config.json lacks required key {key!r}")
    return int(raw[key])


def _rope_scaling(raw: dict[str, Any] | None) -> RopeScaling:
    if not raw:
        return RopeScaling()
    rope_type = raw.get("rope_type") or raw.get("type") or "default"
    if rope_type == "default":
        return RopeScaling()
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"rope_scaling type {rope_type!r} is not supported (only 'llama3')"
        )
    return RopeScaling(
        rope_type="llama3",
        factor=float(raw["factor"]),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
    )
