"""Load an HF safetensors checkpoint, each rank reading only its own slices.

`safe_open(...).get_slice` maps the file and copies just the rows or columns this rank
owns, so a TP rank never holds the full weights, even transiently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from models.config import ModelConfig
from models.errors import UnsupportedModelError
from models.llama import LlamaModel, rope_inv_freq
from models.tp import ParallelContext


class TensorSlice(Protocol):
    """What `safe_open(...).get_slice` returns: indexing it reads only those rows/columns."""

    def __getitem__(self, index: slice | tuple[slice, ...]) -> torch.Tensor: ...

    def get_shape(self) -> list[int]: ...

    def get_dtype(self) -> str: ...


class CheckpointReader:
    """Name → file lookup over single-file or sharded (index.json) safetensors."""

    def __init__(self, path: Path, stack: ExitStack) -> None:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").is_file():
            weight_map = {}
        else:
            raise UnsupportedModelError(f"no model.safetensors or index in {path}")
        files = sorted(set(weight_map.values())) or ["model.safetensors"]
        handles = {f: stack.enter_context(safe_open(path / f, framework="pt")) for f in files}
        if not weight_map:
            weight_map = {k: "model.safetensors" for k in handles["model.safetensors"].keys()}  # noqa: SIM118
        self._handles = {name: handles[f] for name, f in weight_map.items()}

    def has(self, name: str) -> bool:
        return name in self._handles

    def slice(self, name: str) -> TensorSlice:
        if name not in self._handles:
            raise UnsupportedModelError(f"checkpoint lacks tensor {name!r}")
        return self._handles[name].get_slice(name)


def load_model(
    path: str | Path, config: ModelConfig, tp: ParallelContext, dtype: torch.dtype
) -> LlamaModel:
    """Build the model for this rank and fill it from the checkpoint."""
    with torch.device("meta"):
        model = LlamaModel(config, tp)
    model.to_empty(device=tp.device).to(dtype)
    loaded: set[str] = set()
    with ExitStack() as stack, torch.no_grad():
        reader = CheckpointReader(Path(path), stack)
        params = dict(model.named_parameters())
        for name, tensor in _rank_tensors(reader, config, tp):
            param = params[name]
            if param.shape != tensor.shape:
                raise UnsupportedModelError(
                    f"{name}: checkpoint slice {tuple(tensor.shape)} != model {tuple(param.shape)}"
                )
            param.copy_(tensor)
            loaded.add(name)
    missing = set(params) - loaded
    if missing:
        raise UnsupportedModelError(f"checkpoint did not provide {sorted(missing)}")
    model.inv_freq = rope_inv_freq(config).to(tp.device)
    return model.eval()


def _rank_tensors(
    reader: CheckpointReader, config: ModelConfig, tp: ParallelContext
) -> Iterator[tuple[str, torch.Tensor]]:
    heads_q, heads_kv = config.num_attention_heads, config.num_key_value_heads
    d = config.head_dim
    q_rows = _scaled(tp.shard(heads_q, "num_attention_heads"), d)
    kv_rows = _scaled(tp.shard(heads_kv, "num_key_value_heads"), d)
    mlp_rows = tp.shard(config.intermediate_size, "intermediate_size")

    yield "embed_tokens.weight", _vocab_rows(reader.slice("model.embed_tokens.weight"), config, tp)
    if not config.tie_word_embeddings:
        yield "lm_head", _vocab_rows(reader.slice("lm_head.weight"), config, tp)
    yield "norm.weight", reader.slice("model.norm.weight")[:]
    for i in range(config.num_hidden_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"{ours}.{norm}.weight", reader.slice(f"{hf}.{norm}.weight")[:]
        attn = f"{hf}.self_attn"
        yield (
            f"{ours}.self_attn.qkv_proj.weight",
            torch.cat(
                [
                    _rows(reader.slice(f"{attn}.q_proj.weight"), q_rows),
                    _rows(reader.slice(f"{attn}.k_proj.weight"), kv_rows),
                    _rows(reader.slice(f"{attn}.v_proj.weight"), kv_rows),
                ]
            ),
        )
        if config.attention_bias:
            yield (
                f"{ours}.self_attn.qkv_proj.bias",
                torch.cat(
                    [
                        _rows(reader.slice(f"{attn}.q_proj.bias"), q_rows),
                        _rows(reader.slice(f"{attn}.k_proj.bias"), kv_rows),
                        _rows(reader.slice(f"{attn}.v_proj.bias"), kv_rows),
                    ]
                ),
            )
        yield (
            f"{ours}.self_attn.o_proj.weight",
            _cols(reader.slice(f"{attn}.o_proj.weight"), q_rows),
        )
        mlp = f"{hf}.mlp"
        yield (
            f"{ours}.mlp.gate_up_proj.weight",
            torch.cat(
                [
                    _rows(reader.slice(f"{mlp}.gate_proj.weight"), mlp_rows),
                    _rows(reader.slice(f"{mlp}.up_proj.weight"), mlp_rows),
                ]
            ),
        )
        if config.mlp_bias:
            yield (
                f"{ours}.mlp.gate_up_proj.bias",
                torch.cat(
                    [
                        _rows(reader.slice(f"{mlp}.gate_proj.bias"), mlp_rows),
                        _rows(reader.slice(f"{mlp}.up_proj.bias"), mlp_rows),
                    ]
                ),
            )
        yield (
            f"{ours}.mlp.down_proj.weight",
            _cols(reader.slice(f"{mlp}.down_proj.weight"), mlp_rows),
        )


def _scaled(span: tuple[int, int], factor: int) -> tuple[int, int]:
    return span[0] * factor, span[1] * factor


def _rows(tensor_slice: TensorSlice, span: tuple[int, int]) -> torch.Tensor:
    return tensor_slice[span[0] : span[1]]


def _cols(tensor_slice: TensorSlice, span: tuple[int, int]) -> torch.Tensor:
    return tensor_slice[:, span[0] : span[1]]


def _vocab_rows(
    tensor_slice: TensorSlice, config: ModelConfig, tp: ParallelContext
) -> torch.Tensor:
    """This rank's vocab rows, zero-padded when the vocab does not split evenly."""
    shard = -(-config.vocab_size // tp.world_size)
    start = tp.rank * shard
    end = min(start + shard, config.vocab_size)
    rows = tensor_slice[start:end] if end > start else None
    padded = torch.zeros(shard, config.hidden_size)
    if rows is not None:
        padded = padded.to(rows.dtype)
        padded[: end - start] = rows
    return padded
