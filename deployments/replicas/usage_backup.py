"""What a model-server replica produced per request, kept until admission has it.

The ingress bills a request when its stream ends; if the ingress dies first, nothing
would. So each replica also counts what it produced for every request and hands those
records to admission with its heartbeat, which bills one only if its claim ends as an
orphan (deployments.tenancy.types.ServedUsage).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace

from deployments.replicas.requests import GenerateRequest
from deployments.tenancy.types import ServedUsage, UsageStatus
from models.outputs import RequestOutput

BACKLOG = 10_000  # records kept while admission cannot be reached; the oldest go first


class UsageBackup:
    def __init__(self) -> None:
        self._records: deque[ServedUsage] = deque(maxlen=BACKLOG)

    def produced(
        self, request: GenerateRequest, last: RequestOutput | None, status: UsageStatus
    ) -> None:
        """A stream ended (`last` is its last output, None if it produced none)."""
        if request.billing is None or last is None or not last.usage.prompt_tokens:
            return
        usage = last.usage
        record = replace(
            request.billing.record,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            ended_at=time.time(),
            status=status,
        )
        self._records.append(ServedUsage(request.billing.claim_id, record))

    def pending(self) -> list[ServedUsage]:
        return list(self._records)

    def delivered(self, count: int) -> None:
        """Admission took the first `count` records of the last `pending()`."""
        for _ in range(min(count, len(self._records))):
            self._records.popleft()
