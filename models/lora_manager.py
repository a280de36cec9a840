"""Rank 0's bookkeeping of adapters: which are in CPU memory, which sit in a device slot.

Two LRUs. The CPU cache holds up to `capacity` adapters' weights (every rank its slices);
the `max_loras` slots hold the adapters running sequences read. Nothing a live sequence
needs is ever taken away: an adapter referenced by a waiting or running sequence stays in
CPU memory (the cache may overflow until they finish), and a slot read by a running one is
never refilled. Unloading, or loading a new version under the same name, retires the old
entry: it stops being resident at once and is freed when its last sequence finishes.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from models.lora import LoRARequest
from models.lora_fetch import StagedAdapter


class LoRABackend(Protocol):
    """The runner's LoRA commands, which it carries out on every rank."""

    def load_adapter(self, adapter_id: int, staged: StagedAdapter) -> None: ...

    def drop_adapter(self, adapter_id: int) -> None: ...

    def fill_slot(self, slot: int, adapter_id: int) -> None: ...


@dataclass
class _Entry:
    adapter_id: int
    lora: LoRARequest
    retiring: bool = False  # unloaded or superseded; freed once no sequence uses it


class LoRAManager:
    def __init__(
        self,
        backend: LoRABackend,
        num_slots: int,
        capacity: int,
        live_keys: Callable[[], set[str]],
    ) -> None:
        self.backend = backend
        self.capacity = capacity
        self._live_keys = live_keys  # adapters of waiting and running sequences
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # key -> entry, LRU first
        self._current: dict[str, str] = {}  # name -> key of its resident version
        self._slots: list[str | None] = [None] * num_slots
        self._slot_used: list[int] = [0] * num_slots
        self._clock = itertools.count(1)
        self._ids = itertools.count(1)
        self.loads_total = 0
        self.evictions_total = 0
        self.load_seconds_total = 0.0
        self.resident: tuple[str, ...] = ()  # replaced whole, so other threads read it safely

    # ---- CPU cache ------------------------------------------------------------------
    def is_held(self, lora: LoRARequest) -> bool:
        entry = self._entries.get(lora.key)
        return entry is not None and not entry.retiring

    def revive(self, lora: LoRARequest) -> bool:
        """Make an adapter still in memory current again (and most recently used)."""
        entry = self._entries.get(lora.key)
        if entry is None:
            return False
        if entry.retiring or self._current.get(lora.name) != lora.key:
            self._make_current(entry)
        self._entries.move_to_end(lora.key)
        return True

    def install(self, staged: StagedAdapter) -> None:
        """Put a staged adapter in CPU memory on every rank; raises LoRALoadError."""
        if self.revive(staged.lora):
            staged.copy.release()
            return
        entry = _Entry(next(self._ids), staged.lora)
        self.backend.load_adapter(entry.adapter_id, staged)
        self._entries[staged.lora.key] = entry
        self._make_current(entry)
        self.loads_total += 1
        self.load_seconds_total += time.monotonic() - staged.started
        self.trim(keep=staged.lora.key)

    def unload(self, name: str) -> bool:
        key = self._current.pop(name, None)
        if key is None:
            return False
        self._entries[key].retiring = True
        self.trim()
        return True

    def touch(self, key: str) -> None:
        self._entries.move_to_end(key)

    def maybe_trim(self) -> None:
        """Cheap check, after requests finish, for memory waiting to be freed."""
        if len(self._entries) > self.capacity or any(e.retiring for e in self._entries.values()):
            self.trim()

    def trim(self, keep: str | None = None) -> None:
        """Free retired adapters and the least recently used ones beyond capacity."""
        live = self._live_keys()
        for key in list(self._entries):
            entry = self._entries[key]
            if key in live or key == keep:
                continue
            if entry.retiring or len(self._entries) > self.capacity:
                self._drop(key)
        self._publish()

    def _make_current(self, entry: _Entry) -> None:
        old = self._current.get(entry.lora.name)
        if old is not None and old != entry.lora.key:
            self._entries[old].retiring = True
        entry.retiring = False
        self._current[entry.lora.name] = entry.lora.key
        self._publish()

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        if self._current.get(entry.lora.name) == key:
            del self._current[entry.lora.name]
        if key in self._slots:
            self._slots[self._slots.index(key)] = None
        self.backend.drop_adapter(entry.adapter_id)

    def _publish(self) -> None:
        self.resident = tuple(sorted(k for k, e in self._entries.items() if not e.retiring))

    # ---- device slots ---------------------------------------------------------------
    def slot_of(self, key: str) -> int:
        return self._slots.index(key)

    def acquire_slot(self, key: str, running: set[str]) -> bool:
        """Ensure `key` sits in a slot, filling a free one or the least recently used one no
        running sequence reads; False when every slot is busy."""
        if key in self._slots:
            self._slot_used[self._slots.index(key)] = next(self._clock)
            return True
        free = [s for s, k in enumerate(self._slots) if k is None]
        idle = [s for s, k in enumerate(self._slots) if k is not None and k not in running]
        if not free and not idle:
            return False
        slot = free[0] if free else min(idle, key=self._slot_used.__getitem__)
        if not free:
            self.evictions_total += 1
        self.backend.fill_slot(slot, self._entries[key].adapter_id)
        self._slots[slot] = key
        self._slot_used[slot] = next(self._clock)
        return True

    @property
    def slots_used(self) -> int:
        return sum(k is not None for k in self._slots)

    @property
    def num_slots(self) -> int:
        return len(self._slots)
