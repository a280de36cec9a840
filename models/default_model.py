"""The embedded default model: a seeded random Llama checkpoint in HF format.

Weights cannot be downloaded here, so Tiered writes its own: config.json, model.safetensors
with seeded random weights, a byte-level BPE tokenizer trained on `data/corpus.txt`, and a
ChatML chat template. The bytes are the same on every run, so every process (and every Ray
worker) that builds it gets the same model. Real checkpoints load by path instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal, TypeGuard

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

Size = Literal["tiny", "small"]
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
CORPUS = Path(__file__).parent / "data" / "corpus.txt"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB_SIZE = 2048  # BPE merges from the corpus, topped up with reserved tokens as Llama 3 does
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
_COMPLETE = ".complete"


def cache_dir() -> Path:
    return Path(os.environ.get("TIERED_CACHE_DIR", Path.home() / ".cache" / "tiered"))


def default_model_path(size: Size = "tiny") -> Path:
    """The cached default checkpoint, built on first use."""
    path = cache_dir() / "models" / size
    if not (path / _COMPLETE).is_file():
        make_default(size, path)
    return path


def _is_size(name: str) -> TypeGuard[Size]:
    return name in SHAPES


def resolve_model_path(spec: str) -> Path:
    """`default:tiny`, `default:small`, a checkpoint directory on this node, or an fsspec
    URI of one (s3://, gs://, file://), copied into this node's cache on first use."""
    if spec.startswith("default:"):
        size = spec.split(":", 1)[1]
        if not _is_size(size):
            raise ValueError(f"unknown default model {spec!r}; use default:tiny or default:small")
        return default_model_path(size)
    if "://" in spec:
        from models.checkpoint_fetch import fetch_checkpoint

        return fetch_checkpoint(spec)
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model path {spec!r} has no config.json")
    return path


def config_for(size: Size) -> dict[str, Any]:
    shape = SHAPES[size]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **shape,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 3,
        "torch_dtype": "float32",
    }


def make_default(size: Size = "tiny", output: Path | None = None) -> Path:
    """Write the checkpoint to `output` (default: the cache) atomically; returns the path."""
    if size not in SHAPES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SHAPES)}")
    output = Path(output) if output else cache_dir() / "models" / size
    if (output / _COMPLETE).is_file():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{size}-", dir=output.parent))
    try:
        _write_tokenizer(staging)
        config = config_for(size)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        generation = {"bos_token_id": 0, "eos_token_id": 3}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        save_file(_random_weights(config), staging / "model.safetensors", metadata={"format": "pt"})
        (staging / _COMPLETE).write_text(size)
        try:
            os.rename(staging, output)
        except OSError:  # another process won the race; its copy is identical
            if not (output / _COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _write_tokenizer(path: Path) -> None:
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
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    assert tok.get_vocab_size() == VOCAB_SIZE
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|end_of_text|>",
                "add_bos_token": False,
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": 2048,
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            indent=2,
        )
    )


def _random_weights(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Seeded normal weights; a wider lm_head keeps greedy argmax margins clear."""
    gen = torch.Generator().manual_seed(20261122)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    tensors = {"model.embed_tokens.weight": normal(vocab, h, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tensors |= {
            f"{p}.self_attn.q_proj.weight": normal(h, h, std=0.08),
            f"{p}.self_attn.k_proj.weight": normal(kv, h, std=0.08),
            f"{p}.self_attn.v_proj.weight": normal(kv, h, std=0.08),
            f"{p}.self_attn.o_proj.weight": normal(h, h, std=0.04),
            f"{p}.mlp.gate_proj.weight": normal(inter, h, std=0.06),
            f"{p}.mlp.up_proj.weight": normal(inter, h, std=0.06),
            f"{p}.mlp.down_proj.weight": normal(h, inter, std=0.04),
            f"{p}.input_layernorm.weight": torch.ones(h),
            f"{p}.post_attention_layernorm.weight": torch.ones(h),
        }
    tensors["model.norm.weight"] = torch.ones(h)
    tensors["lm_head.weight"] = normal(vocab, h, std=0.1)
    return tensors
