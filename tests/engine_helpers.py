"""Drive an LLMEngine to completion in tests."""

from __future__ import annotations

from models.engine import LLMEngine
from models.outputs import RequestOutput
from models.sampling_params import SamplingParams


def run_to_completion(engine: LLMEngine, max_steps: int = 10_000) -> list[RequestOutput]:
    outputs: list[RequestOutput] = []
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        outputs.extend(engine.step())
    raise AssertionError("engine did not finish within the step bound")


def collect(outputs: list[RequestOutput]) -> dict[str, dict]:
    """Per request: token ids and text per sample, finish reasons, final usage."""
    result: dict[str, dict] = {}
    for out in outputs:
        r = result.setdefault(out.request_id, {"tokens": {}, "text": {}, "finish": {}})
        for d in out.deltas:
            r["tokens"].setdefault(d.index, []).extend(d.token_ids)
            r["text"][d.index] = r["text"].get(d.index, "") + d.text
            if d.finish_reason:
                r["finish"][d.index] = d.finish_reason
        r["usage"] = out.usage
        r["finished"] = out.finished
    return result


def generate(
    engine: LLMEngine, prompt: str | list[int], params: SamplingParams, **kw: object
) -> dict:
    engine.add_request("solo", prompt, params, **kw)  # type: ignore[arg-type]
    return collect(run_to_completion(engine))["solo"]
