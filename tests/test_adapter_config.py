"""`models[].adapters` in the Tiered YAML and the engine's LoRA settings: every mistake
fails at load with one line naming the field, through the real YAML loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deployments.config.models import ConfigError, ModelSpec, ReplicaSpec, local_adapter_dir
from deployments.config.tiered import TieredConfig, load_config


def _adapter_dir(tmp_path: Path, name: str = "sql") -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return path


def _config(adapters: list[dict], **model: object) -> dict:
    return {
        "models": [
            {"name": "base", "path": "default:tiny", "adapters": adapters, **model},
            {"name": "other", "path": "default:tiny"},
        ],
        "tenants": [{"name": "acme"}, {"name": "globex", "models": ["other"]}],
    }


def _load(tmp_path: Path, config: dict) -> TieredConfig:
    path = tmp_path / "tiered.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


def test_adapters_load_with_engine_lora_settings(tmp_path: Path) -> None:
    local = _adapter_dir(tmp_path)
    config = _load(
        tmp_path,
        _config(
            [
                {"name": "sql-lora", "path": str(local), "tenants": ["acme"]},
                {"name": "org/chat:v2", "path": "s3://bucket/chat"},  # remote: the replicas read it
                {"name": "file-lora", "path": f"file://{local}"},
            ],
            engine={"max_loras": 2, "max_lora_rank": 64, "max_cpu_loras": 8},
        ),
    )
    base = config.models[0]
    assert [a.name for a in base.adapters] == ["sql-lora", "org/chat:v2", "file-lora"]
    assert base.adapters[0].tenants == ["acme"] and base.adapters[1].tenants == []
    engine = base.engine_config(ReplicaSpec(), 0, "/ckpt")
    assert (engine.max_loras, engine.max_lora_rank, engine.max_cpu_loras) == (2, 64, 8)
    assert engine.served_model_name == "base"


def test_lora_is_on_by_default_for_hot_loading() -> None:
    engine = ModelSpec(name="m").engine_config(ReplicaSpec(), 0, "/ckpt")
    assert (engine.max_loras, engine.max_lora_rank, engine.max_cpu_loras) == (4, 16, None)


def test_local_adapter_dir() -> None:
    assert local_adapter_dir("/a/b") == Path("/a/b")
    assert local_adapter_dir("file:///a/b") == Path("/a/b")
    assert local_adapter_dir("s3://bucket/key") is None
    assert local_adapter_dir("gs://bucket/key") is None


@pytest.mark.parametrize(
    ("adapters", "model", "message"),
    [
        (
            [{"name": "base", "path": "s3://b/k"}],
            {},
            r"models\[0\]\.adapters\[0\]\.name: 'base' is the name of a base model",
        ),
        (
            [{"name": "other", "path": "s3://b/k"}],
            {},
            r"models\[0\]\.adapters\[0\]\.name: 'other' is the name of a base model",
        ),
        (
            [{"name": "x", "path": "s3://b/1"}, {"name": "x", "path": "s3://b/2"}],
            {},
            r"models\[0\]\.adapters\[1\]\.name: 'x' is already the name of "
            r"models\[0\]\.adapters\[0\]",
        ),
        (
            [{"name": "bad name", "path": "s3://b/k"}],
            {},
            r"models\[0\]\.adapters\[0\]\.name: String should match pattern",
        ),
        ([{"name": "x", "path": ""}], {}, r"models\[0\]\.adapters\[0\]\.path: String should"),
        ([{"name": "x"}], {}, r"models\[0\]\.adapters\[0\]\.path: Field required"),
        (
            [{"name": "x", "path": "s3://b/k", "rank": 8}],
            {},
            r"models\[0\]\.adapters\[0\]\.rank: Extra inputs are not permitted",
        ),
        (
            [{"name": "x", "path": "s3://b/k", "tenants": ["nobody"]}],
            {},
            r"models\[0\]\.adapters\[0\]\.tenants\[0\]: unknown tenant 'nobody'",
        ),
        (
            [{"name": "x", "path": "s3://b/k", "tenants": ["acme", "globex"]}],
            {},
            r"models\[0\]\.adapters\[0\]\.tenants\[1\]: tenant 'globex' may not use the base "
            r"model 'base'",
        ),
        (
            [{"name": "x", "path": "s3://b/k"}],
            {"engine": {"max_loras": 0}},
            r"models\[0\]\.engine\.max_loras: 0 turns LoRA off, but the model lists 1 adapter",
        ),
        ([], {"engine": {"max_lora_rank": 0}}, r"models\[0\]\.engine\.max_lora_rank: Input should"),
        ([], {"engine": {"max_cpu_loras": 0}}, r"models\[0\]\.engine\.max_cpu_loras: Input should"),
    ],
)
def test_adapter_errors_name_the_field(
    tmp_path: Path, adapters: list[dict], model: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        _load(tmp_path, _config(adapters, **model))
    assert "\n" not in str(err.value)


def test_a_local_adapter_needs_its_adapter_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    config = _config([{"name": "x", "path": str(tmp_path / "empty")}])
    with pytest.raises(ConfigError, match=r"models\[0\]\.adapters\[0\]\.path: no adapter_config"):
        _load(tmp_path, config)
    # Tools that run where the files are not (`tiered config render`) skip the check.
    path = tmp_path / "tiered.yaml"
    assert load_config(path, checkpoints=False).models[0].adapters[0].name == "x"
