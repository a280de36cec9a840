"""Multi-LoRA over HTTP end to end: real Serve on the session's Ray cluster, the official
openai SDK as the client, adapters written by PEFT itself.

One app: a shared pool of one replica of the tiny base, a dedicated tenant, a second base
model (so a load must name its base), a config adapter scoped to one tenant, two ingress
replicas (an unload must hold on both).
"""

from __future__ import annotations

import concurrent.futures
import shutil
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from ray import serve

from deployments.app import build_from_config
from deployments.config.tiered import TieredConfig
from deployments.state.config import state_dir
from deployments.tenancy.keys import hash_key
from tests.lora_adapters import edit_config, write_adapter
from tests.serve_helpers import wait_for_usage

KEYS = {t: f"tk-lora-{t}" for t in ("globex", "initech", "outsider", "acme", "billed", "admin")}
MODEL = "tiny-llama"
PROMPT = [{"role": "user", "content": "Tell me about the lighthouse"}]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT adapters on the tiny base (random, nonzero), and broken variants of one."""
    root = tmp_path_factory.mktemp("adapters")
    made = {
        name: write_adapter(tiny_model_dir, root / name, seed=seed, r=8)
        for name, seed in (("one", 1), ("two", 2), ("three", 3), ("cfg", 4))
    }
    made["rank32"] = write_adapter(tiny_model_dir, root / "rank32", seed=5, r=32)
    made["wrong_base"] = edit_config(
        made["one"], root / "wrong_base", base_model_name_or_path="someone/other-model"
    )
    corrupt = root / "corrupt"
    shutil.copytree(made["one"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00not a safetensors file")
    made["corrupt"] = corrupt
    return made


def _config(model_dir: Path, cfg_adapter: Path) -> TieredConfig:
    engine = {
        "num_kv_blocks": 256,
        "max_num_seqs": 4,
        "max_num_batched_tokens": 512,
        "max_loras": 2,
    }

    def tenant(name: str, **kw: object) -> dict:
        return {"name": name, "api_key_hashes": [hash_key(KEYS[name])], **kw}

    return TieredConfig.model_validate(
        {
            "models": [
                {
                    "name": MODEL,
                    "path": str(model_dir),
                    "engine": engine,
                    "shared_pool": {"num_replicas": 1},
                    "adapters": [
                        {"name": "cfg-lora", "path": str(cfg_adapter), "tenants": ["globex"]}
                    ],
                },
                {
                    "name": "second",
                    "path": str(model_dir),
                    "engine": engine,
                    "shared_pool": {"num_replicas": 0},
                },
            ],
            "tenants": [
                tenant("globex", models=[MODEL]),
                tenant("initech", models=[MODEL]),
                tenant("outsider", models=["second"]),
                tenant("billed", models=[MODEL]),
                tenant(
                    "acme",
                    tier="dedicated",
                    dedicated={"model": MODEL, "reserved_replicas": 1, "spill": False},
                ),
            ],
            "admin_key_hashes": [hash_key(KEYS["admin"])],
            "ingress": {"num_replicas": 2},
            "state": {"url": f"sqlite+aiosqlite:///{state_dir() / 'lora.db'}"},
            "prices": {
                "tokens": [
                    {"model": MODEL, "tier": "shared", "input_per_1m": 2.0, "output_per_1m": 8.0},
                ]
            },
        }
    )


@pytest.fixture(scope="module")
def root(ray_cluster, tiny_model_dir: Path, adapters: dict[str, Path]) -> Any:
    app = build_from_config(_config(tiny_model_dir, adapters["cfg"]))
    serve.run(app, name="lora", route_prefix="/")
    yield f"http://127.0.0.1:{ray_cluster.serve_port}"
    serve.delete("lora")


def client(root: str, tenant: str = "globex") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{root}/v1", api_key=KEYS[tenant], max_retries=0, timeout=120)


def admin_post(root: str, path: str, body: Any, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or KEYS['admin']}"}
    return httpx.post(f"{root}{path}", json=body, headers=headers, timeout=120)


def load(root: str, name: str, path: Path | str, **extra: Any) -> dict[str, Any]:
    body = {"lora_name": name, "lora_path": str(path), "base_model": MODEL, **extra}
    resp = admin_post(root, "/v1/load_lora_adapter", body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def unload(root: str, name: str) -> httpx.Response:
    return admin_post(root, "/v1/unload_lora_adapter", {"lora_name": name})


def greedy(c: openai.OpenAI, model: str, n: int = 12) -> str:
    resp = c.chat.completions.create(model=model, messages=PROMPT, max_tokens=n, temperature=0)
    assert resp.model == model and resp.choices[0].finish_reason in ("stop", "length")
    return resp.choices[0].message.content or ""


def not_found(c: openai.OpenAI, model: str) -> dict[str, Any]:
    with pytest.raises(openai.NotFoundError) as err:
        greedy(c, model)
    body = err.value.body
    assert isinstance(body, dict)
    return body


def model_ids(root: str, tenant: str) -> dict[str, str | None]:
    return {m.id: getattr(m, "parent", None) for m in client(root, tenant).models.list().data}


def test_hot_load_then_chat_completions_and_responses(root: str, adapters: dict) -> None:
    c = client(root)
    base = greedy(c, MODEL)
    loaded = load(root, "sql-lora", adapters["one"])
    assert loaded["object"] == "lora_adapter" and loaded["id"] == "sql-lora"
    assert loaded["version"] >= 1 and loaded["parent"] == MODEL and loaded["tenants"] == []
    tuned = greedy(c, "sql-lora")
    assert tuned != base  # a random nonzero adapter moves the logits
    assert greedy(c, "sql-lora") == tuned  # deterministic, and prefix-cache hits agree
    assert greedy(client(root, "initech"), "sql-lora") == tuned

    chunks = list(
        c.chat.completions.create(
            model="sql-lora", messages=PROMPT, max_tokens=12, temperature=0, stream=True
        )
    )
    assert chunks[0].model == "sql-lora"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == tuned

    comp = c.completions.create(
        model="sql-lora", prompt="The lighthouse", max_tokens=6, temperature=0
    )
    base_comp = c.completions.create(
        model=MODEL, prompt="The lighthouse", max_tokens=6, temperature=0
    )
    assert comp.model == "sql-lora" and comp.choices[0].text != base_comp.choices[0].text

    resp = c.responses.create(
        model="sql-lora", input="Tell me about the lighthouse", max_output_tokens=8, temperature=0
    )
    assert resp.model == "sql-lora" and resp.status in ("completed", "incomplete")
    follow = c.responses.create(
        model="sql-lora",
        input="And then?",
        max_output_tokens=4,
        previous_response_id=resp.id,
        temperature=0,
    )
    assert follow.model == "sql-lora"


def test_config_adapter_and_models_list_per_tenant(root: str, adapters: dict) -> None:
    load(root, "list-lora", adapters["two"], tenants=["initech"])
    globex, initech, outsider = (model_ids(root, t) for t in ("globex", "initech", "outsider"))
    assert globex[MODEL] is None and globex["cfg-lora"] == MODEL
    assert "list-lora" not in globex
    assert initech["list-lora"] == MODEL and "cfg-lora" not in initech
    assert set(outsider) == {"second"}  # adapters on a base it may not use stay hidden
    assert greedy(client(root, "globex"), "cfg-lora") != greedy(client(root, "globex"), MODEL)


def test_tenant_scoping_is_a_404_like_a_missing_model(root: str, adapters: dict) -> None:
    load(root, "scoped-lora", adapters["three"], tenants=["globex"])
    assert greedy(client(root, "globex"), "scoped-lora")
    missing = not_found(client(root, "initech"), "no-such-model")
    for tenant, name in (
        ("initech", "scoped-lora"),
        ("outsider", "scoped-lora"),
        ("initech", "cfg-lora"),
    ):
        body = not_found(client(root, tenant), name)
        assert body["code"] == missing["code"] == "model_not_found"
        assert body["message"] == missing["message"].replace("no-such-model", name)
        assert body["param"] == "model"


def test_unload_is_a_404_on_every_ingress_then_a_reload_gets_new_weights(
    root: str, adapters: dict
) -> None:
    c = client(root)
    first = load(root, "swap-lora", adapters["one"])
    before = greedy(c, "swap-lora")
    gone = unload(root, "swap-lora")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    ingresses: set[str] = set()
    for _ in range(40):  # until both ingress replicas have answered
        raw = httpx.post(
            f"{root}/v1/chat/completions",
            timeout=60,
            headers={"Authorization": f"Bearer {KEYS['globex']}"},
            json={"model": "swap-lora", "messages": PROMPT, "max_tokens": 2},
        )
        assert raw.status_code == 404 and raw.json()["error"]["code"] == "model_not_found"
        ingresses.add(raw.headers["x-tiered-ingress"])
        if len(ingresses) == 2:
            break
    assert len(ingresses) == 2
    assert "swap-lora" not in model_ids(root, "globex")
    again = unload(root, "swap-lora")
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "lora_adapter_not_found"
    configured = unload(root, "cfg-lora")  # the config's: only a config change removes it
    assert configured.status_code == 400
    assert configured.json()["error"]["code"] == "lora_adapter_in_config"

    second = load(root, "swap-lora", adapters["two"])
    assert second["version"] > first["version"]  # never reused: it keys the prefix cache
    after = greedy(c, "swap-lora")
    assert after != before
    assert after == greedy(c, "swap-lora")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"lora_path": "/x"}, 400, "lora_name"),
        ({"lora_name": "x"}, 400, "lora_path"),
        ({"lora_name": "bad name", "lora_path": "/x"}, 400, "lora_name"),
        ({"lora_name": "x", "lora_path": "/x", "rank": 8}, 400, "rank"),
        ({"lora_name": MODEL, "lora_path": "/x", "base_model": MODEL}, 400, "lora_name"),
        ({"lora_name": "x", "lora_path": "/x"}, 400, "base_model"),  # two bases: name one
        ({"lora_name": "x", "lora_path": "/x", "base_model": "nope"}, 400, "base_model"),
        ({"lora_name": "x", "lora_path": "/x", "base_model": "second"}, 400, "base_model"),
        (
            {"lora_name": "x", "lora_path": "/x", "base_model": MODEL, "tenants": ["nobody"]},
            400,
            "tenants.0",
        ),
        (
            {"lora_name": "x", "lora_path": "/x", "base_model": MODEL, "tenants": ["outsider"]},
            400,
            "tenants.0",
        ),
        ({"lora_name": "cfg-lora", "lora_path": "/x", "base_model": MODEL}, 400, "lora_name"),
        ([1, 2], 400, None),
    ],
)
def test_bad_load_requests_are_openai_400s(
    root: str, body: Any, status: int, param: str | None
) -> None:
    resp = admin_post(root, "/v1/load_lora_adapter", body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_admin_key_only(root: str) -> None:
    body = {"lora_name": "x", "lora_path": "/x", "base_model": MODEL}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert admin_post(root, path, body, key=KEYS["globex"]).status_code == 403
        assert admin_post(root, path, body, key="tk-nobody").status_code == 401
    assert httpx.post(f"{root}/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 401


@pytest.mark.parametrize(
    ("adapter", "param"),
    [
        ("missing", "lora_path"),
        ("corrupt", "lora_path"),
        ("rank32", "r"),
        ("wrong_base", "base_model_name_or_path"),
    ],
)
def test_bad_adapters_are_400s_and_the_replica_keeps_serving(
    root: str, adapters: dict, tmp_path: Path, adapter: str, param: str
) -> None:
    path = tmp_path / "does-not-exist" if adapter == "missing" else adapters[adapter]
    name = f"bad-{adapter}"
    resp = admin_post(
        root,
        "/v1/load_lora_adapter",
        {"lora_name": name, "lora_path": str(path), "base_model": MODEL},
    )
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["code"] == "lora_load_failed", error
    assert "\n" not in error["message"]
    c = client(root)
    assert not_found(c, name)["code"] == "model_not_found"  # never made visible
    assert greedy(c, MODEL)  # the replica that refused it still serves


def test_loading_while_the_replica_is_busy(root: str, adapters: dict) -> None:
    c = client(root, "initech")

    def stream() -> tuple[str | None, int]:
        chunks = list(
            c.chat.completions.create(
                model=MODEL,
                messages=PROMPT,
                max_tokens=48,
                temperature=0.8,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        finish = next(ch.choices[0].finish_reason for ch in reversed(chunks) if ch.choices)
        return finish, chunks[-1].usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(stream) for _ in range(4)]
        loaded = load(root, "busy-lora", adapters["three"])
        assert greedy(c, "busy-lora", n=4)
        results = [f.result(timeout=120) for f in running]
    assert loaded["load_seconds"] > 0  # a fresh version: really read and installed
    assert all(finish in ("length", "stop") and n > 0 for finish, n in results)


def test_ledger_and_admin_usage_carry_the_adapter(root: str, adapters: dict) -> None:
    load(root, "billed-lora", adapters["two"], tenants=["billed", "acme"])
    billed = client(root, "billed")
    for model in ("billed-lora", "billed-lora", MODEL):
        greedy(billed, model, n=3)
    # The dedicated tenant's adapter requests run on its private replica.
    raw = client(root, "acme").chat.completions.with_raw_response.create(
        model="billed-lora", messages=PROMPT, max_tokens=3, temperature=0
    )
    assert raw.headers["x-tiered-service-tier"] == "dedicated"
    assert raw.parse().model == "billed-lora"

    def rows(report: dict) -> dict[tuple[str, str], int]:
        return {(r["key"]["tenant"], r["key"]["adapter"]): r["requests"] for r in report["rows"]}

    report = wait_for_usage(
        root,
        KEYS["admin"],
        lambda rep: (
            rows(rep).get(("billed", "billed-lora")) == 2
            and rows(rep).get(("acme", "billed-lora")) == 1
        ),
        group_by="tenant,adapter",
    )
    got = rows(report)
    assert got[("billed", "")] == 1
    priced = wait_for_usage(
        root, KEYS["admin"], lambda rep: bool(rep["rows"]), tenant="billed", group_by="adapter"
    )
    lora_row = next(r for r in priced["rows"] if r["key"]["adapter"] == "billed-lora")
    assert lora_row["cost"] > 0  # billed at the base model's price


def test_a_dedicated_tenants_adapter_is_loaded_on_its_private_replica(
    root: str, adapters: dict
) -> None:
    loaded = load(root, "acme-lora", adapters["three"], tenants=["acme"])
    key = f"acme-lora@{loaded['version']}"

    def resident(deployment: str) -> list[str]:
        handle = serve.get_deployment_handle(deployment, app_name="lora")
        return list(handle.stats.remote().result(timeout_s=60)["loras_resident"])

    assert key in resident("dedicated-acme")
    assert key not in resident(f"shared-{MODEL}")  # the shared pool never needs it
    raw = client(root, "acme").chat.completions.with_raw_response.create(
        model="acme-lora", messages=PROMPT, max_tokens=3, temperature=0
    )
    assert raw.headers["x-tiered-service-tier"] == "dedicated"
    assert not_found(client(root, "initech"), "acme-lora")["code"] == "model_not_found"
