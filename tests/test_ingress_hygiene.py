"""The ingress's streaming and shedding on a real Serve app, with the openai SDK.

One ingress replica, a coalescing window wide enough that the tiny model's steps (a few
ms each) are gathered, and a small shedding deadline that a long prompt's tokenization
would trip if it ran on the event loop. How shedding answers a lagging loop is pinned
in tests/test_load_shedding.py, on a route that blocks the loop on purpose.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from ray import serve

from deployments.app import build_from_config
from deployments.config.tiered import TieredConfig
from deployments.tenancy.keys import hash_key

KEY = "tk-test-hygiene"
MODEL = "tiny-llama"
WINDOW_MS = 60
SHED_MS = 300  # well under the big prompt's tokenization time, well over timer noise
BIG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 20000  # ~900 KB


def _config(model_dir: Path) -> TieredConfig:
    engine = {"num_kv_blocks": 256, "max_num_seqs": 2, "max_num_batched_tokens": 512}
    return TieredConfig.model_validate(
        {
            "models": [
                {
                    "name": MODEL,
                    "path": str(model_dir),
                    "engine": engine,
                    "shared_pool": {"num_replicas": 1},
                },
            ],
            "tenants": [{"name": "hygiene", "api_key_hashes": [hash_key(KEY)]}],
            "ingress": {
                "num_replicas": 1,
                "stream_coalesce_ms": WINDOW_MS,
                "shed_loop_lag_ms": SHED_MS,
            },
        }
    )


@pytest.fixture(scope="module")
def base_url(ray_cluster, tiny_model_dir: Path) -> str:
    serve.run(build_from_config(_config(tiny_model_dir)), name="tiered", route_prefix="/")
    yield f"http://127.0.0.1:{ray_cluster.serve_port}/v1"
    serve.delete("tiered")


def _client(base_url: str) -> openai.OpenAI:
    """The SDK retries a 503 after its Retry-After: a loaded box may lag the loop too."""
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=5, timeout=60)


def test_coalesced_stream_has_fewer_events_and_the_same_text(base_url: str) -> None:
    c = _client(base_url)
    args = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count"}],
        "max_tokens": 32,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = c.chat.completions.create(**args)
    chunks = []
    for chunk in c.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    ):
        chunks.append(chunk)
    content = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert (
        "".join(ch.choices[0].delta.content for ch in content) == whole.choices[0].message.content
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 32 and chunks[-2].choices[0].finish_reason
    assert len(content) < 32  # 32 steps of a few ms each, in fewer events

    prompt = {"model": MODEL, "prompt": "The lighthouse", "max_tokens": 24, "temperature": 0}
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**prompt, stream=True))
    assert streamed == c.completions.create(**prompt).choices[0].text


def test_a_long_prompt_does_not_stall_the_ingress_for_others(base_url: str) -> None:
    """A ~900 KB prompt takes most of a second to tokenize. Tokenized on the ingress's
    event loop, it held every other request on that replica and tripped the shedding
    deadline: the others got 503 for a second (CI saw exactly this). Tokenized on a
    worker thread, with the GIL let go, the small requests beside it are all served."""
    c = _client(base_url)
    c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "warm"}], max_tokens=1
    )  # the lag monitor starts with a request
    big: list[int] = []

    def send_big() -> None:
        body = {"model": MODEL, "prompt": BIG_PROMPT, "max_tokens": 1}
        resp = httpx.post(
            f"{base_url}/completions",
            json=body,
            timeout=60,
            headers={"Authorization": f"Bearer {KEY}"},
        )
        big.append(resp.status_code)

    thread = threading.Thread(target=send_big)
    small = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    statuses: list[int] = []
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as http:
        thread.start()
        while thread.is_alive() or len(statuses) < 5:
            resp = http.post(f"{base_url}/chat/completions", json=small)
            statuses.append(resp.status_code)
            assert resp.status_code == 200, (len(statuses), resp.status_code, resp.text)
            time.sleep(0.02)
    thread.join(60)
    assert big == [400]  # the big prompt itself: too long for the context
