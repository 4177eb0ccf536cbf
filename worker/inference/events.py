"""What a job's thread reads from the scheduler: its tokens, then how it ended."""

from __future__ import annotations

from dataclasses import dataclass

from vision_queue.errors import VisionQueueError
from worker.model.steps import RowLogprobs


@dataclass(frozen=True)
class Token:
    token_id: int
    logprobs: RowLogprobs | None = None  # only for a job that asked for them


@dataclass(frozen=True)
class Finished:
    stop_reason: str  # "length" | "eos:<id>" | "cancelled"
    wait_s: float
    prefill_s: float
    decode_s: float
    cached_tokens: int = 0  # prompt positions whose KV came from the image cache


@dataclass(frozen=True)
class Failed:
    error: VisionQueueError


Event = Token | Finished | Failed
