"""Sampling: inverse CDF of softmax(logits / T) in the top-p nucleus, one stream per request."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from worker.model.sampling import SamplingParams, TokenSampler, sample_rows, sample_token

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])


def frequencies(temperature: float, top_p: float, draws: int = 4000) -> dict[int, float]:
    # Evenly spaced uniforms: the counts follow the distribution within 1/draws.
    counts = Counter(
        sample_token(LOGITS, temperature, top_p, (i + 0.5) / draws) for i in range(draws)
    )
    return {token: count / draws for token, count in counts.items()}


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_tokens_follow_the_tempered_softmax(temperature: float) -> None:
    expected = torch.softmax(LOGITS.double() / temperature, dim=0).tolist()

    observed = frequencies(temperature, 1.0)

    for token, probability in enumerate(expected):
        assert observed.get(token, 0.0) == pytest.approx(probability, abs=1e-3)


def test_top_p_keeps_the_smallest_set_that_reaches_it() -> None:
    probs = torch.softmax(LOGITS.double(), dim=0)  # [0.57, 0.21, 0.13, 0.03, 0.08]
    # 0.57 < 0.7, 0.57 + 0.21 >= 0.7: tokens 0 and 1, renormalised.
    observed = frequencies(1.0, 0.7)

    assert set(observed) == {0, 1}
    share = (probs[0] / (probs[0] + probs[1])).item()
    assert observed[0] == pytest.approx(share, abs=1e-3)
    # A tiny top_p is greedy.
    assert set(frequencies(1.0, 1e-6)) == {0}


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others() -> None:
    logits = torch.randn(32064, generator=torch.Generator().manual_seed(3))

    def draws(seed: int) -> list[int]:
        sampler = TokenSampler(SamplingParams(temperature=1.0, top_p=0.95, seed=seed))
        return [sampler.choose(logits) for _ in range(20)]

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)


def test_a_sampler_is_only_for_sampled_requests() -> None:
    assert SamplingParams().greedy and not SamplingParams(temperature=0.7).greedy
    with pytest.raises(ValueError, match="greedy"):
        TokenSampler(SamplingParams(temperature=0.0))
    unseeded = [TokenSampler(SamplingParams(temperature=1.0)) for _ in range(2)]
    logits = torch.zeros(1000)
    assert all(0 <= s.choose(logits) < 1000 for s in unseeded)  # seeded from the OS


def test_many_rows_sampled_at_once_get_the_tokens_each_would_get_alone() -> None:
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 2000, generator=generator) * 3
    temperature = torch.tensor([0.7, 1.0, 1.3, 0.5, 2.0], dtype=torch.float64)
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.95, 1.0], dtype=torch.float64)
    for draw in (0.0, 0.25, 0.5, 0.999999):
        uniform = torch.full((5,), draw, dtype=torch.float64)

        together = sample_rows(logits, temperature, top_p, uniform).tolist()

        alone = [
            sample_token(logits[i], float(temperature[i]), float(top_p[i]), draw) for i in range(5)
        ]
        assert together == alone
