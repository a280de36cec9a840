"""Fine-tuning end to end on CPU with the tiny default model: real Serve on the session's
Ray cluster, the official openai SDK as the client, training as a Ray task, `peft` as the
reference for the checkpoint.

Upload a JSONL that teaches a fixed reply, create a job, poll it to `succeeded`; the loss
fell, the `ft:` model gives the taught reply where the base does not, only its tenant sees
it, and the checkpoint loads in peft with the server's logits. Then a file that fails in
training, a cancel mid-run, and requests refused with OpenAI's 4xx.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from ray import serve

from deployments.app import build_from_config
from deployments.config.tiered import TieredConfig
from deployments.state.config import state_dir
from deployments.tenancy.keys import hash_key
from models.chat_data import parse_chat_jsonl
from models.finetune import encode_example
from models.tokenizer import Tokenizer
from tests.lora_adapters import PeftReference
from tests.serve_helpers import wait_for_usage

pytest.importorskip("peft")

KEYS = {t: f"tk-ft-{t}" for t in ("globex", "initech", "hooli")}
ADMIN_KEY = "tk-ft-admin"
TRAINING_PRICE = 3.0  # per 1M trained tokens
MODEL = "tiny-llama"
REPLY = "The lighthouse keeper sleeps at noon."
QUESTIONS = [f"Question number {i}: what does the keeper do?" for i in range(8)]
N_EPOCHS, BATCH = 6, 4  # 12 steps
MAX_SEQ_LEN = 96
TOL = 1e-4  # as tests/test_lora_reference.py
MAX_ACTIVE = 2
DAILY_EPOCHS = 200  # the daily token limit, in epochs of training_jsonl()


def _config(model_dir: Path, files_root: Path) -> TieredConfig:
    daily_tokens = DAILY_EPOCHS * epoch_tokens(model_dir, training_jsonl())
    engine = {"num_kv_blocks": 128, "max_num_seqs": 4, "max_loras": 2}
    return TieredConfig.model_validate(
        {
            "models": [
                {"name": MODEL, "path": str(model_dir), "engine": engine,
                 "shared_pool": {"num_replicas": 1}},
                {"name": "no-lora", "path": str(model_dir),
                 "engine": {"num_kv_blocks": 16, "max_loras": 0},
                 "shared_pool": {"num_replicas": 0}},
            ],
            "tenants": [{"name": t, "api_key_hashes": [hash_key(k)]} for t, k in KEYS.items()],
            "admin_key_hashes": [hash_key(ADMIN_KEY)],
            "ingress": {"num_replicas": 1},
            "state": {"url": f"sqlite+aiosqlite:///{state_dir() / 'ft.db'}"},
            "prices": {"tokens": [{"model": MODEL, "tier": "training",
                                   "input_per_1m": TRAINING_PRICE, "output_per_1m": 0}]},
            "files": {"root": str(files_root)},
            "fine_tuning": {"base_learning_rate": 1e-3, "max_seq_len": MAX_SEQ_LEN,
                            "poll_interval_s": 0.2, "lora": {"r": 8, "alpha": 16},
                            "max_active_jobs_per_tenant": MAX_ACTIVE,
                            "max_tokens_per_tenant_per_day": daily_tokens},
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def files_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ft-files")


@pytest.fixture(scope="module")
def root(ray_cluster, tiny_model_dir: Path, files_root: Path) -> Any:
    serve.run(build_from_config(_config(tiny_model_dir, files_root)), name="ft", route_prefix="/")
    yield f"http://127.0.0.1:{ray_cluster.serve_port}"
    serve.delete("ft")


def client(root: str, tenant: str = "globex") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{root}/v1", api_key=KEYS[tenant], max_retries=0, timeout=60)


def training_jsonl() -> str:
    lines = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": REPLY}]}
        for q in QUESTIONS
    ]
    return "".join(json.dumps(line) + "\n" for line in lines)


def epoch_tokens(model_dir: Path, text: str) -> int:
    """One epoch's trained tokens (OpenAI's count: every token of every example)."""
    tokenizer = Tokenizer.from_pretrained(model_dir)
    return sum(len(encode_example(tokenizer, e).ids) for e in parse_chat_jsonl(text.encode()))


def upload(c: openai.OpenAI, text: str) -> str:
    return c.files.create(file=("train.jsonl", text.encode()), purpose="fine-tune").id


def wait_for(c: openai.OpenAI, job_id: str, done: Callable[[Any], bool], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if done(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job.status} after {timeout_s}s: {job}")
        time.sleep(0.3)


def training_workers() -> list[int]:
    """Pids of the Ray workers running a training task now (Ray titles a worker's process
    `ray::<task name>` while it runs one)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # not a process, or gone meanwhile
            continue
        if cmdline.startswith(b"ray::fine-tuning-task"):
            pids.append(int(proc.name))
    return pids


