"""Key/value caches with the one method the decoder layers' attention calls: `update`.

`layers.Phi3Attention` (as transformers' class) rotates the new keys, then calls
`cache.update(key, value, layer_idx)` and attends over what it returns. The rotation is
never redone here, which is what Phi-3-vision's code does at the LongRoPE switch: keys
cached under the short factors keep that rotation. (Phi-3.5-vision's code recomputes the
sequence instead; the scheduler does that by prefilling the row's region again.)

* `DynamicKVCache` grows by concatenation: one request, any length. The reference tests
  use it to check a plain forward pass.
* `KVPool` is the batched engine's cache: per layer one preallocated tensor of `positions`
  slots (plus one scratch slot), shared by every row of the batch. Each request owns a
  contiguous *region* of it (`RegionAllocator`), as long as its prompt plus its token
  budget, for its whole life; rows of the decode batch therefore have their own lengths
  and a finished request frees its region at once. Attention reads each row's live
  region only (`DecodeRows`); slots outside a region are never read as keys of that row.
  `PrefillWriter` and `DecodeWriter` are the `update()` views a forward pass writes through.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch


class DynamicKVCache:
    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        old_key, old_value = self.keys[layer_idx], self.values[layer_idx]
        if old_key is not None and old_value is not None:
            key = torch.cat([old_key, key], dim=2)
            value = torch.cat([old_value, value], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value


class RegionAllocator:
    """First-fit allocation of contiguous position ranges in [0, positions).

    Sizes are rounded up to `granularity`; freed ranges merge with free neighbours.
    """

    def __init__(self, positions: int, granularity: int = 1) -> None:
        if positions < 1 or granularity < 1:
            raise ValueError("positions and granularity must be positive")
        self.positions = positions
        self.granularity = granularity
        self._free: list[tuple[int, int]] = [(0, positions)]  # (start, size), sorted by start
        self._used: dict[int, int] = {}  # start -> size

    def rounded(self, size: int) -> int:
        step = self.granularity
        return -(-size // step) * step

    def allocate(self, size: int) -> int | None:
        """The start of a free range of at least `size` positions, or None if none is."""
        size = self.rounded(max(1, size))
        for index, (start, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[index]
                else:
                    self._free[index] = (start + size, free - size)
                self._used[start] = size
                return start
        return None

    def free(self, start: int) -> None:
        size = self._used.pop(start)
        index = bisect.bisect_left(self._free, (start, 0))
        self._free.insert(index, (start, size))
        # Adjacent free ranges are merged at once, so a large prompt finds the contiguous
        # region that several freed small ones leave behind.
        if index + 1 < len(self._free):
            nxt_start, nxt_size = self._free[index + 1]
            if start + size == nxt_start:
                self._free[index] = (start, size + nxt_size)
                del self._free[index + 1]
        if index > 0:
            prev_start, prev_size = self._free[index - 1]
            cur_start, cur_size = self._free[index]
            if prev_start + prev_size == cur_start:
                self._free[index - 1] = (prev_start, prev_size + cur_size)
                del self._free[index]

    @property
    def free_positions(self) -> int:
        return sum(size for _, size in self._free)

    @property
    def largest_free(self) -> int:
        return max((size for _, size in self._free), default=0)


class KVPool:
    """Preallocated keys and values for every layer, in one of two layouts.

    heads-first, [kv_heads, positions + 1, head_dim]: a region is a strided view with the
    same inner layout as a single request's cache, which is what SDPA on the CPU reads
    bit-identically; tokens-first, [positions + 1, kv_heads, head_dim]: what flash /
    varlen kernels read. Slot `positions` is scratch: idle rows of a padded CUDA-graph
    batch write there and attend to it, and nothing reads it as real data.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        positions: int,
        dtype: torch.dtype,
        device: torch.device,
        tokens_first: bool,
        zeroed: bool,
        granularity: int = 16,
    ) -> None:
        self.positions = positions
        self.tokens_first = tokens_first
        self.scratch_slot = positions
        self.allocator = RegionAllocator(positions, granularity)
        slots = positions + 1
        shape = (slots, kv_heads, head_dim) if tokens_first else (kv_heads, slots, head_dim)
        # `empty` costs no memory until written (the OS maps pages lazily); a kernel that
        # reads a masked window of slots needs them zeroed, since 0 * NaN is NaN.
        make = torch.zeros if zeroed else torch.empty
        self.keys = [make(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [make(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.bytes_per_position = 2 * num_layers * kv_heads * head_dim * _itemsize(dtype)

    @property
    def nbytes(self) -> int:
        return self.bytes_per_position * (self.positions + 1)

    def region(self, layer: int, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [start, start + length) as [1, kv_heads, length, head_dim]."""
        return (
            layer_view(self.keys[layer], self.tokens_first, start, length),
            layer_view(self.values[layer], self.tokens_first, start, length),
        )

    def read_prefix(self, start: int, length: int) -> PrefixKV:
        """A copy of every layer's keys and values in slots [start, start + length)."""
        keys = [self._slots(store, start, length).clone() for store in self.keys]
        values = [self._slots(store, start, length).clone() for store in self.values]
        return PrefixKV(length, keys, values)

    def write_prefix(self, start: int, prefix: PrefixKV) -> None:
        """Copy a `read_prefix` into slots [start, start + prefix.length), queued on the
        device (one stream: steps launched later see it; the entry's memory is freed only
        behind the copy)."""
        for stores, saved in ((self.keys, prefix.keys), (self.values, prefix.values)):
            for store, part in zip(stores, saved, strict=True):
                self._slots(store, start, prefix.length).copy_(part, non_blocking=True)

    def copy_region(self, source: int, target: int, length: int) -> None:
        """Slots [source, source + length) into [target, target + length), every layer
        (`n` choices: one prefill, copied into each other choice's region)."""
        for store in (*self.keys, *self.values):
            self._slots(store, target, length).copy_(self._slots(store, source, length))

    def _slots(self, store: torch.Tensor, start: int, length: int) -> torch.Tensor:
        if self.tokens_first:
            return store[start : start + length]
        return store[:, start : start + length]

    def write_span(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store [1, kv_heads, n, head_dim] keys and values in slots [start, start + n)."""
        n = int(key.shape[2])
        for store, new in ((self.keys[layer], key), (self.values[layer], value)):
            if self.tokens_first:
                store[start : start + n].copy_(new[0].transpose(0, 1))
            else:
                store[:, start : start + n].copy_(new[0])

    def write_slots(
        self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Store one new token per row, [B, kv_heads, 1, head_dim], in slots[b] (int64)."""
        for store, new in ((self.keys[layer], key), (self.values[layer], value)):
            if self.tokens_first:
                store.index_copy_(0, slots, new[:, :, 0])
            else:
                store.index_copy_(1, slots, new[:, :, 0].transpose(0, 1))


@dataclass(frozen=True)
class PrefixKV:
    """A prompt prefix's keys and values, per layer, in the pool's layout
    (worker.model.image_cache)."""

    length: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def layer_view(store: torch.Tensor, tokens_first: bool, start: int, length: int) -> torch.Tensor:
    if tokens_first:
        return store[start : start + length].permute(1, 0, 2).unsqueeze(0)
    return store[:, start : start + length].unsqueeze(0)


@dataclass
class DecodeRows:
    """Where each row of a decode step reads its keys: the attention metadata.

    Host lists (`starts`, `used`) serve the per-row kernel; device tensors (`starts_t`,
    `used_t`, int32) serve kernels inside a CUDA graph. `used` counts the row's slots
    including the token of this step; `window` bounds it for every row (the graph's
    fixed maximum key length).
    """

    tokens_first: bool
    window: int
    starts: list[int] | None = None
    used: list[int] | None = None
    starts_t: torch.Tensor | None = None
    used_t: torch.Tensor | None = None


class PrefillWriter:
    """A prompt chunk at `offset` of a region starting at `start`.

    The first chunk attends to its own keys as computed (exactly today's single-request
    prefill); a later chunk attends to the region's slots [0, offset + n).
    """

    def __init__(self, pool: KVPool, start: int, offset: int) -> None:
        self.pool = pool
        self.start = start
        self.offset = offset

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.pool.write_span(layer_idx, self.start + self.offset, key, value)
        if self.offset == 0:
            return key, value
        return self.pool.region(layer_idx, self.start, self.offset + int(key.shape[2]))


class DecodeWriter:
    """One new token per row, stored in `slots` ([B] int64); attention gets the whole layer."""

    def __init__(self, pool: KVPool, slots: torch.Tensor) -> None:
        self.pool = pool
        self.slots = slots

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.pool.write_slots(layer_idx, self.slots, key, value)
        return self.pool.keys[layer_idx], self.pool.values[layer_idx]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
