"""One fine-tuning job's training, as the body of a Ray task (models.finetune does the work).

The task reads the training file from the files root, trains, writes each step's loss as a
metrics event and each epoch's checkpoint (PEFT format) to the files root plus a
checkpoint row, and ends with a metrics CSV as a result file. It writes to the state store
itself (through `JobReporter`), so events survive the runner; it stops at the next step
once the job reads `cancelled`. What it returns, the runner applies: the adapter to
register, or the error a bad file earned. A resumed task (after its worker was lost)
starts from the job's last checkpoint and replays the same batches.
"""

from __future__ import annotations

import asyncio
import csv
import io
import tempfile
import threading
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from deployments.config.fine_tuning import FilesSpec, LoRATrainingSpec
from deployments.state.blobs import BlobStore
from deployments.state.config import StateSpec
from deployments.state.files import FileStore, StoredFile
from deployments.state.jobs import JobStore, StoredJob
from deployments.state.store import StateStore
from models.chat_data import ChatDataError, parse_chat_jsonl
from models.finetune import CheckpointReport, LoRATrainer, StepReport, TrainConfig, encode_dataset
from models.lora_train import LoRAShape

T = TypeVar("T")
CALL_TIMEOUT_S = 60.0
RESULTS_PURPOSE = "fine-tune-results"


@dataclass(frozen=True)
class TrainingAssignment:
    """Everything the task needs; built by the runner, pickled to the worker."""

    job: StoredJob
    state: StateSpec
    files: FilesSpec
    model_path: str
    lora: LoRATrainingSpec
    base_learning_rate: float
    max_seq_len: int


@dataclass(frozen=True)
class TrainingOutcome:
    status: Literal["succeeded", "failed", "cancelled"]
    trained_tokens: int
    adapter_path: str | None = None  # an fsspec URI or local directory the engine loads
    result_file: str | None = None
    error: dict[str, Any] | None = None


def checkpoint_key(job: StoredJob, step: int) -> str:
    return f"{job.tenant}/{job.id}/checkpoint-{step}"


