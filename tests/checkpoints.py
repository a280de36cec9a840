"""Small HF checkpoints written by `transformers` itself, for reference tests of the engine."""

from __future__ import annotations

from pathlib import Path

import torch


def write_hf_checkpoint(
    path: Path,
    *,
    model_type: str = "llama",
    tie: bool = False,
    kv_heads: int = 2,
    seed: int = 0,
    **overrides: object,
) -> Path:
    """A random tiny Llama/Qwen2/Mistral saved with save_pretrained (safetensors)."""
    import transformers

    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[model_type]
    kwargs: dict[str, object] = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    if model_type == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = cls[1](cls[0](**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    return path
