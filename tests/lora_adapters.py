"""LoRA adapters written by PEFT itself, and PEFT's outputs with them: the reference."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.engine import LLMEngine
from models.lora import LoRARequest
from models.runner import StepBatch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(
    base: Path,
    out: Path,
    *,
    seed: int,
    r: int = 8,
    alpha: int = 16,
    rslora: bool = False,
    targets: list[str] | None = None,
) -> Path:
    """A random, nonzero adapter (init_lora_weights=False) saved with save_pretrained."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(
        init_lora_weights=False,
        target_modules=targets or ALL_TARGETS,
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
    )
    torch.manual_seed(seed)
    peft.get_peft_model(model, config).save_pretrained(out)
    return out


def edit_config(adapter: Path, out: Path, **changes: object) -> Path:
    """A copy of `adapter` with adapter_config.json fields changed."""
    out.mkdir(parents=True)
    (out / "adapter_model.safetensors").write_bytes(
        (adapter / "adapter_model.safetensors").read_bytes()
    )
    config = json.loads((adapter / "adapter_config.json").read_text()) | changes
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


class PeftReference:
    """HF transformers + PEFT on the same base checkpoint, holding several named adapters."""

    def __init__(self, base: Path, adapters: dict[str, Path]) -> None:
        import peft
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        names = list(adapters)
        self.model = peft.PeftModel.from_pretrained(hf, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(adapters[name], adapter_name=name)
        self.model.eval()

    @torch.inference_mode()
    def logits(self, adapter: str | None, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab] float32 logits of every position."""
        return self._run(adapter, lambda: self.model(torch.tensor([ids])).logits[0].float())

    @torch.inference_mode()
    def greedy(self, adapter: str | None, ids: list[int], n: int) -> list[int]:
        def generate() -> list[int]:
            out = self.model.generate(
                input_ids=torch.tensor([ids]),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            return out[0, len(ids) :].tolist()

        return self._run(adapter, generate)

    def _run(self, adapter, fn):  # type: ignore[no-untyped-def]
        if adapter is None:
            with self.model.disable_adapter():
                return fn()
        self.model.set_adapter(adapter)
        return fn()


def prefill_batch(
    engine: LLMEngine, prompts: list[tuple[LoRARequest | None, list[int]]]
) -> StepBatch:
    """One prefill step over every prompt, each on its adapter (held already), asking for
    the logits of every position: a mixed batch straight into the runner. It writes KV
    blocks 0.. directly, so use it before the engine has cached anything."""
    assert engine.loras is not None
    bs = engine.config.block_size
    batch = StepBatch([], [], [], [], [], [], [], [])
    next_block = 0
    for lora, ids in prompts:
        table = list(range(next_block, next_block + -(-len(ids) // bs)))
        next_block += len(table)
        start = len(batch.input_ids)
        batch.input_ids += ids
        batch.positions += list(range(len(ids)))
        batch.slot_mapping += [table[p // bs] * bs + p % bs for p in range(len(ids))]
        batch.query_lens.append(len(ids))
        batch.context_lens.append(len(ids))
        batch.block_tables.append(table)
        batch.logits_indices += list(range(start, start + len(ids)))
        slot = -1
        if lora is not None:
            assert engine.loras.acquire_slot(lora.key, set())
            slot = engine.loras.slot_of(lora.key)
        batch.lora_slots.append(slot)
    width = max(len(t) for t in batch.block_tables)
    batch.block_tables = [t + [0] * (width - len(t)) for t in batch.block_tables]
    return batch
