"""`n` choices from one prefill (tiny reference checkpoint, float32, CPU): the prompt is
prefilled once, the n rows decode in the same steps, each samples from its own stream
derived from the request's seed, and the same seed gives the same n texts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from support.reference import CASES, TINY_MODEL, case_request

from vision_queue.errors import InvalidInput
from worker.inference.choices import choice_seed
from worker.inference.engine import Engine, EngineConfig

CASE = "two_images_c4"


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    engine = Engine.load(EngineConfig(model=str(TINY_MODEL), device="cpu", max_batch=4))
    yield engine
    engine.close()


def counting(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Prefill calls and decode batch sizes from here on."""
    seen: dict[str, list[int]] = {"prefill": [], "decode": []}
    prefill, decode = engine.runner.prefill, engine.runner.decode

    def counted_prefill(*args: Any, **kwargs: Any) -> Any:
        seen["prefill"].append(1)
        return prefill(*args, **kwargs)

    def counted_decode(batch: Any) -> Any:
        seen["decode"].append(len(batch))
        return decode(batch)

    monkeypatch.setattr(engine.runner, "prefill", counted_prefill)
    monkeypatch.setattr(engine.runner, "decode", counted_decode)
    return seen


def test_sampled_choices_share_one_prefill_and_repeat_with_their_seed(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampled = {"temperature": 1.0, "seed": 1234, "max_new_tokens": 10}
    # Given the request alone (n = 1)
    alone = engine.generate(case_request(CASE, **sampled))
    monkeypatch.setattr(engine.image_cache, "capacity", 0)  # every prefill: the request's own
    seen = counting(engine, monkeypatch)
    # When it asks for three choices
    result = engine.generate(case_request(CASE, n=3, **sampled))
    choices = [result, *result.more]
    # Then the prompt was prefilled once (the image prefix and the rest: two units), the
    # three rows decoded in the same steps, and the first choice is the request alone
    assert len(choices) == 3
    assert len(seen["prefill"]) == 2
    assert 3 in seen["decode"]
    assert choices[0].token_ids == alone.token_ids
    assert all(c.prompt_tokens == alone.prompt_tokens for c in choices)
    # And the same seed gives the same three texts again; the choices differ
    again = engine.generate(case_request(CASE, n=3, **sampled))
    assert [c.token_ids for c in [again, *again.more]] == [c.token_ids for c in choices]
    assert len({tuple(c.token_ids) for c in choices}) > 1


def test_greedy_choices_are_the_reference_each(engine: Engine) -> None:
    result = engine.generate(case_request(CASE, n=2))
    for choice in (result, *result.more):
        assert choice.token_ids == CASES[CASE]["generated_ids"]


def test_more_choices_than_batch_rows_decode_in_groups(engine: Engine) -> None:
    # Given a worker with 4 batch rows, when a request asks for 6 greedy choices, then
    # it runs alone, its rows decoding 4 and 2 at a time, each the reference's tokens
    result = engine.generate(case_request(CASE, n=6))
    assert len(result.more) == 5
    for choice in (result, *result.more):
        assert choice.token_ids == CASES[CASE]["generated_ids"]


def test_n_out_of_range_is_invalid_input(engine: Engine) -> None:
    with pytest.raises(InvalidInput) as refused:
        engine.generate(case_request(CASE, n=9))
    assert refused.value.field == "n"


def test_choice_seeds_are_derived_and_distinct() -> None:
    assert choice_seed(None, 3) is None
    assert choice_seed(7, 0) == 7
    seeds = {choice_seed(7, index) for index in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds if s is not None)
