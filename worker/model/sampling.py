"""Choosing the next token: greedy, or sampled with temperature and top-p from a row's own stream.

Each sampled request owns a `TokenSampler`, a random stream seeded from its `seed` (or
from the OS when it has none) that draws one uniform number per generated token. What a
request samples therefore depends on its own logits and its own draws only, never on
which other requests share its batch, and the same seed and inputs give the same text.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class TokenSampler:
    """One request's random stream."""

    def __init__(self, params: SamplingParams) -> None:
        if params.greedy:
            raise ValueError("a greedy request needs no sampler")
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        # Reproducible draws are the point here, not secrecy.
        self._random = random.Random(seed)  # noqa: S311

    def choose(self, logits: torch.Tensor) -> int:
        """A token from one row's logits, [vocab]."""
        params = self.params
        return sample_token(logits, params.temperature, params.top_p, self.draw())

    def draw(self) -> float:
        """The stream's next uniform number: one per generated token, whoever uses it."""
        return self._random.random()


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, uniform: float) -> int:
    """Inverse-CDF sampling of softmax(logits / temperature), restricted to the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability reaches
    `top_p` (the token that crosses it included). Float64, and a stable sort, so equal
    inputs give equal tokens on every run.
    """
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True, stable=True)
        before = ordered.cumsum(0) - ordered  # probability of the tokens ranked above
        keep = before < top_p
        kept, ids = ordered[keep], order[keep]
    else:
        kept, ids = probs, None
    cdf = kept.cumsum(0)
    target = torch.tensor(uniform, dtype=cdf.dtype, device=cdf.device) * cdf[-1]
    index = int(torch.searchsorted(cdf, target.view(1), right=True).clamp(max=cdf.numel() - 1))
    return index if ids is None else int(ids[index])


def sample_rows(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """`sample_token` for many rows at once, on the logits' device, without a host sync.

    logits [S, V]; temperature, top_p, uniform [S] (float64, same device). Rows with
    top_p < 1 draw from their sorted nucleus, the others from the vocabulary in its own
    order, as `sample_token` does; tokens [S] (long). Tokens outside a row's nucleus get
    probability 0, so its CDF is flat past the nucleus and the draw lands inside it.
    """
    probs = torch.softmax(logits.double() / temperature.unsqueeze(1), dim=-1)
    nucleus = (top_p < 1.0).unsqueeze(1)
    ordered, order = probs.sort(dim=-1, descending=True, stable=True)
    before = ordered.cumsum(-1) - ordered
    keep = before < top_p.unsqueeze(1)
    ordered = torch.where(nucleus, ordered * keep, probs)
    identity = torch.arange(probs.shape[1], device=probs.device).expand_as(order)
    order = torch.where(nucleus, order, identity)
    kept = torch.where(nucleus, keep, True).sum(-1, keepdim=True)
    cdf = ordered.cumsum(-1)
    target = (uniform * cdf[:, -1]).unsqueeze(1)
    index = torch.searchsorted(cdf, target, right=True).clamp(max=kept - 1)
    return order.gather(1, index).squeeze(1)
