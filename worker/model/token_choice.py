"""Choosing each row's next token from a step's logits, and the logprobs of rows that ask.

Greedy rows take the argmax; sampled rows use their own `TokenSampler` (on the host), or
`sample_rows` on the device (the graph path, `on_device`). A grammar's mask
(`RowInput.allowed`) sets every other logit to -inf before the choice.

With `row_independent` (CPU float32) every row's hidden state is computed exactly as at
batch 1, and the batched lm_head product, whose rounding differs from the single-row one
by at most 2·γ_K·Σ|h||w| per logit, is trusted only where the top-2 margin exceeds twice
that bound; other rows, sampled rows and rows reporting logprobs get their logits
recomputed alone. So a request's tokens (and logprobs) never depend on its neighbours.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from worker.model.sampling import TokenSampler, sample_rows
from worker.model.steps import RowInput, RowLogprobs, row_logprobs, unpack_logprobs

_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@dataclasses.dataclass
class TokenChooser:
    """The runner's token choice: `logits` maps hidden states [B, hidden] to logits [B, V]."""

    logits: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor  # the lm_head's [V, hidden], for the rounding bound
    row_independent: bool
    staged: Callable[[torch.Tensor], torch.Tensor]  # a host tensor on the device

    def __post_init__(self) -> None:
        self._unit = _UNIT_ROUNDOFF.get(self.weight.dtype, 2.0**-8)
        # max |w| per input feature: Σ_k |h_k| · max_n |w_nk| bounds Σ_k |h_k w_nk| for all n.
        self._weight_max = self.weight.detach().abs().amax(dim=0).float()

    def choose(
        self,
        hidden: torch.Tensor | None,
        batch: Sequence[RowInput | None],
        logits: torch.Tensor | None = None,
    ) -> list[int]:
        """Next token per row from hidden states [B, hidden] (or logits [B, V] given)."""
        return self.choose_with_logprobs(hidden, batch, logits)[0]

    def choose_with_logprobs(
        self,
        hidden: torch.Tensor | None,
        batch: Sequence[RowInput | None],
        logits: torch.Tensor | None = None,
    ) -> tuple[list[int], list[RowLogprobs | None]]:
        """`choose`, and the logprobs of each row that asks (from the logits it chose from:
        under `row_independent` its single-row logits, so they do not depend on the batch)."""
        if logits is None:
            assert hidden is not None
            logits = self.logits(hidden)
        raw = logits
        samplers = [row.sampler if row is not None else None for row in batch]
        masks = [row.allowed if row is not None else None for row in batch]
        asks = [row.top_logprobs if row is not None else None for row in batch]
        if any(mask is not None for mask in masks):
            # A grammar's tokens only: the margin test below then runs on the masked logits.
            logits = logits.clone()
            for index, mask in enumerate(masks):
                if mask is not None:
                    logits[index].masked_fill_(~mask.to(logits.device), float("-inf"))
        if self.row_independent and hidden is not None and logits.shape[0] > 1:
            tokens, exact = self._greedy_where_sure(hidden, logits, samplers, asks)
        else:
            tokens, exact = logits.argmax(dim=-1).tolist(), set()
        logprobs: list[RowLogprobs | None] = [None] * len(batch)
        for index, sampler in enumerate(samplers):
            row_logits, row_raw = logits[index], raw[index]
            if index in exact:
                assert hidden is not None
                row_raw = row_logits = self.logits(hidden[index : index + 1])[0]
                mask = masks[index]
                if mask is not None:
                    row_logits = row_raw.masked_fill(~mask.to(row_raw.device), float("-inf"))
                if sampler is None:
                    tokens[index] = int(row_logits.argmax())
            if sampler is not None:
                tokens[index] = sampler.choose(row_logits)
            ask = asks[index]
            if ask is not None:
                # The distribution the token was chosen from: a grammar's mask applied, so
                # a greedy token is always the first alternative.
                chosen = torch.tensor([tokens[index]], device=row_logits.device)
                values = row_logprobs(row_logits.view(1, -1), chosen, ask)[0].tolist()
                logprobs[index] = unpack_logprobs([values], [ask])[0]
        return tokens, logprobs

    def _greedy_where_sure(
        self,
        hidden: torch.Tensor,
        logits: torch.Tensor,
        samplers: Sequence[TokenSampler | None],
        asks: Sequence[int | None],
    ) -> tuple[list[int], set[int]]:
        """Batched argmax per row, and the rows that need their single-row logits."""
        top2 = logits.topk(2, dim=-1)
        margin = top2.values[:, 0] - top2.values[:, 1]
        k = hidden.shape[-1]
        gamma = k * self._unit / (1 - k * self._unit)
        # Both products lie within γ_K·S of the exact one; a margin above twice their
        # distance (with a factor 2 of slack for rounding in S itself) cannot flip. An
        # exact tie has margin 0, so it is always decided on the single-row logits.
        spread = hidden.abs().float() @ self._weight_max
        unsure = (margin <= 8 * gamma * spread).tolist()
        # Sampled rows, and rows reporting logprobs, use their single-row logits whole.
        exact = {
            i
            for i, flag in enumerate(unsure)
            if flag or samplers[i] is not None or asks[i] is not None
        }
        return top2.indices[:, 0].tolist(), exact

    def on_device(self, logits: torch.Tensor, batch: Sequence[RowInput]) -> torch.Tensor:
        """Each row's token as a device tensor [B]: the argmax, or drawn on the device."""
        masked = [(i, row.allowed) for i, row in enumerate(batch) if row.allowed is not None]
        if masked:
            keep = torch.ones(logits.shape, dtype=torch.bool)
            for i, allowed in masked:
                keep[i] = allowed
            logits = logits.masked_fill(~self.staged(keep), float("-inf"))
        tokens = logits.argmax(dim=-1)
        sampled = [(i, row.sampler) for i, row in enumerate(batch) if row.sampler is not None]
        if sampled:
            params = torch.tensor(
                [[s.params.temperature, s.params.top_p, s.draw()] for _, s in sampled],
                dtype=torch.float64,
            )
            index = self.staged(torch.tensor([i for i, _ in sampled]))
            params = self.staged(params)
            tokens[index] = sample_rows(logits[index], params[:, 0], params[:, 1], params[:, 2])
        return tokens