def finished(job: Any) -> bool:
    return job.status in ("succeeded", "failed", "cancelled")


def greedy(c: openai.OpenAI, model: str, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    resp = c.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    return resp.choices[0].message.content or ""


def test_a_job_trains_the_tenants_model_and_serves_it(
    root: str, tiny_model_dir: Path, files_root: Path
) -> None:
    c = client(root)
    training_file = upload(c, training_jsonl())
    validation_file = upload(c, "".join(training_jsonl().splitlines(keepends=True)[:2]))
    job = c.fine_tuning.jobs.create(
        model=MODEL,
        training_file=training_file,
        validation_file=validation_file,
        suffix="keeper",
        seed=11,
        hyperparameters={"n_epochs": N_EPOCHS, "batch_size": BATCH,
                         "learning_rate_multiplier": 10},
        metadata={"team": "lights"},
    )  # fmt: skip
    assert (job.status, job.model, job.training_file, job.seed) == (
        "validating_files",
        MODEL,
        training_file,
        11,
    )
    assert job.metadata == {"team": "lights"} and job.fine_tuned_model is None
    assert job.hyperparameters.n_epochs == N_EPOCHS and job.hyperparameters.batch_size == BATCH

    done = wait_for(c, job.id, finished, timeout_s=240)
    assert done.status == "succeeded", done.error
    name = f"ft:{MODEL}:globex:keeper:{job.id}"
    assert done.fine_tuned_model == name and done.finished_at is not None
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    per_epoch = sum(
        len(encode_example(tokenizer, e).ids) for e in parse_chat_jsonl(training_jsonl().encode())
    )
    assert done.trained_tokens == N_EPOCHS * per_epoch

    # Metering: the trained tokens are one ledger row of tier "training", at its price.
    def billed(report: dict[str, Any]) -> bool:
        return any(r["key"] == {"tenant": "globex", "tier": "training"} for r in report["rows"])

    report = wait_for_usage(root, ADMIN_KEY, billed, group_by="tenant,tier")
    row = next(r for r in report["rows"] if r["key"] == {"tenant": "globex", "tier": "training"})
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (
        1,
        done.trained_tokens,
        0,
    )
    assert row["cost"] == pytest.approx(done.trained_tokens * TRAINING_PRICE / 1e6, abs=1e-6)

    # Events: one metrics event per step, the loss fell; statuses went through OpenAI's.
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=100))
    steps = sorted((e.data["step"], e.data["train_loss"]) for e in events if e.type == "metrics")
    total = N_EPOCHS * math.ceil(len(QUESTIONS) / BATCH)
    assert [s for s, _ in steps] == list(range(1, total + 1))
    assert steps[-1][1] < 0.2 * steps[0][1], steps
    messages = [e.message for e in events]
    assert "Created fine-tuning job" in messages and any("completed" in m for m in messages)

    checkpoints = list(c.fine_tuning.jobs.checkpoints.list(job.id))
    per = total // N_EPOCHS
    assert [k.step_number for k in checkpoints] == [per * e for e in range(N_EPOCHS, 0, -1)]
    assert checkpoints[0].fine_tuning_job_id == job.id
    valid = [k.metrics.valid_loss for k in checkpoints]  # newest first
    assert all(v is not None for v in valid) and valid[0] < 0.2 * valid[-1], valid
    assert checkpoints[0].metrics.train_loss == pytest.approx(steps[-1][1] / 2 + steps[-2][1] / 2)
    assert len(done.result_files) == 1
    csv = c.files.content(done.result_files[0]).text.splitlines()
    assert csv[0] == "step,epoch,train_loss,trained_tokens" and len(csv) == total + 1

    # Served at once, to this tenant only.
    models = {m.id: getattr(m, "parent", None) for m in c.models.list()}
    assert models[name] == MODEL
    other = client(root, "initech")
    assert name not in {m.id for m in other.models.list()}
    with pytest.raises(openai.NotFoundError) as err:
        greedy(other, name, QUESTIONS[0])
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)

    asked = [*QUESTIONS[:4], "What does the keeper do?"]
    tuned = [greedy(c, name, q) for q in asked]
    base = [greedy(c, MODEL, q) for q in asked]
    assert sum(t.startswith(REPLY) for t in tuned) > sum(b.startswith(REPLY) for b in base)
    assert sum(t.startswith(REPLY) for t in tuned) >= 4

    # The checkpoint as PEFT loads it gives the server's numbers.
    ckpt = files_root / "globex" / job.id / f"checkpoint-{total}"
    reference = PeftReference(tiny_model_dir, {"ft": ckpt})
    prompt = [{"role": "user", "content": QUESTIONS[5]}]
    ids = tokenizer.encode_chat(prompt)
    resp = c.chat.completions.create(
        model=name, messages=prompt, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5
    )
    served_top = sorted((t.logprob for t in resp.choices[0].logprobs.content[0].top_logprobs),
                        reverse=True)  # fmt: skip
    peft_top = torch.log_softmax(reference.logits("ft", ids)[-1], -1).topk(5).values.tolist()
    assert max(abs(a - b) for a, b in zip(served_top, peft_top, strict=True)) <= TOL
    peft_text = tokenizer.decode(reference.greedy("ft", ids, 8))
    assert resp.choices[0].message.content == peft_text

    # Deleting the model: only its tenant may, and then it is gone for every request.
    with pytest.raises(openai.NotFoundError):
        other.models.delete(name)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        c.models.delete(MODEL)
    assert denied.value.body["code"] == "model_not_deletable"
    deleted = c.models.delete(name)
    assert (deleted.id, deleted.deleted) == (name, True)
    assert name not in {m.id for m in c.models.list()}
    with pytest.raises(openai.NotFoundError):
        greedy(c, name, QUESTIONS[0])
    with pytest.raises(openai.NotFoundError):
        c.models.delete(name)
    assert c.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == name  # the job stays


