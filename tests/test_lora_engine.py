"""LoRA in the engine: bad adapters refused by field, versions never share KV blocks, more
adapters than slots, unloading under load, and the async API (file:// URIs, shared loads).

Reference tokens come from HF transformers + PEFT (tests/lora_adapters.py)."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.async_engine import AsyncLLMEngine
from models.engine import LLMEngine
from models.engine_config import EngineConfig
from models.errors import LoRALoadError
from models.lora import LoRARequest
from models.request import Sequence
from models.sampling_params import SamplingParams
from tests.engine_helpers import collect, generate, run_to_completion
from tests.lora_adapters import PeftReference, edit_config, write_adapter

pytest.importorskip("peft")

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [(7 * i + 3) % 2000 + 10 for i in range(20)]
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    shapes = {"a": (8, 16), "b": (8, 16), "c": (4, 8), "d": (16, 16)}
    return {
        name: write_adapter(tiny_model_dir, root / name, seed=11 + i, r=r, alpha=alpha)
        for i, (name, (r, alpha)) in enumerate(shapes.items())
    }


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, adapters: dict[str, Path]) -> PeftReference:
    return PeftReference(tiny_model_dir, adapters)


def _engine(model: Path, **kw: object) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), num_kv_blocks=128, **kw))  # type: ignore[arg-type]


def _bad_adapters(adapters: dict[str, Path], tiny_model_dir: Path, root: Path) -> dict:
    """(adapter dir or URI, the `param` its LoRALoadError must name)."""
    good = adapters["a"]
    corrupt = edit_config(good, root / "corrupt")
    (corrupt / WEIGHTS).write_bytes((good / WEIGHTS).read_bytes()[:5000])
    tensors = load_file(good / WEIGHTS)
    extra = edit_config(good, root / "extra")
    save_file(
        tensors | {"base_model.model.lm_head.lora_A.weight": torch.ones(8, 256)}, extra / WEIGHTS
    )
    transposed = edit_config(good, root / "transposed")
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    save_file(tensors | {key: torch.ones(8, 128)}, transposed / WEIGHTS)
    lm_head = ["q_proj", "lm_head"]
    return {
        "missing": (str(root / "nope"), "lora_path"),
        "missing-uri": ((root / "nope").as_uri(), "lora_path"),
        "corrupt": (str(corrupt), "lora_path"),
        "rank": (str(write_adapter(tiny_model_dir, root / "r32", seed=5, r=32)), "r"),
        "dora": (str(edit_config(good, root / "dora", use_dora=True)), "use_dora"),
        "ia3": (str(edit_config(good, root / "ia3", peft_type="IA3")), "peft_type"),
        "target": (str(edit_config(good, root / "tgt", target_modules=lm_head)), "target_modules"),
        "extra-tensor": (str(extra), "target_modules"),
        "shape": (str(transposed), "lora_path"),
        "base": (
            str(edit_config(good, root / "base", base_model_name_or_path="org/other-8b")),
            "base_model_name_or_path",
        ),
    }


def test_bad_adapters_are_refused_by_field_and_the_engine_serves_on(
    tiny_model_dir: Path, adapters: dict[str, Path], reference: PeftReference, tmp_path: Path
) -> None:
    engine = _engine(tiny_model_dir, max_loras=2)
    for name, (path, param) in _bad_adapters(adapters, tiny_model_dir, tmp_path).items():
        with pytest.raises(LoRALoadError) as err:
            engine.load_lora(LoRARequest(name, 1, path))
        assert err.value.param == param, (name, err.value.message)
        assert err.value.code == "lora_load_failed"
    bad = LoRARequest("dora", 2, str(tmp_path / "dora"))
    with pytest.raises(LoRALoadError):  # through admission too: nothing is left queued
        engine.add_request("bad", PROMPT, GREEDY, lora=bad)
    assert not engine.has_unfinished()
    assert engine.stats().lora_loads_total == 0 and engine.stats().loras_resident == ()
    assert not list((Path(os.environ["TIERED_CACHE_DIR"]) / "loras").iterdir())  # no leftovers
    good = LoRARequest("a", 1, str(adapters["a"]))
    assert generate(engine, PROMPT, GREEDY)["tokens"][0] == reference.greedy(None, PROMPT, 8)
    assert generate(engine, PROMPT, GREEDY, lora=good)["tokens"][0] == reference.greedy(
        "a", PROMPT, 8
    )
    served_as = _engine(tiny_model_dir, max_loras=1, served_model_name="tiny-chat")
    renamed = edit_config(adapters["a"], tmp_path / "renamed", base_model_name_or_path="tiny-chat")
    assert served_as.load_lora(LoRARequest("renamed", 1, str(renamed))) > 0
    with pytest.raises(LoRALoadError) as err:
        _engine(tiny_model_dir).add_request("off", PROMPT, GREEDY, lora=good)
    assert err.value.param == "model"


def test_a_new_version_never_hits_the_old_versions_blocks(
    tiny_model_dir: Path, adapters: dict[str, Path], reference: PeftReference
) -> None:
    engine = _engine(tiny_model_dir, max_loras=2)
    prompt = [(11 * i + 5) % 2000 + 10 for i in range(70)]  # four full blocks of 16
    v1 = LoRARequest("tenant", 1, str(adapters["a"]))
    cold = generate(engine, prompt, GREEDY, lora=v1)
    warm = generate(engine, prompt, GREEDY, lora=v1)
    assert warm["usage"].cached_tokens == 64 and warm["tokens"] == cold["tokens"]
    assert generate(engine, prompt, GREEDY)["usage"].cached_tokens == 0  # base: other blocks

    v2 = LoRARequest("tenant", 2, str(adapters["b"]))  # same name, new weights
    fresh = generate(engine, prompt, GREEDY, lora=v2)
    assert fresh["usage"].cached_tokens == 0
    assert fresh["tokens"][0] == reference.greedy("b", prompt, 8) != cold["tokens"][0]
    # v1's blocks are still cached: keyed by the name alone they would have been hit.
    old = Sequence("probe", "probe", 0, prompt, GREEDY, lora=v1)
    assert len(engine.kv.find_cached_prefix(old)) == 4
    assert engine.stats().loras_resident == ("tenant@2",)
    assert len(engine.runner.adapters) == 1  # v1's weights were freed


def test_more_adapters_than_slots_all_finish_correctly(
    tiny_model_dir: Path, adapters: dict[str, Path], reference: PeftReference
) -> None:
    engine = _engine(tiny_model_dir, max_loras=2, max_cpu_loras=3)
    jobs: list[tuple[str | None, list[int]]] = [
        (name, [(k * 37 + j * 11 + i * 5) % 2000 + 10 for i in range(9 + k)])
        for j, name in enumerate(adapters)
        for k in range(2)
    ]
    jobs += [(None, PROMPT)] * 2
    for i, (name, prompt) in enumerate(jobs):
        lora = LoRARequest(name, 1, str(adapters[name])) if name else None
        engine.add_request(f"j{i}", prompt, GREEDY, lora=lora)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
        assert len(engine.scheduler.adapter_keys(running_only=True)) <= 2
    done = collect(outputs)
    for i, (name, prompt) in enumerate(jobs):
        assert done[f"j{i}"]["tokens"][0] == reference.greedy(name, prompt, 8), (i, name)
    stats = engine.stats()
    assert stats.lora_evictions_total >= 1 and stats.lora_slots_used == 2
    assert stats.lora_loads_total == 4 and len(stats.loras_resident) == 3  # back to capacity
    assert stats.kv_blocks_used == 0


def test_unload_lets_admitted_requests_finish(
    tiny_model_dir: Path, adapters: dict[str, Path], reference: PeftReference
) -> None:
    engine = _engine(tiny_model_dir, max_loras=1)
    lora = LoRARequest("u", 1, str(adapters["c"]))
    engine.add_request("running", PROMPT, GREEDY, lora=lora)
    first = engine.step()
    assert engine.unload_lora("u") and not engine.unload_lora("u")
    assert engine.stats().loras_resident == ()
    done = collect(first + run_to_completion(engine))
    assert done["running"]["tokens"][0] == reference.greedy("c", PROMPT, 8)
    assert not engine.runner.adapters  # freed once its last request finished
    assert generate(engine, PROMPT, GREEDY, lora=lora)["tokens"] == done["running"]["tokens"]
    assert engine.stats().lora_loads_total == 2


def test_async_file_uri_shared_loads_errors_and_unload(
    tiny_model_dir: Path, adapters: dict[str, Path], reference: PeftReference
) -> None:
    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64, max_loras=1))

    async def tokens(request_id: str, lora: LoRARequest | None) -> list[int]:
        outs = [o async for o in engine.generate(request_id, PROMPT, GREEDY, lora=lora)]
        return [t for o in outs for d in o.deltas for t in d.token_ids]

    async def main() -> None:
        uri = LoRARequest("uri", 1, adapters["a"].as_uri())
        assert await engine.load_lora(uri) > 0
        assert await engine.load_lora(uri) == 0.0
        assert await tokens("u", uri) == reference.greedy("a", PROMPT, 8)
        # Three requests for an adapter nobody loaded yet share one load, next to the base.
        new = LoRARequest("d", 1, str(adapters["d"]))
        got = await asyncio.gather(*(tokens(f"d{i}", new) for i in range(3)), tokens("x", None))
        assert got[:3] == [reference.greedy("d", PROMPT, 8)] * 3
        assert got[3] == reference.greedy(None, PROMPT, 8)
        with pytest.raises(LoRALoadError) as err:
            await tokens("bad", LoRARequest("bad", 1, "file:///no/such/adapter"))
        assert err.value.param == "lora_path"
        assert await engine.unload_lora("uri") and not await engine.unload_lora("uri")
        stats = engine.stats()
        assert stats.lora_loads_total == 2 and stats.loras_resident == ("d@1",)
        json.dumps(asdict(stats))
        await engine.shutdown()

    asyncio.run(asyncio.wait_for(main(), 120))
