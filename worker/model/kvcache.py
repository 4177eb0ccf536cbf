"""Key/value caches with the one method transformers' attention calls: `update`.

`Phi3Attention` rotates the new keys, then calls `cache.update(key, value, layer_idx)` and
attends over what it returns. The rotation is never redone, which is what the reference
does at the LongRoPE switch: keys cached under the short factors keep that rotation.

* `DynamicKVCache` grows by concatenation: simple, any length, one allocation per token.
* `StaticKVCache` preallocates `capacity` slots per layer so a compiled decode step sees
  the same tensors at the same addresses every step (a CUDA graph needs exactly that).
  Slots past the current position hold stale values and are masked out by the caller.
"""

from __future__ import annotations

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


class StaticKVCache:
    """[1, kv_heads, capacity, head_dim] keys and values per layer, allocated once."""

    def __init__(
        self,
        *,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.capacity = capacity
        shape = (1, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for tensor in (*self.keys, *self.values):
            # Updated in place inside a compiled step: the compiler must treat the
            # address as fixed rather than copy the tensor into a graph-owned buffer.
            torch._dynamo.mark_static_address(tensor)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def prefill(self, length: int) -> _PrefillWriter:
        if length > self.capacity:
            raise ValueError(f"{length} prompt tokens do not fit a cache of {self.capacity}")
        return _PrefillWriter(self)

    def at(self, position: torch.Tensor) -> _DecodeWriter:
        """Writer for one decode step whose token sits at `position` ([1] int64, on device)."""
        return _DecodeWriter(self, position)

    def mask(self, position: torch.Tensor) -> torch.Tensor:
        """[1, 1, 1, capacity] bool: the slots a token at `position` may attend to."""
        slots = torch.arange(self.capacity, device=position.device)
        return (slots <= position).view(1, 1, 1, self.capacity)


class _PrefillWriter:
    """Stores the prompt's keys in slots 0..L-1 and lets attention use them as they are."""

    def __init__(self, cache: StaticKVCache) -> None:
        self.cache = cache

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        length = key.shape[2]
        self.cache.keys[layer_idx][:, :, :length].copy_(key)
        self.cache.values[layer_idx][:, :, :length].copy_(value)
        return key, value


class _DecodeWriter:
    def __init__(self, cache: StaticKVCache, position: torch.Tensor) -> None:
        self.cache = cache
        self.position = position

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        keys.index_copy_(2, self.position, key)
        values.index_copy_(2, self.position, value)
        return keys, values
