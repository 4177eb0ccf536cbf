"""Launched work and its tokens: what the scheduler holds between launching a step and reading it.

A runner's `launch_*` methods queue their work on the device and return at once with a
`StepTokens`: `ready()` asks, without waiting, whether the device is done with it;
`tokens()` waits for it and returns its tokens (one device-to-host copy per step: the one
host-device sync the scheduler makes per step). The scheduler launches step N+1 before
it reads step N, so the host builds the next inputs while the device works.

A row whose next input token is not on the host yet (chosen by a launched step nobody
has read) is given `UNKNOWN_TOKEN`: the runner takes it from the device, where every
launch leaves each row's chosen token (indexed by the row's region start).

* `DoneTokens`: work that ran synchronously (the CPU, the host decode path): ready at once.
* `CudaTokens`: a CUDA event after a non-blocking copy of the step's tokens into pinned
  host memory; waiting releases the GIL (`torch.cuda.Event.synchronize`).
* `worker.model.simulated`: a stand-in device with the same handles, for benchmarks and tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from worker.model.sampling import TokenSampler

UNKNOWN_TOKEN = -1


@dataclass(frozen=True)
class RowInput:
    """One row of a decode step: feed `token` at `position` of the region at `start`.

    `token` is UNKNOWN_TOKEN when the row's last launch chose it and it is still on the device.
    """

    token: int
    position: int
    start: int
    sampler: TokenSampler | None = None
    # A constrained row's allowed tokens, bool [V] on the host (worker.inference.constraint):
    # every other logit is -inf before the row's token is chosen.
    allowed: torch.Tensor | None = None


class StepTokens(Protocol):
    def ready(self) -> bool:
        """Whether `tokens()` would return without waiting."""
        ...

    def tokens(self) -> list[int]:
        """Wait for the launched work; its chosen tokens, one per row (none for a marker)."""
        ...


class DoneTokens:
    """Tokens already on the host."""

    def __init__(self, tokens: list[int]) -> None:
        self._tokens = tokens

    def ready(self) -> bool:
        return True

    def tokens(self) -> list[int]:
        return self._tokens


class CudaTokens:
    """A step's tokens copied to pinned host memory behind the step, read after its event."""

    def __init__(self, chosen: torch.Tensor | None) -> None:
        self._host = None
        if chosen is not None:
            # Into pinned memory, so the copy is queued behind the step, not waited for.
            self._host = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True)
            self._host.copy_(chosen, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def ready(self) -> bool:
        return bool(self._event.query())

    def tokens(self) -> list[int]:
        self._event.synchronize()
        return [] if self._host is None else self._host.tolist()


class StepBuffers:
    """Static device inputs of the graph path; idle rows point at the pool's scratch slot."""

    def __init__(self, max_rows: int, scratch_slot: int, device: torch.device) -> None:
        self.scratch = scratch_slot
        self.device = device
        self.tokens = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.slots = torch.full((max_rows,), scratch_slot, dtype=torch.long, device=device)
        self.starts = torch.full((max_rows,), scratch_slot, dtype=torch.int32, device=device)
        self.used = torch.ones(max_rows, dtype=torch.int32, device=device)
        # Each region's last chosen token, by region start (the scratch slot's is junk):
        # where a launched step leaves its tokens for the next one to read on the device.
        self.last = torch.zeros(scratch_slot + 1, dtype=torch.long, device=device)

    def staged(self, values: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device, through pinned memory on CUDA (the host never waits)."""
        if self.device.type != "cuda":
            return values
        return values.pin_memory().to(self.device, non_blocking=True)

    def fill(self, batch: Sequence[RowInput], bucket: int) -> None:
        idle = bucket - len(batch)
        values = torch.tensor(
            [
                [r.token for r in batch] + [0] * idle,
                [r.position for r in batch] + [0] * idle,
                [r.start + r.position for r in batch] + [self.scratch] * idle,
                [r.start for r in batch] + [self.scratch] * idle,
                [r.position + 1 for r in batch] + [1] * idle,
            ],
            dtype=torch.long,
        )
        values = self.staged(values)
        # A row's token still on the device (UNKNOWN_TOKEN here) is its region's last one.
        known = values[0] >= 0
        self.tokens[:bucket].copy_(torch.where(known, values[0], self.last[values[3]]))
        self.positions[:bucket].copy_(values[1])
        self.slots[:bucket].copy_(values[2])
        self.starts[:bucket].copy_(values[3])
        self.used[:bucket].copy_(values[4])
