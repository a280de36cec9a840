"""Multi-LoRA against HF transformers + PEFT on the tiny default model (float32).

Adapters are random and nonzero (init_lora_weights=False), written by PEFT's own
save_pretrained. Logits of every prompt position agree within 1e-4 (the tolerance of the
base model's HF comparison) and greedy tokens are identical, for one adapter alone and for
one batch mixing three adapters (plain, rsLoRA, a rank-4 one on three targets) with the
base model, at TP=1 and at TP=2 over gloo.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from models.engine import LLMEngine
from models.engine_config import EngineConfig
from models.lora import LoRARequest
from models.runner import run_worker
from models.sampling_params import SamplingParams
from models.tp import init_parallel
from tests.engine_helpers import collect, run_to_completion
from tests.lora_adapters import PeftReference, prefill_batch, write_adapter
from tests.ports import free_port

pytest.importorskip("peft")

TOL = 1e-4
NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
PROMPTS: dict[str | None, list[int]] = {  # adapter name (None = base) -> prompt
    "plain": [(7 * i + 11) % 2000 + 10 for i in range(30)],
    "rslora": [(13 * i + 5) % 2000 + 10 for i in range(17)],
    "small": [(31 * i + 2) % 2000 + 10 for i in range(21)],
    None: [(17 * i + 3) % 2000 + 10 for i in range(25)],
}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "plain": write_adapter(tiny_model_dir, root / "plain", seed=1),
        "rslora": write_adapter(tiny_model_dir, root / "rslora", seed=2, rslora=True),
        "small": write_adapter(
            tiny_model_dir,
            root / "small",
            seed=3,
            r=4,
            alpha=8,
            targets=["q_proj", "v_proj", "down_proj"],
        ),
    }


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, adapters: dict[str, Path]) -> PeftReference:
    return PeftReference(tiny_model_dir, adapters)


def _requests(adapters: dict[str, Path]) -> dict[str, LoRARequest]:
    """Each adapter by name; the rank-4 one through a file:// URI."""
    out = {name: LoRARequest(name, 1, str(path)) for name, path in adapters.items()}
    out["small"] = LoRARequest("small", 1, adapters["small"].as_uri())
    return out


def _config(model: Path, tp_size: int = 1) -> EngineConfig:
    return EngineConfig(model=str(model), tp_size=tp_size, num_kv_blocks=64, max_loras=3)


def _drive(engine: LLMEngine, loras: dict[str, LoRARequest], names: list[str | None]) -> dict:
    """Mixed-batch logits of every position, then greedy tokens with all requests in flight."""
    for lora in loras.values():
        engine.load_lora(lora)
    prompts = [(loras[n] if n else None, PROMPTS[n]) for n in names]
    logits = engine.runner.execute(prefill_batch(engine, prompts))
    assert logits is not None
    for n in names:
        engine.add_request(str(n), PROMPTS[n], GREEDY, lora=loras[n] if n else None)
    done = collect(run_to_completion(engine))
    tokens = {n: done[str(n)]["tokens"][0] for n in names}
    return {"logits": logits.clone(), "tokens": tokens, "stats": engine.stats()}


def _check(result: dict, reference: PeftReference, names: list[str | None]) -> None:
    offset = 0
    for n in names:
        got = result["logits"][offset : offset + len(PROMPTS[n])]
        offset += len(PROMPTS[n])
        err = (got - reference.logits(n, PROMPTS[n])).abs().max().item()
        assert err <= TOL, (n, err)
        assert result["tokens"][n] == reference.greedy(n, PROMPTS[n], NEW_TOKENS), n


def test_one_adapter_matches_peft_and_changes_the_output(
    tiny_model_dir: Path, adapters: dict[str, Path], reference: PeftReference
) -> None:
    engine = LLMEngine(_config(tiny_model_dir))
    loras = _requests(adapters)
    result = _drive(engine, {"plain": loras["plain"]}, ["plain"])
    _check(result, reference, ["plain"])
    # The adapter is not a no-op: on the same prompt the base model says something else.
    base_logits = reference.logits(None, PROMPTS["plain"])
    assert (result["logits"] - base_logits).abs().max().item() > 0.5
    engine.add_request("base", PROMPTS["plain"], GREEDY)
    base_tokens = collect(run_to_completion(engine))["base"]["tokens"][0]
    assert base_tokens == reference.greedy(None, PROMPTS["plain"], NEW_TOKENS)
    assert base_tokens != result["tokens"]["plain"]


def test_mixed_batch_of_three_adapters_and_base_matches_peft(
    tiny_model_dir: Path, adapters: dict[str, Path], reference: PeftReference
) -> None:
    engine = LLMEngine(_config(tiny_model_dir))
    names = list(PROMPTS)
    result = _drive(engine, _requests(adapters), names)
    _check(result, reference, names)
    stats = result["stats"]
    assert stats.lora_loads_total == 3 and stats.lora_slots_used == 3
    assert stats.loras_resident == ("plain@1", "rslora@1", "small@1")
    assert stats.kv_blocks_used == 0


def _rank_main(rank: int, port: int, config: EngineConfig, loras: dict, results: dict) -> None:
    parallel = init_parallel(rank, 2, f"tcp://127.0.0.1:{port}", "cpu", timeout_s=120)
    if rank:
        run_worker(config, parallel)
        return
    engine = LLMEngine(config, parallel)
    try:
        results["mixed"] = _drive(engine, loras, list(PROMPTS))
        qkv = engine.runner.lora_slots.layers[0]["qkv"]  # type: ignore[union-attr]
        results["qkv_b"] = (tuple(qkv.b.shape), qkv.out_widths)
    finally:
        engine.shutdown()


def test_tp2_mixed_batch_matches_peft(
    tiny_model_dir: Path, adapters: dict[str, Path], reference: PeftReference
) -> None:
    results = mp.get_context("spawn").Manager().dict()
    config = _config(tiny_model_dir, tp_size=2)
    args = (free_port(), config, _requests(adapters), results)
    mp.start_processes(_rank_main, args=args, nprocs=2, start_method="spawn")
    _check(results["mixed"], reference, list(PROMPTS))
    # Each rank holds half of B's columns for the column-parallel q/k/v (8 and 4 heads of
    # 32), block diagonal over the three rank-16 inner blocks.
    assert results["qkv_b"] == ((3, 48, 256), (128, 64, 64))
    assert torch.isfinite(results["mixed"]["logits"]).all()
