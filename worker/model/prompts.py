"""A prompt on its way into its KV region: what `ModelRunner.prefill_unit` advances."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from worker.model.processor import EncodedPrompt


@dataclass(eq=False)  # identity: two prompts with the same text are still two prompts
class PromptPrefill:
    """A prompt on its way into the KV region at `start`, advanced by `prefill_unit`."""

    input_ids: list[int]
    start: int
    crops: torch.Tensor | None = None  # every image's crops (CPU or device), in order
    grids: list[tuple[int, int]] = field(default_factory=list)  # (rows, cols) per image
    spans: list[tuple[int, int]] = field(default_factory=list)  # (start, length) per image
    crops_encoded: int = 0  # crops already through the image tower
    features: list[torch.Tensor] = field(default_factory=list)  # CLIP features, per unit
    embeds: torch.Tensor | None = None  # [1, L, hidden] once the image tower is done
    offset: int = 0  # positions already in the KV region
    # Keep `embeds` once the region holds the prompt: a row that will cross the LongRoPE
    # switch under `recompute` rebuilds its region from them (`ModelRunner.regrown`).
    keep_embeds: bool = False
    # Image reuse (worker.model.image_cache): the images' SHA-256s, and where the prefix
    # ending with the last image's tokens ends (0: no such prefix, or nothing after it).
    # That prefix is always a prefill unit of its own, so a hit, which copies its KV
    # instead, leaves every later position's arithmetic as a miss computes it.
    image_hashes: tuple[str, ...] = ()
    prefix_length: int = 0
    embeds_from: int = 0  # `embeds` holds positions [embeds_from, length)
    cached_tokens: int = 0  # positions copied from the cache instead of prefilled
    pinned: Hashable | None = None  # the cache entry it was served from, until it leaves

    @classmethod
    def of(
        cls,
        encoded: EncodedPrompt,
        crops: torch.Tensor | None,
        start: int,
        image_hashes: Sequence[str] = (),
    ) -> PromptPrefill:
        ends = [span.start + span.length for span in encoded.spans]
        prefix = max(ends, default=0)
        return cls(
            input_ids=list(encoded.input_ids),
            start=start,
            crops=crops if encoded.images else None,
            grids=[(hd.rows, hd.cols) for hd in encoded.images],
            spans=[(span.start, span.length) for span in encoded.spans],
            image_hashes=tuple(image_hashes) if len(image_hashes) == len(ends) else (),
            prefix_length=prefix if prefix < encoded.prompt_tokens else 0,
        )

    @property
    def length(self) -> int:
        return len(self.input_ids)
