"""What the batch scheduler asks of a model runner: `ModelRunner`, or `SimulatedRunner`.

The scheduler (worker.inference.scheduler) cannot tell them apart: the simulated one runs
no model, but its launches behave as a device stream's (worker.model.simulated).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

import torch

from worker.model.config import RopeFactors
from worker.model.model_runner import PromptPrefill
from worker.model.steps import RowInput, StepTokens


class Runner(Protocol):
    """What the scheduler asks of a model runner (ModelRunner; SimulatedRunner in tests)."""

    device: torch.device

    def prefill_unit(
        self, prompt: PromptPrefill, *, max_tokens: int | None = ..., max_crops: int | None = ...
    ) -> torch.Tensor | None: ...

    def rope_factors(self, length: int) -> RopeFactors: ...

    def release(self, prompt_pin: Hashable | None) -> None: ...

    def copy_region(self, source: int, target: int, length: int) -> None: ...

    def regrown(
        self, input_ids: Sequence[int], prompt_embeds: torch.Tensor, generated: Sequence[int],
        start: int,
    ) -> PromptPrefill: ...

    def launch_decode(self, batch: Sequence[RowInput]) -> StepTokens: ...

    def launch_first_token(self, hidden: torch.Tensor, row: RowInput) -> StepTokens: ...

    def marker(self) -> StepTokens: ...