def test_killing_the_training_worker_resumes_from_the_last_checkpoint(
    root: str, tiny_model_dir: Path
) -> None:
    c = client(root)
    epochs, batch = 50, 2
    job = c.fine_tuning.jobs.create(
        model=MODEL, training_file=upload(c, training_jsonl()),
        hyperparameters={"n_epochs": epochs, "batch_size": batch},
    )  # fmt: skip
    wait_for(
        c, job.id,
        lambda j: j.status == "running" and bool(list(c.fine_tuning.jobs.checkpoints.list(j.id))),
        timeout_s=180,
    )  # fmt: skip
    workers = training_workers()
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)
    assert c.fine_tuning.jobs.retrieve(job.id).status == "running"  # killed mid-run

    done = wait_for(c, job.id, finished, timeout_s=300)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100)]
    interrupted = [m for m in messages if m.startswith("Training was interrupted")]
    assert len(interrupted) == 1 and "WorkerCrashedError" in interrupted[0]
    resumed_at = interrupted[0].rsplit("resuming from ", 1)[1]
    steps = {k.step_number for k in c.fine_tuning.jobs.checkpoints.list(job.id)}
    assert resumed_at.startswith("checkpoint-") and int(resumed_at.split("-")[1]) in steps
    assert f"Resuming from checkpoint {resumed_at}" in messages
    assert "Training started (attempt 2)" in messages
    total = epochs * math.ceil(len(QUESTIONS) / batch)
    assert steps == {total // epochs * e for e in range(1, epochs + 1)}
    assert done.trained_tokens == epochs * epoch_tokens(tiny_model_dir, training_jsonl())
    csv = c.files.content(done.result_files[0]).text.splitlines()
    assert [int(line.split(",")[0]) for line in csv[1:]] == list(range(1, total + 1))


def test_a_tenant_may_have_only_so_many_active_jobs(root: str) -> None:
    c = client(root, "initech")
    file_id = upload(c, training_jsonl())
    hp = {"n_epochs": 50, "batch_size": 1}
    jobs = [c.fine_tuning.jobs.create(model=MODEL, training_file=file_id, hyperparameters=hp)
            for _ in range(MAX_ACTIVE)]  # fmt: skip
    with pytest.raises(openai.RateLimitError) as err:
        c.fine_tuning.jobs.create(model=MODEL, training_file=file_id)
    assert err.value.body["code"] == "too_many_active_jobs"
    for job in jobs:
        assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    listed = [j.id for j in c.fine_tuning.jobs.list(limit=MAX_ACTIVE)]
    assert listed == [j.id for j in reversed(jobs)]  # newest first
    again = c.fine_tuning.jobs.create(model=MODEL, training_file=file_id)
    assert c.fine_tuning.jobs.cancel(again.id).status == "cancelled"


def test_a_tenants_jobs_may_train_only_so_many_tokens_a_day(
    root: str, tiny_model_dir: Path
) -> None:
    c = client(root, "hooli")
    per_epoch = epoch_tokens(tiny_model_dir, training_jsonl())
    limit = DAILY_EPOCHS * per_epoch
    four = upload(c, training_jsonl() * 4)  # 50 epochs of it: the whole day's tokens
    whole_day = c.fine_tuning.jobs.create(
        model=MODEL, training_file=four, hyperparameters={"n_epochs": 50, "batch_size": 1}
    )
    one_more = {"training_file": upload(c, training_jsonl()), "hyperparameters": {"n_epochs": 1}}
    with pytest.raises(openai.RateLimitError) as err:
        c.fine_tuning.jobs.create(model=MODEL, **one_more)
    assert err.value.body["code"] == "daily_token_limit_exceeded"
    message = err.value.body["message"]
    assert f"would train {per_epoch} tokens" in message and f"limit of {limit} tokens" in message
    assert c.fine_tuning.jobs.cancel(whole_day.id).status == "cancelled"
    listed = [j.id for j in c.fine_tuning.jobs.list()]
    assert listed == [whole_day.id]  # the refused create wrote no job


def test_a_file_unusable_in_training_fails_the_job_with_the_reason(root: str) -> None:
    c = client(root)
    long = " ".join(["lighthouse"] * 200)
    bad = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": long}]})  # fmt: skip
    job = c.fine_tuning.jobs.create(model=MODEL, training_file=upload(c, bad + "\n"))
    done = wait_for(c, job.id, finished, timeout_s=120)
    assert done.status == "failed" and done.fine_tuned_model is None
    assert done.error.code == "invalid_training_file" and done.error.param == "training_file"
    assert f"over the limit of {MAX_SEQ_LEN}" in done.error.message
    assert "line 1" in done.error.message


def test_cancel_mid_run(root: str) -> None:
    c = client(root)
    job = c.fine_tuning.jobs.create(
        model=MODEL, training_file=upload(c, training_jsonl()),
        hyperparameters={"n_epochs": 50, "batch_size": 1},
    )  # fmt: skip

    def training(j: Any) -> bool:
        metrics = [e for e in c.fine_tuning.jobs.list_events(j.id) if e.type == "metrics"]
        return j.status == "running" and len(metrics) >= 2

    wait_for(c, job.id, training, timeout_s=120)
    cancelled = c.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    stopped = wait_for(
        c, job.id,
        lambda j: any(e.message == "The job was cancelled" for e in
                      c.fine_tuning.jobs.list_events(j.id)),
        timeout_s=60,
    )  # fmt: skip
    assert stopped.status == "cancelled" and stopped.fine_tuned_model is None
    steps = [e for e in c.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert len(steps) < 50 * len(QUESTIONS)
    with pytest.raises(openai.BadRequestError) as err:
        c.fine_tuning.jobs.cancel(job.id)
    assert err.value.body["code"] == "job_not_cancellable"


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"model": "no-such-model"}, 404, "model"),
        ({"model": "no-lora"}, 400, "model"),
        ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": 1000}}, 400, "hyperparameters.batch_size"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, 400,
         "hyperparameters.learning_rate_multiplier"),
        ({"method": {"type": "dpo"}}, 400, "method.type"),
        ({"suffix": "has spaces"}, 400, "suffix"),
        ({"training_file": "file-" + "0" * 24}, 400, "training_file"),
        ({"validation_file": "file-" + "1" * 24}, 400, "validation_file"),
    ],
)  # fmt: skip
def test_bad_job_requests_are_openai_4xx(
    root: str, change: dict[str, Any], status: int, param: str
) -> None:
    c = client(root)
    body = {"model": MODEL, "training_file": upload(c, training_jsonl()), **change}
    with pytest.raises(openai.APIStatusError) as err:
        c.fine_tuning.jobs.create(**body)
    assert err.value.status_code == status
    assert err.value.body["param"] == param, err.value.body


def test_another_tenants_file_and_job_ids_are_refused_like_missing_ones(root: str) -> None:
    theirs = upload(client(root, "initech"), training_jsonl())
    c = client(root)
    with pytest.raises(openai.BadRequestError) as err:
        c.fine_tuning.jobs.create(model=MODEL, training_file=theirs)
    missing = "file-" + "2" * 24
    with pytest.raises(openai.BadRequestError) as err_missing:
        c.fine_tuning.jobs.create(model=MODEL, training_file=missing)
    assert err.value.body["message"].replace(theirs, missing) == err_missing.value.body["message"]
    for call in (
        c.fine_tuning.jobs.retrieve,
        c.fine_tuning.jobs.cancel,
        c.fine_tuning.jobs.list_events,
        c.fine_tuning.jobs.checkpoints.list,
    ):
        with pytest.raises(openai.NotFoundError):
            call("ftjob-" + "3" * 24)  # fmt: skip
