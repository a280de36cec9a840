"""The key rings an ingress replica authenticates with, re-read when the key file changes,
and the warnings for tenants that no key can reach.

A Kubernetes Secret mounted as a volume is updated in place by the kubelet (within about a
minute of `kubectl apply`), and a `ray up` key file by `ray rsync-up`: the ingress notices
a new modification time or size of `TIERED_API_KEYS_FILE` (checked at most every
`recheck_s`) and swaps in the new rings. A file that no longer loads keeps the last good
rings and logs why, so a bad edit never locks every tenant out. Keys given in the
environment (`TIERED_API_KEYS`, `TIERED_ADMIN_KEYS`) and in the YAML change only with a
redeploy.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from deployments.config.models import ConfigError
from deployments.config.tiered import TieredConfig
from deployments.tenancy.keys import ADMIN, ENV_KEYS_FILE, KeyRings, load_key_rings

log = logging.getLogger(__name__)
RECHECK_S = 10.0


def key_warnings(config: TieredConfig, rings: KeyRings) -> list[str]:
    """One line per problem: no key at all, or the tenants that have none (every request
    of theirs gets 401)."""
    tenants = rings.tenants.owners()
    if not tenants and ADMIN not in rings.admin.owners():
        return ["no API key is configured: every request will be refused with 401"]
    keyless = [t.name for t in config.tenants if t.name not in tenants]
    if not keyless:
        return []
    return [f"tenant(s) without an API key, refused with 401: {', '.join(keyless)}"]


class KeySource:
    """load_key_rings(config, environ), reloaded when the key file changes."""

    def __init__(
        self,
        config: TieredConfig,
        environ: Mapping[str, str] | None = None,
        *,
        recheck_s: float = RECHECK_S,
        clock: Callable[[], float] = time.monotonic,
        door: str | None = None,
    ) -> None:
        self._config = config
        self._door = door
        self._environ = dict(os.environ if environ is None else environ)
        self._path = self._environ.get(ENV_KEYS_FILE)
        self._recheck_s = recheck_s
        self._clock = clock
        self._stamp = self._file_stamp()
        self._rings = self._load()  # a bad file fails the start
        self._next_check = clock() + recheck_s
        for line in key_warnings(config, self._rings):
            log.warning(line)

    def _load(self) -> KeyRings:
        return replace(load_key_rings(self._config, self._environ), door=self._door)

    def _file_stamp(self) -> tuple[int, int] | None:
        if not self._path:
            return None
        try:
            stat = os.stat(self._path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def current(self) -> KeyRings:
        """The rings, re-read first if the key file changed since the last look."""
        now = self._clock()
        if self._path and now >= self._next_check:
            self._next_check = now + self._recheck_s
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                self._reload()
        return self._rings

    def _reload(self) -> None:
        try:
            rings = self._load()
        except ConfigError as exc:
            log.error("keeping the previous API keys: %s", exc)
            return
        self._rings = rings
        log.info("API keys re-read from %s", self._path)
        for line in key_warnings(self._config, rings):
            log.warning(line)