class JobReporter:
    """The state store from synchronous training code: a private event loop on a thread."""

    def __init__(self, spec: StateSpec, job: StoredJob) -> None:
        self.job = job
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.store = StateStore.connect(spec)
        self.jobs = JobStore(self.store)
        self.files = FileStore(self.store)

    def call(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(CALL_TIMEOUT_S)

    def event(self, message: str, **kw: Any) -> None:
        self.call(self.jobs.add_event(self.job, datetime.now(UTC), message, **kw))

    def cancelled(self) -> bool:
        job = self.call(self.jobs.get(None, self.job.id))
        return job is None or job.status == "cancelled"

    def close(self) -> None:
        try:
            self.call(self.store.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CALL_TIMEOUT_S)


def _invalid(file_id: str, param: str, exc: Exception) -> dict[str, Any]:
    return {
        "code": "invalid_training_file" if param == "training_file" else "invalid_validation_file",
        "message": f"The {param.replace('_', ' ')} {file_id} is not usable: {exc}",
        "param": param,
    }


def _metrics_csv(steps: dict[int, dict[str, Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["step", "epoch", "train_loss", "trained_tokens"])
    for step in sorted(steps):
        s = steps[step]
        writer.writerow([step, s["epoch"], f"{s['train_loss']:.6f}", s["trained_tokens"]])
    return out.getvalue().encode()


class TrainingRun:
    def __init__(self, a: TrainingAssignment, reporter: JobReporter) -> None:
        self.a, self.rep = a, reporter
        self.job = a.job
        self.blobs = BlobStore(a.files.root)

    def _read(self, file_id: str) -> bytes:
        stored = self.rep.call(self.rep.files.get(self.job.tenant, file_id))
        if stored is None:
            raise FileNotFoundError(f"{file_id} was deleted")
        return self.blobs.get(stored.path)

    def run(self) -> TrainingOutcome:
        job, a = self.job, self.a
        hp = job.hyperparameters
        config = TrainConfig(
            model_path=a.model_path,
            base_name=job.model,
            lora=LoRAShape(a.lora.r, a.lora.alpha, tuple(a.lora.targets)),
            learning_rate=a.base_learning_rate * hp.learning_rate_multiplier,
            n_epochs=hp.n_epochs,
            batch_size=hp.batch_size,
            seed=job.seed,
            max_seq_len=a.max_seq_len,
        )
        trainer = LoRATrainer(config)
        inputs = [("training_file", job.training_file)]
        if job.validation_file:
            inputs.append(("validation_file", job.validation_file))
        encoded = {}
        for param, file_id in inputs:
            try:
                examples = parse_chat_jsonl(self._read(file_id))
                encoded[param] = encode_dataset(trainer.tokenizer, examples, a.max_seq_len)
            except (ChatDataError, FileNotFoundError) as exc:
                return TrainingOutcome("failed", 0, error=_invalid(file_id, param, exc))
        data, valid = encoded["training_file"], encoded.get("validation_file")
        resume = None
        with tempfile.TemporaryDirectory(prefix="tiered-ft-") as work:
            if job.resume_from:
                resume = self.blobs.get_dir(job.resume_from, Path(work) / "resume")
                self.rep.event(f"Resuming from checkpoint {job.resume_from.rsplit('/', 1)[-1]}")
            else:
                self.rep.event(f"Fine-tuning job started: {len(data)} examples")
            result = trainer.train(
                data,
                Path(work) / "out",
                on_step=self._on_step,
                on_checkpoint=lambda c: self._on_checkpoint(trainer, c, valid),
                resume=resume,
            )
        if result.stopped:
            return TrainingOutcome("cancelled", result.trained_tokens)
        result_file = self._result_file()
        last = checkpoint_key(job, result.steps)
        return TrainingOutcome(
            "succeeded", result.trained_tokens, self.blobs.uri(last), result_file
        )

    def _on_step(self, report: StepReport) -> bool:
        data = {
            "step": report.step,
            "train_loss": report.train_loss,
            "total_steps": report.total_steps,
            "epoch": report.epoch,
            "trained_tokens": report.trained_tokens,
        }
        self.rep.event(
            f"Step {report.step}/{report.total_steps}: training loss={report.train_loss:.4f}",
            type="metrics",
            data=data,
        )
        now = datetime.now(UTC)
        self.rep.call(
            self.rep.jobs.update(
                self.job.id, heartbeat_at=now, trained_tokens=report.trained_tokens
            )
        )
        return not self.rep.cancelled()

    def _on_checkpoint(
        self, trainer: LoRATrainer, saved: CheckpointReport, valid: list[Any] | None
    ) -> None:
        key = checkpoint_key(self.job, saved.step)
        self.blobs.put_dir(key, saved.path)
        metrics: dict[str, Any] = {"step": saved.step, "train_loss": saved.train_loss}
        if valid:
            metrics["valid_loss"] = trainer.evaluate(valid)
        self.rep.call(
            self.rep.jobs.add_checkpoint(self.job, datetime.now(UTC), saved.step, metrics, key)
        )
        self.rep.call(self.rep.jobs.update(self.job.id, resume_from=key))
        self.rep.event(f"Checkpoint created at step {saved.step}", data=metrics)

    def _result_file(self) -> str:
        """step_metrics.csv from the job's metrics events: every attempt's, a step
        replayed after a resume counted once (its last run)."""
        events, _ = self.rep.call(self.rep.jobs.events(self.job.tenant, self.job.id, None, 10**6))
        steps: dict[int, dict[str, Any]] = {}
        for event in reversed(events):  # oldest first: a replayed step's last run wins
            if event.type == "metrics" and event.data is not None:
                steps[int(event.data["step"])] = event.data
        file_id = "file-" + uuid.uuid4().hex[:24]
        data = _metrics_csv(steps)
        stored = StoredFile(
            id=file_id,
            tenant=self.job.tenant,
            purpose=RESULTS_PURPOSE,
            filename="step_metrics.csv",
            bytes=len(data),
            path=f"{self.job.tenant}/{file_id}",
            created_at=datetime.now(UTC),
            examples=0,
        )
        self.blobs.put(stored.path, data)
        self.rep.call(self.rep.files.create(stored))
        return file_id


def run_training(assignment: TrainingAssignment) -> TrainingOutcome:
    """The Ray task's body."""
    reporter = JobReporter(assignment.state, assignment.job)
    try:
        return TrainingRun(assignment, reporter).run()
    finally:
        reporter.close()
