"""What the scheduler holds per request: the job a request's thread hands in, the row it
runs as once admitted, and the launched work whose tokens are not read yet.

Apart from `worker.inference.scheduler` (which decides what runs when) so that the loop
reads as a loop; nothing here talks to the device.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from worker.inference.constraint import RowConstraint
from worker.inference.events import Event
from worker.model.config import RopeFactors
from worker.model.kvcache import RegionAllocator
from worker.model.model_runner import PromptPrefill
from worker.model.processor import EncodedPrompt
from worker.model.sampling import SamplingParams, TokenSampler
from worker.model.steps import RowInput, StepTokens


@dataclass(eq=False)  # identity: a job is itself, whatever it holds
class Job:
    """One request as the scheduler sees it; `events` is read by the request's own thread."""

    encoded: EncodedPrompt
    crops: torch.Tensor | None  # the images' CPU crops; handed to the runner on admission
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    constraint: RowConstraint | None = None  # a response_format's grammar
    logprobs: int | None = None  # alternatives per token with its logprobs; None: no logprobs
    image_hashes: tuple[str, ...] = ()  # the images' SHA-256s: what image reuse keys on
    decode_fault: bool = False  # test-only: decode steps with this job run out of memory
    # `n` choices: the other choices' jobs, admitted with this one and decoding from a copy
    # of its prefilled region (one prefill for all); never queued on their own.
    siblings: list[Job] = field(default_factory=list)
    events: queue.SimpleQueue[Event] = field(default_factory=queue.SimpleQueue)
    submitted_at: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def positions_needed(self) -> int:
        return self.encoded.prompt_tokens + self.max_new_tokens

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass(eq=False)
class Launch:
    """Launched work not read yet: the rows whose tokens it chooses, in order."""

    rows: list[Row]
    tokens: StepTokens
    what: str  # "decoding" | "prefill": which failure its errors are
    prefill_from: float = 0.0  # a prompt's first token: until it is read counts as prefill


@dataclass(eq=False)
class Row:
    job: Job
    start: int  # the job's region in the KV pool
    sampler: TokenSampler | None
    admitted_at: float
    prompt: PromptPrefill | None  # None once prefilled (or released)
    position: int = 0  # where the next fed token goes
    token: int = 0  # the token fed next; UNKNOWN_TOKEN while only the device has it
    generated: int = 0  # tokens handed to the job
    launched: int = 0  # tokens whose choice is launched (generated + those in flight)
    done: bool = False  # left the batch: tokens of its steps still in flight are dropped
    prefill_s: float = 0.0
    decode_began: float = 0.0
    # The factor set the keys of the region's prefix (the prompt, or after a recompute
    # the whole sequence it rebuilt) were rotated with: what a prefix cache must key on.
    kv_factors: RopeFactors = "short"
    # Held only by a row that will recompute at the LongRoPE switch, until it has:
    prompt_embeds: torch.Tensor | None = None  # the first prefill's embeddings
    history: list[int] = field(default_factory=list)  # every token generated so far
    recomputing: bool = False
    # Image reuse: prompt positions copied from the cache, and the entry pinned meanwhile.
    cached_tokens: int = 0
    pinned: Hashable | None = None
    # The siblings' rows, waiting for this row's prefill (then decoding on their own).
    followers: list[Row] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return self.job.encoded.prompt_tokens

    def as_input(self) -> RowInput:
        constraint = self.job.constraint
        allowed = None if constraint is None else constraint.allowed()
        return RowInput(
            self.token, self.position, self.start, self.sampler, allowed, self.job.logprobs
        )

    @property
    def awaits_token(self) -> bool:
        """A constrained row whose last token is still on the device: its mask needs it."""
        return self.job.constraint is not None and self.generated < self.launched


def sampler_for(job: Job) -> TokenSampler | None:
    return None if job.sampling.greedy else TokenSampler(job.sampling)


def allocate_all(allocator: RegionAllocator, group: list[Job]) -> list[int] | None:
    """A KV region for every job of the group (`n` choices), or none at all."""
    starts: list[int] = []
    for job in group:
        start = allocator.allocate(job.positions_needed)
        if start is None:
            for taken in starts:
                allocator.free(taken)
            return None
        starts.append(start)
    return starts
