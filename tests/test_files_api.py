"""OpenAI's Files API end to end: real Serve on the session's Ray cluster, the official
openai SDK as the client, bytes in a local fsspec root, metadata in the state store."""

from __future__ import annotations

import json
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

KEYS = {t: f"tk-files-{t}" for t in ("globex", "initech")}
MAX_BYTES = 4096
EXAMPLE = {
    "messages": [
        {"role": "user", "content": "Say the word"},
        {"role": "assistant", "content": "lighthouse"},
    ]
}
GOOD = (json.dumps(EXAMPLE) + "\n") * 3


def _config(model_dir: Path, files_root: Path) -> TieredConfig:
    return TieredConfig.model_validate(
        {
            "models": [
                {
                    "name": "tiny-llama",
                    "path": str(model_dir),
                    "engine": {"num_kv_blocks": 64},
                    "shared_pool": {"num_replicas": 0},
                }
            ],
            "tenants": [{"name": t, "api_key_hashes": [hash_key(k)]} for t, k in KEYS.items()],
            "ingress": {"num_replicas": 1},
            "state": {"url": f"sqlite+aiosqlite:///{state_dir() / 'files.db'}"},
            "files": {"root": str(files_root), "max_bytes": MAX_BYTES},
        }
    )


@pytest.fixture(scope="module")
def files_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("files-root")


@pytest.fixture(scope="module")
def root(ray_cluster, tiny_model_dir: Path, files_root: Path) -> Any:
    serve.run(
        build_from_config(_config(tiny_model_dir, files_root)), name="files", route_prefix="/"
    )
    yield f"http://127.0.0.1:{ray_cluster.serve_port}"
    serve.delete("files")


def client(root: str, tenant: str = "globex") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{root}/v1", api_key=KEYS[tenant], max_retries=0, timeout=60)


def upload(c: openai.OpenAI, data: str | bytes, name: str = "train.jsonl") -> Any:
    raw = data.encode() if isinstance(data, str) else data
    return c.files.create(file=(name, raw), purpose="fine-tune")


def bad_upload(c: openai.OpenAI, data: str | bytes) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as err:
        upload(c, data)
    body = err.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    return body


def test_upload_read_list_download_delete(root: str, files_root: Path) -> None:
    c = client(root)
    made = upload(c, GOOD)
    assert made.id.startswith("file-") and made.object == "file"
    assert (made.bytes, made.filename, made.purpose, made.status) == (
        len(GOOD),
        "train.jsonl",
        "fine-tune",
        "processed",
    )
    assert (files_root / "globex" / made.id).read_text() == GOOD  # the bytes, in the root

    got = c.files.retrieve(made.id)
    assert (got.id, got.bytes, got.created_at) == (made.id, made.bytes, made.created_at)
    assert c.files.content(made.id).content == GOOD.encode()

    second = upload(c, GOOD, name="second.jsonl")
    listed = [f.id for f in c.files.list()]
    assert listed[:2] == [second.id, made.id]  # newest first
    first_page = c.files.list(limit=1)
    assert [f.id for f in first_page.data] == [second.id] and first_page.has_more
    after = c.files.list(limit=1, after=second.id)
    assert [f.id for f in after.data] == [made.id]
    assert [f.id for f in c.files.list(order="asc")][-2:] == [made.id, second.id]

    gone = c.files.delete(made.id)
    assert (gone.id, gone.deleted) == (made.id, True)
    assert not (files_root / "globex" / made.id).exists()
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        c.files.delete(made.id)
    assert made.id not in [f.id for f in c.files.list()]


def test_another_tenants_file_is_a_404_like_a_missing_one(root: str) -> None:
    mine = upload(client(root, "globex"), GOOD)
    other = client(root, "initech")
    for call in (other.files.retrieve, other.files.content, other.files.delete):
        with pytest.raises(openai.NotFoundError) as err:
            call(mine.id)
        missing = "file-" + "0" * 24
        with pytest.raises(openai.NotFoundError) as err_missing:
            call(missing)
        assert (
            err.value.body["message"].replace(mine.id, missing) == err_missing.value.body["message"]
        )
    assert mine.id not in [f.id for f in other.files.list()]
    assert client(root, "globex").files.retrieve(mine.id).id == mine.id  # still there


def test_malformed_jsonl_is_a_400_naming_the_line_and_reason(root: str) -> None:
    c = client(root)
    body = bad_upload(c, json.dumps(EXAMPLE) + "\n{oops\n")
    assert body["code"] == "invalid_file_format" and body["param"] == "file"
    assert "line 2: not valid JSON" in body["message"]
    no_reply = {"messages": [{"role": "user", "content": "hi"}]}
    body = bad_upload(c, json.dumps(EXAMPLE) + "\n\n" + json.dumps(no_reply))
    assert "line 3: no assistant message" in body["message"]
    body = bad_upload(c, json.dumps({"messages": [{"role": "robot", "content": "x"}]}))
    assert "line 1: messages[0].role" in body["message"]
    assert "empty" in bad_upload(c, "")["message"]
    assert "empty" in bad_upload(c, "\n\n")["message"]


def test_size_purpose_and_form_errors(root: str) -> None:
    c = client(root)
    with pytest.raises(openai.APIStatusError) as err:
        upload(c, (json.dumps(EXAMPLE) + "\n") * (MAX_BYTES // 60 + 2))
    assert err.value.status_code == 413 and err.value.body["code"] == "file_too_large"
    with pytest.raises(openai.BadRequestError) as bad:
        c.files.create(file=("t.jsonl", GOOD.encode()), purpose="assistants")
    assert bad.value.body["param"] == "purpose"
    headers = {"Authorization": f"Bearer {KEYS['globex']}"}
    as_form = {"purpose": (None, "fine-tune")}  # a multipart body with no file part
    no_file = httpx.post(f"{root}/v1/files", files=as_form, headers=headers)
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    as_json = httpx.post(f"{root}/v1/files", json={"purpose": "fine-tune"}, headers=headers)
    assert as_json.status_code == 400 and "multipart" in as_json.json()["error"]["message"]
    extra = httpx.post(
        f"{root}/v1/files",
        data={"purpose": "fine-tune", "colour": "blue"},
        files={"file": ("t.jsonl", GOOD.encode())},
        headers=headers,
    )
    assert extra.status_code == 400 and extra.json()["error"]["param"] == "colour"
    anonymous = httpx.get(f"{root}/v1/files")
    assert anonymous.status_code == 401
    with pytest.raises(openai.BadRequestError) as cursor:
        c.files.list(after="file-nope")
    assert cursor.value.body["param"] == "after"
