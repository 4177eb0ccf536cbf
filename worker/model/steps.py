"""Launched work and its tokens: what the scheduler holds between launching a step and reading it.

A runner's `launch_*` methods queue their work on the device and return at once with a
`StepTokens`: `ready()` asks, without waiting, whether the device is done with it;
`tokens()` waits for it and returns its tokens (one device-to-host copy per step: the one
host-device sync the scheduler makes per step). The scheduler launches step N+1 before
it reads step N, so the host builds the next inputs while the device works.

A row whose next input token is not on the host yet (chosen by a launched step nobody
has read) is given `UNKNOWN_TOKEN`: the runner takes it from the device, where every
launch leaves each row's chosen token (indexed by the row's region start).

A row that asks for log probabilities (`RowInput.top_logprobs` not None) gets them from
`logprobs()` after `tokens()`: computed on the device in the same step, from the logits
its token was chosen from, and carried in the same copy (`pack_logprobs`): rows that do
not ask add nothing to the step, and a step where none asks copies its tokens alone.

* `DoneTokens`: work that ran synchronously (the CPU, the host decode path): ready at once.
* `CudaTokens`: a CUDA event after a non-blocking copy of the step's tokens into pinned
  host memory; waiting releases the GIL (`torch.cuda.Event.synchronize`).
* `worker.model.simulated`: a stand-in device with the same handles, for benchmarks and tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
    # Alternatives wanted besides the chosen token's own logprob (0..20); None: none at all.
    top_logprobs: int | None = None


@dataclass(frozen=True)
class RowLogprobs:
    """A chosen token's log probability and the most likely tokens, most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class StepTokens(Protocol):
    def ready(self) -> bool:
        """Whether `tokens()` would return without waiting."""
        ...

    def tokens(self) -> list[int]:
        """Wait for the launched work; its chosen tokens, one per row (none for a marker)."""
        ...

    def logprobs(self) -> list[RowLogprobs | None]:
        """After `tokens()`: each row's logprobs, None for a row that did not ask."""
        ...


def row_logprobs(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> torch.Tensor:
    """Rows' logprobs on the logits' device: [S, 1 + 2·top] float64 (the chosen token's
    logprob, then `top` ids and their logprobs, most likely first).

    logits [S, V] are the model's at temperature 1, a grammar's mask applied (disallowed
    tokens at -inf); float32 at least, so a bf16 step reports the same numbers its logits
    imply. A stable sort: on a tie the lower id ranks first, as argmax chooses it."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    own = logp.gather(1, chosen.view(-1, 1)).double()
    if not top:
        return own
    values, ids = logp.sort(dim=-1, descending=True, stable=True)
    return torch.cat([own, ids[:, :top].double(), values[:, :top].double()], dim=1)


def pack_logprobs(
    chosen: torch.Tensor,
    logits: torch.Tensor,
    batch: Sequence[RowInput],
    staged: Callable[[torch.Tensor], torch.Tensor] = lambda values: values,
) -> tuple[torch.Tensor, list[int | None]]:
    """The step's tokens and the asking rows' logprobs in one float64 tensor [B, 2 + 2·K]
    (K the most alternatives any row asked for), so one copy carries both; with the rows'
    asks. Token ids are exact in float64. `staged` puts the asking rows' indices on the
    device without waiting for the step (`StepBuffers.staged`)."""
    asks = [row.top_logprobs for row in batch]
    index = [i for i, ask in enumerate(asks) if ask is not None]
    top = max(ask or 0 for ask in asks)
    packed = torch.zeros(len(batch), 2 + 2 * top, dtype=torch.float64, device=chosen.device)
    packed[:, 0] = chosen
    rows = staged(torch.tensor(index))
    asking = logits[rows]
    masks = [(j, batch[i].allowed) for j, i in enumerate(index)]
    masked = [(j, allowed) for j, allowed in masks if allowed is not None]
    if masked:  # a grammar's row: the distribution its token was chosen from
        keep = torch.ones(asking.shape, dtype=torch.bool)
        for j, allowed in masked:
            keep[j] = allowed
        asking = asking.masked_fill(~staged(keep), float("-inf"))
    packed[rows, 1:] = row_logprobs(asking, chosen[rows], top)
    return packed, asks


def unpack_logprobs(
    values: list[list[float]], asks: Sequence[int | None]
) -> list[RowLogprobs | None]:
    """`pack_logprobs`' rows (without the token column) on the host."""
    out: list[RowLogprobs | None] = []
    for row, ask in zip(values, asks, strict=True):
        if ask is None:
            out.append(None)
            continue
        width = (len(row) - 1) // 2
        ids, logps = row[1 : 1 + ask], row[1 + width : 1 + width + ask]
        # A grammar may allow fewer tokens than were asked for: the rest are -inf, not listed.
        top = tuple((int(i), p) for i, p in zip(ids, logps, strict=True) if p != -math.inf)
        out.append(RowLogprobs(row[0], top))
    return out


class DoneTokens:
    """Tokens (and logprobs) already on the host."""

    def __init__(
        self, tokens: list[int], logprobs: list[RowLogprobs | None] | None = None
    ) -> None:
        self._tokens = tokens
        self._logprobs = logprobs or [None] * len(tokens)

    def ready(self) -> bool:
        return True

    def tokens(self) -> list[int]:
        return self._tokens

    def logprobs(self) -> list[RowLogprobs | None]:
        return self._logprobs


class CudaTokens:
    """A step's tokens copied to pinned host memory behind the step, read after its event.

    With `asks` the tensor is `pack_logprobs`' (tokens and logprobs in one copy)."""

    def __init__(
        self, chosen: torch.Tensor | None, asks: Sequence[int | None] | None = None
    ) -> None:
        self._host = None
        self._asks = asks
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
        if self._host is None:
            return []
        if self._asks is None:
            return self._host.tolist()
        return [int(t) for t in self._host[:, 0].tolist()]

    def logprobs(self) -> list[RowLogprobs | None]:
        if self._host is None or self._asks is None:
            return [None] * (0 if self._host is None else int(self._host.shape[0]))
        return unpack_logprobs(self._host[:, 1:].tolist(), self._asks)


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
