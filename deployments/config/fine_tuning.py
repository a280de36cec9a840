"""`files:` and `fine_tuning:` in the Tiered config: where uploaded files' bytes (and
checkpoints) live and how large they may be; what a fine-tuning job trains and where.

The bytes go through fsspec: a local directory by default (under the state directory, next
to the SQLite ledger), or any fsspec URL (`s3://bucket/prefix` needs s3fs, `gs://...`
gcsfs, in the ingress replicas' and the training workers' environment). Metadata lives in
the state store.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from deployments.state.config import state_dir

LoRATarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS: tuple[LoRATarget, ...] = get_args(LoRATarget)

MIB = 1024 * 1024


def default_files_root() -> str:
    return str(state_dir() / "files")


class FilesSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str = Field(
        default_factory=default_files_root,
        min_length=1,
        description="An fsspec URL or a local directory for file bytes and checkpoints.",
    )
    max_bytes: int = Field(
        64 * MIB, ge=1024, description="The largest file `POST /v1/files` accepts (413 above)."
    )


class LoRATrainingSpec(BaseModel):
    """The adapter a job trains (PEFT's LoraConfig fields)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    targets: list[LoRATarget] = Field(
        default_factory=lambda: list(LORA_TARGETS), min_length=1, description="target_modules"
    )


class FineTuningSpec(BaseModel):
    """`fine_tuning:` in the Tiered config: what a job trains and where it runs."""

    model_config = ConfigDict(extra="forbid")

    lora: LoRATrainingSpec = LoRATrainingSpec()
    base_learning_rate: float = Field(
        2e-4, gt=0, description="Multiplied by the job's learning_rate_multiplier."
    )
    default_n_epochs: int = Field(3, ge=1, le=50, description="n_epochs: auto")
    default_batch_size: int = Field(4, ge=1, le=256, description="batch_size: auto")
    max_seq_len: int = Field(2048, ge=16, description="Longest example, in tokens.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs of one training task.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs of one training task.")
    node_type_resource: str | None = Field(
        None,
        description="Custom resource pinning training to a node type; default: the base "
        "model's shared pool's, so training never lands on a tenant's reserved nodes.",
    )
    max_running_jobs: int = Field(1, ge=0, description="Jobs training at once, cluster-wide.")
    max_active_jobs_per_tenant: int = Field(
        4, ge=1, description="A tenant's jobs not yet ended; one more is a 429."
    )
    max_tokens_per_tenant_per_day: int | None = Field(
        None,
        ge=1,
        description="A tenant's trained tokens over 24 hours (its jobs' estimates while "
        "they run, what they trained once ended); a job that would pass it is a 429. "
        "None: unlimited.",
    )
    max_attempts: int = Field(3, ge=1, description="Starts of one job (resumes included).")
    poll_interval_s: float = Field(1.0, gt=0, description="How often the runner reads jobs.")
    yield_after_s: float = Field(
        5.0,
        ge=0,
        description="A Serve replica waiting this long for resources stops training "
        "(resumed from its checkpoint later); 0: training never yields.",
    )
    heartbeat_timeout_s: float = Field(
        60.0, gt=0, description="A running job silent this long lost its runner: resumed."
    )
