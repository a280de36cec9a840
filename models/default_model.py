"""The embedded default model: a seeded random Llama checkpoint in HF format.

Weights cannot be downloaded here, so Tiered writes its own: config.json, model.safetensors
with seeded random weights, a byte-level BPE tokenizer trained on `data/corpus.txt`, and a
ChatML chat template. The bytes are the same on every run, so every process (and every Ray
worker) that builds it gets the same model. Real checkpoints load by path instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Literal, cast

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

Size = Literal["tiny", "small"]
# Ids 0..3, in this order: bos, base-model eos, ChatML turn start, ChatML turn end.
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
BOS_TOKEN_ID = 0
EOS_TOKEN_IDS = [1, 3]
CORPUS = Path(__file__).parent / "data" / "corpus.txt"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The corpus fills the whole vocabulary with merges, so every id a random model samples decodes
# to text; a smaller corpus would be topped up with reserved tokens, as Llama 3 does.
VOCAB_SIZE = 4096
MAX_POSITIONS = 2048
SEED = 20261122
# Bump when the recipe changes so caches written by an older recipe are rebuilt.
RECIPE_VERSION = 2
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=688,
        vocab_size=VOCAB_SIZE,
    ),
    "small": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        vocab_size=VOCAB_SIZE,
    ),
}
_MARKER = ".complete"  # written last, holds the recipe fingerprint


def cache_dir() -> Path:
    return Path(os.environ.get("TIERED_CACHE_DIR") or Path.home() / ".cache" / "tiered")


def default_model_path(size: Size = "tiny") -> Path:
    """The cached default checkpoint, built on first use."""
    return make_default(size)


def resolve_model_path(spec: str) -> Path:
    """`default:tiny`, `default:small`, or a checkpoint directory."""
    if spec.startswith("default:"):
        size = spec.split(":", 1)[1]
        if size not in SHAPES:
            raise ValueError(f"unknown default model {spec!r}; use default:tiny or default:small")
        return default_model_path(cast(Size, size))
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model path {spec!r} has no config.json")
    return path


def config_for(size: Size) -> dict[str, Any]:
    """HF LlamaConfig fields for one default size."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **SHAPES[size],
        "head_dim": SHAPES[size]["hidden_size"] // SHAPES[size]["num_attention_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_IDS,
        "torch_dtype": "float32",
    }


def param_count(size: Size) -> int:
    """Number of weights `make_default(size)` writes, without writing them."""
    return sum(t.numel() for t in _weight_shapes(config_for(size)).values())


def fingerprint(size: Size) -> str:
    """Identifies the recipe's output; a cache holding another fingerprint is stale."""
    recipe = {
        "version": RECIPE_VERSION,
        "config": config_for(size),
        "corpus": hashlib.sha256(CORPUS.read_bytes()).hexdigest(),
        "template": CHAT_TEMPLATE,
        "seed": SEED,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def is_complete(path: Path, size: Size) -> bool:
    marker = Path(path) / _MARKER
    return marker.is_file() and marker.read_text().strip() == fingerprint(size)


def make_default(size: Size = "tiny", output: Path | None = None) -> Path:
    """Write the checkpoint to `output` (default: the cache) atomically; returns the path.

    Built in a sibling temp dir and renamed into place, so concurrent builders (Ray
    workers) never see a half-written checkpoint; a complete one is left alone.
    """
    if size not in SHAPES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SHAPES)}")
    output = Path(output) if output else cache_dir() / "models" / size
    if is_complete(output, size):
        return output
    if output.is_dir() and any(output.iterdir()) and not (output / _MARKER).is_file():
        raise FileExistsError(f"{output} exists and is not a Tiered default checkpoint")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-building-", dir=output.parent))
    try:
        _write_checkpoint(size, staging)
        _publish(staging, output, size)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _publish(staging: Path, output: Path, size: Size) -> None:
    """Rename the finished dir into place; losing a race to an identical copy is fine."""
    if output.is_dir() and any(output.iterdir()) and not is_complete(output, size):
        stale = output.parent / f".{output.name}-stale-{uuid.uuid4().hex}"
        try:
            os.rename(output, stale)  # built by an older recipe
        except FileNotFoundError:
            pass  # another process moved it first
        else:
            shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(staging, output)
    except OSError:
        if not is_complete(output, size):
            raise


def _write_checkpoint(size: Size, path: Path) -> None:
    config = config_for(size)
    _write_tokenizer(path)
    _write_json(path / "config.json", config)
    _write_json(
        path / "generation_config.json",
        {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_IDS, "do_sample": False},
    )
    save_file(_random_weights(config), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / _MARKER).write_text(fingerprint(size))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _write_tokenizer(path: Path) -> None:
    """Byte-level BPE (any UTF-8 encodes, no UNK) plus a ChatML tokenizer_config."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    missing = VOCAB_SIZE - tok.get_vocab_size()
    tok.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(missing)])
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, want {VOCAB_SIZE}")
    tok.save(str(path / "tokenizer.json"))
    _write_json(
        path / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": SPECIAL_TOKENS[0],
            "eos_token": "<|im_end|>",
            "pad_token": SPECIAL_TOKENS[1],
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POSITIONS,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )


def _weight_shapes(config: dict[str, Any]) -> dict[str, torch.Size]:
    """HF Llama tensor names and shapes, in the order the generator fills them."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": torch.Size([vocab, h])}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": torch.Size([q, h]),
            f"{p}.self_attn.k_proj.weight": torch.Size([kv, h]),
            f"{p}.self_attn.v_proj.weight": torch.Size([kv, h]),
            f"{p}.self_attn.o_proj.weight": torch.Size([h, q]),
            f"{p}.mlp.gate_proj.weight": torch.Size([inter, h]),
            f"{p}.mlp.up_proj.weight": torch.Size([inter, h]),
            f"{p}.mlp.down_proj.weight": torch.Size([h, inter]),
            f"{p}.input_layernorm.weight": torch.Size([h]),
            f"{p}.post_attention_layernorm.weight": torch.Size([h]),
        }
    shapes["model.norm.weight"] = torch.Size([h])
    shapes["lm_head.weight"] = torch.Size([vocab, h])
    return shapes


def _random_weights(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Seeded N(0, 0.02) weights, norms at 1; lm_head N(0, 0.1) keeps argmax margins clear."""
    gen = torch.Generator().manual_seed(SEED)
    tensors = {}
    for name, shape in _weight_shapes(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape)
        else:
            std = 0.1 if name == "lm_head.weight" else 0.02
            tensors[name] = torch.randn(shape, generator=gen) * std
    return tensors
