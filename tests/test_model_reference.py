"""The model against HF transformers on the same checkpoint directory (fp32, 1e-4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.attention import AttentionMetadata
from models.config import ModelConfig
from models.errors import UnsupportedModelError
from models.llama import LlamaModel
from models.tp import single_process
from models.weights import load_model
from tests.checkpoints import write_hf_checkpoint

transformers = pytest.importorskip("transformers")

BLOCK = 16
VARIANTS = {
    "llama-gqa": dict(model_type="llama", kv_heads=2),
    "llama-tied": dict(model_type="llama", kv_heads=4, tie=True),
    "qwen2-bias": dict(model_type="qwen2", kv_heads=2),
    "mistral": dict(model_type="mistral", kv_heads=1),
    "llama3-rope": dict(
        model_type="llama",
        kv_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])


def _kv(config: ModelConfig, blocks: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (blocks, BLOCK, config.num_key_value_heads, config.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]


def _run(model: LlamaModel, kv, ids: torch.Tensor, start: int, table: list[int]) -> torch.Tensor:
    """Forward `ids` at positions start.. for one sequence whose blocks are `table`."""
    positions = torch.arange(start, start + len(ids))
    slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in positions.tolist()])
    meta = AttentionMetadata.build(
        slots, [len(ids)], [start + len(ids)], torch.tensor([table]), BLOCK
    )
    hidden = model(ids, positions, kv, meta)
    logits = model.compute_logits(hidden)
    assert logits is not None
    return logits


@torch.inference_mode()
@pytest.mark.parametrize("length", [1, 7, 16, 33, 120])
def test_prefill_logits_match_hf(checkpoint: Path, length: int) -> None:
    config = ModelConfig.from_pretrained(checkpoint)
    ours = load_model(checkpoint, config, single_process(), torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.randint(
        0, config.vocab_size, (length,), generator=torch.Generator().manual_seed(length)
    )
    table = [9, 2, 30, 4, 17, 5, 6, 11]  # deliberately scattered blocks
    got = _run(ours, _kv(config), ids, 0, table)
    want = hf(ids[None]).logits[0].float()
    assert (got - want).abs().max().item() <= 1e-4


@torch.inference_mode()
def test_incremental_decode_equals_full_forward(checkpoint: Path) -> None:
    """Chunked prefill then one-token decodes over the paged cache == one full forward."""
    config = ModelConfig.from_pretrained(checkpoint)
    model = load_model(checkpoint, config, single_process(), torch.float32)
    ids = torch.randint(0, config.vocab_size, (50,), generator=torch.Generator().manual_seed(0))
    table = [3, 1, 7, 0]
    full = _run(model, _kv(config), ids, 0, table)
    kv = _kv(config)
    pieces = [_run(model, kv, ids[:20], 0, table), _run(model, kv, ids[20:45], 20, table)]
    pieces += [_run(model, kv, ids[i : i + 1], i, table) for i in range(45, 50)]
    assert (torch.cat(pieces) - full).abs().max().item() <= 1e-5


def test_unsupported_architectures_are_refused() -> None:
    base = dict(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'"):
        ModelConfig.from_dict({**base, "model_type": "gpt2"})
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        ModelConfig.from_dict({**base, "model_type": "llama", "hidden_act": "gelu"})
    with pytest.raises(UnsupportedModelError, match="rope_scaling type 'yarn'"):
        ModelConfig.from_dict(
            {**base, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 2}}
        )
    with pytest.raises(UnsupportedModelError, match="lacks required key 'vocab_size'"):
        ModelConfig.from_dict(
            {k: v for k, v in base.items() if k != "vocab_size"} | {"model_type": "llama"}
        )
    with pytest.raises(UnsupportedModelError, match="tp_size=3 does not divide"):
        ModelConfig.from_dict({**base, "model_type": "llama"}).check_tp(3)


@torch.inference_mode()
def test_sharded_checkpoint_loads_like_single_file(tmp_path: Path) -> None:
    import transformers as tf

    single = write_hf_checkpoint(tmp_path / "single", kv_heads=2)
    model = tf.AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    config = ModelConfig.from_pretrained(single)
    a = load_model(single, config, single_process(), torch.float32)
    b = load_model(tmp_path / "sharded", config, single_process(), torch.float32)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_fp32(tmp_path: Path, dtype: torch.dtype) -> None:
    ckpt = write_hf_checkpoint(tmp_path / "ckpt", kv_heads=2)
    config = ModelConfig.from_pretrained(ckpt)
    ids = torch.arange(3, 40)
    table = [0, 1, 2]
    full = _run(
        load_model(ckpt, config, single_process(), torch.float32), _kv(config), ids, 0, table
    )
    half_model = load_model(ckpt, config, single_process(), dtype)
    assert next(half_model.parameters()).dtype == dtype
    kv = [(k.to(dtype), v.to(dtype)) for k, v in _kv(config)]
    half = _run(half_model, kv, ids, 0, table)
    assert (half - full).abs().max().item() < 0.1
    assert (half.argmax(-1) == full.argmax(-1)).float().mean().item() > 0.9
