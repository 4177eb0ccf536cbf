"""A generation request and its result: what `Engine.generate` takes and returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vision_queue.logprobs import TokenLogprob
from vision_queue.schemas import ChatMessage
from worker.inference.control import RunControl


@dataclass(frozen=True)
class GenerationRequest:
    # User prompt text, or an ask conversation's turns (template applied by the engine).
    prompt: str | Sequence[ChatMessage]
    images: Sequence[Image.Image]  # already RGB
    max_new_tokens: int
    num_crops: int | None = None
    # Sampling: temperature 0 is greedy; top_p and seed as in vision_queue.schemas.TaskOptions.
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    # Generation ends before any of these strings (up to 4), which are not part of the text.
    stop: Sequence[str] = ()
    # A checked response_format (vision_queue.structured): decoding follows its grammar.
    response_format: dict[str, Any] | None = None
    # Each generated token's logprob and this many alternatives (0..20); None: no logprobs.
    logprobs: int | None = None
    # Choices (1..8): one prefill, n rows decoding; choice i samples with seed + i.
    n: int = 1
    # Each image's SHA-256 (of its file: what staging names it by), for image reuse;
    # None: the engine hashes the decoded pixels instead.
    image_hashes: Sequence[str] | None = None
    # Cancel, deadline and the like, progress and streamed text, for this run only.
    control: RunControl = field(default_factory=RunControl)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    stop_reason: str  # "length" | "eos:<id>" | "stop_string"
    preprocess_s: float
    prefill_s: float
    decode_s: float
    wait_s: float = 0.0  # waiting for a batch row and KV space
    # One entry per generated token but end tokens, when the request asked for them.
    logprobs: list[TokenLogprob] | None = None
    cached_tokens: int = 0  # prompt positions whose KV came from the image cache
    more: tuple[GenerationResult, ...] = ()  # choices 2..n of a request with n above 1

    @property
    def finish_reason(self) -> str:
        """OpenAI's vocabulary: "stop" (end token or stop string) or "length"."""
        return "length" if self.stop_reason == "length" else "stop"
