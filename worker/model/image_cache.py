"""What an image costs, kept for the next task about it: one byte-bounded LRU per worker.

Two kinds of entries share the budget (`VQ_IMAGE_CACHE_BYTES`; 0 turns it off):

* `crops`: an image's HD transform and normalised crops (CPU), keyed by the image's
  SHA-256 (what staging names it by) and the crop count; filled and read on request threads;
* `prefix`: the KV of a prompt's prefix that ends with its last image's tokens (device),
  keyed by that prefix's token ids, the images' hashes, the dtype and the LongRoPE factor
  set the whole prompt was rotated with (a prefix computed with the short factors serves
  only prompts that use them); filled and read on the device thread (worker.model.model_runner).

Least recently used entries go first. An entry a running row was served from is pinned
until that row leaves (`unpin`): eviction passes it over, and an entry that cannot fit
without evicting a pinned one is not stored. A hit copies the prefix into the row's own
region (the pool gives every row one contiguous region), so an eviction can never change
a running row's keys; the pin keeps a shared prefix's entry for the rows that follow.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

GiB = 2**30
DEFAULT_BYTES_CPU = 2 * GiB
DEFAULT_BYTES_CUDA = 4 * GiB


def default_bytes(device_type: str) -> int:
    """The budget when VQ_IMAGE_CACHE_BYTES is -1 (auto): one image prefix of the real model
    (about 2,500 positions) is about 1.9 GiB of float32 KV on the CPU and 1 GiB of bf16 on
    CUDA, so the defaults keep about one (CPU) and four (CUDA) images' prefixes."""
    return DEFAULT_BYTES_CUDA if device_type == "cuda" else DEFAULT_BYTES_CPU


@dataclass
class _Entry:
    value: Any
    nbytes: int
    kind: str
    pins: int = 0


class ImageCache:
    """Thread-safe; `capacity` bytes (0: off, every lookup misses and nothing is stored)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self._entries: collections.OrderedDict[Hashable, _Entry] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes_held = 0
        self.hits: collections.Counter[str] = collections.Counter()
        self.misses: collections.Counter[str] = collections.Counter()
        self.evictions: collections.Counter[str] = collections.Counter()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def get(self, kind: str, key: Hashable, *, pin: bool = False) -> Any:
        """The value under `key` (now the most recently used), or None; counted as a hit or
        a miss of `kind`. With `pin`, a hit stays until `unpin`."""
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses[kind] += 1
                return None
            self._entries.move_to_end(key)
            self.hits[kind] += 1
            if pin:
                entry.pins += 1
            return entry.value

    def put(self, kind: str, key: Hashable, value: Any, nbytes: int) -> bool:
        """Store, evicting least recently used unpinned entries; False when it cannot fit."""
        if not self.enabled or nbytes > self.capacity:
            return False
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
            unpinned = sum(e.nbytes for e in self._entries.values() if not e.pins)
            if self.bytes_held - unpinned + nbytes > self.capacity:
                return False  # only pinned entries would be left to evict
            for old in list(self._entries):
                if self.bytes_held + nbytes <= self.capacity:
                    break
                entry = self._entries[old]
                if entry.pins:
                    continue
                del self._entries[old]
                self.bytes_held -= entry.nbytes
                self.evictions[entry.kind] += 1
            self._entries[key] = _Entry(value, nbytes, kind)
            self.bytes_held += nbytes
            return True

    def unpin(self, key: Hashable) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.pins:
                entry.pins -= 1

    def pinned(self, key: Hashable) -> int:
        with self._lock:
            entry = self._entries.get(key)
            return 0 if entry is None else entry.pins

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
