"""Image reuse: the KV of a prompt's image prefix and an image's crops, kept for later tasks
(worker/model/image_cache.py), on the tiny reference checkpoint (float32, CPU).

Exactness is the gate: hit or miss, cache on or off, every reference case gets the
original's tokens. Around it: what a hit reports, the LongRoPE boundary, eviction under a
tiny budget while rows use entries, and a cancelled row that shares a prefix.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
from support.reference import CASES, TINY_MODEL, case_job, case_request
from support.stepped import run_until, stepped_scheduler, submit

from worker.inference.engine import Engine, EngineConfig
from worker.inference.scheduler import Finished, Job, Scheduler
from worker.model.image_cache import ImageCache

IMAGE_CASES = [case_id for case_id, case in CASES.items() if case["images"]]
SHORT = "img_640x480_png_c16"  # shapes_640x480.png, 16 crops, 1,939 positions
SAME_IMAGE = "decode_crosses_2048_c16"  # the same image and crops, another question


def prefix_of(job: Job) -> int:
    return max(span.start + span.length for span in job.encoded.spans)


@pytest.fixture(scope="module")
def cached_engine() -> Iterator[Engine]:
    engine = Engine.load(EngineConfig(model=str(TINY_MODEL), device="cpu"))
    yield engine
    engine.close()


def test_every_reference_case_gets_its_tokens_on_a_miss_and_on_a_hit(
    cached_engine: Engine,
) -> None:
    # Given a worker's engine with the image cache on (its CPU default)
    assert cached_engine.image_cache.enabled
    cache = cached_engine.image_cache
    # When every image case runs twice (the second time every prefix is cached)
    first = {c: cached_engine.generate(case_request(c)) for c in IMAGE_CASES}
    hits_before = cache.hits["prefix"]
    again = {c: cached_engine.generate(case_request(c)) for c in IMAGE_CASES}
    # Then each run gives the reference's tokens, and every second run was a hit that
    # reports its prefix's positions as cached
    for case_id in IMAGE_CASES:
        expected = CASES[case_id]["generated_ids"]
        assert first[case_id].token_ids == expected, case_id
        assert again[case_id].token_ids == expected, case_id
        prefix = prefix_of(case_job(cached_engine, case_id))
        assert again[case_id].cached_tokens == prefix, case_id
    assert cache.hits["prefix"] - hits_before == len(IMAGE_CASES)
    # And a different question about an image seen before hits on the first run
    assert first[SAME_IMAGE].cached_tokens or first[SHORT].cached_tokens
    assert cache.hits["crops"] >= len(IMAGE_CASES)


def test_the_cache_off_gives_the_same_tokens_and_reports_nothing_cached() -> None:
    engine = Engine.load(EngineConfig(model=str(TINY_MODEL), device="cpu", image_cache_bytes=0))
    try:
        for case_id in (SHORT, SAME_IMAGE, "two_images_c4"):
            result = engine.generate(case_request(case_id))
            assert result.token_ids == CASES[case_id]["generated_ids"], case_id
            assert result.cached_tokens == 0
        assert len(engine.image_cache) == 0
    finally:
        engine.close()


def test_a_prefix_cached_under_the_short_factors_never_serves_a_long_prompt(
    cached_engine: Engine,
) -> None:
    # Given the image's prefix cached by a short prompt (1,939 positions < 2,048)
    cached_engine.generate(case_request(SHORT))
    # When the same image comes with a question that makes the prompt pass 2,048
    # positions, so the whole prompt is rotated with the long factors
    question = "Describe every shape. " * 40
    long = cached_engine.generate(case_request(SHORT, prompt=question, max_new_tokens=4))
    # Then it is a miss, and its tokens are those of an engine without a cache
    assert long.prompt_tokens > 2048
    assert long.cached_tokens == 0
    plain = Engine.load(EngineConfig(model=str(TINY_MODEL), device="cpu", image_cache_bytes=0))
    try:
        expected = plain.generate(case_request(SHORT, prompt=question, max_new_tokens=4))
    finally:
        plain.close()
    assert long.token_ids == expected.token_ids
    # And a second long prompt about it hits the long prefix the first one cached
    again = cached_engine.generate(case_request(SHORT, prompt=question, max_new_tokens=4))
    assert again.cached_tokens > 0 and again.token_ids == expected.token_ids


# The scheduler with a cache of its own, stepped by the test ------------------------------


def scheduler_with(engine: Engine, cache: ImageCache, rows: int = 3) -> Scheduler:
    return stepped_scheduler(
        engine, max_rows=rows, row_positions=8192, runner_options={"image_cache": cache}
    )


def job_for(engine: Engine, case_id: str) -> Job:
    job = case_job(engine, case_id)
    job.image_hashes = tuple(CASES[case_id]["images"])  # the file names stand in for hashes
    return job


def run_alone(scheduler: Scheduler, job: Job) -> None:
    run_until(scheduler, submit(scheduler, [job]))


def after_steps(steps: int) -> Callable[[], bool]:
    """A `run_until` condition: true on its `steps`-th call (after that many steps)."""
    count = itertools.count(1)
    return lambda: next(count) >= steps


def prefix_bytes(engine: Engine, case_id: str) -> int:
    config = engine.model.config
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    return prefix_of(case_job(engine, case_id)) * per_position


def test_under_a_tiny_budget_an_entry_in_use_is_never_evicted(cached_engine: Engine) -> None:
    # Given a cache with room for one image prefix only, holding the first image's
    budget = prefix_bytes(cached_engine, SHORT) + 1024
    cache = ImageCache(budget)
    scheduler = scheduler_with(cached_engine, cache)
    run_alone(scheduler, job_for(cached_engine, SHORT))
    assert cache.misses["prefix"] == 1 and len(cache) == 1
    # When a row is served from it, and while that row runs another image's row finishes
    # its prefix (which would need the room)
    user = job_for(cached_engine, SAME_IMAGE)
    other = job_for(cached_engine, "rgba_png_520x390_c16")
    outcomes = submit(scheduler, [user, other])
    run_until(scheduler, outcomes, done=after_steps(4))
    assert outcomes[user].end is None and cache.hits["prefix"] == 1
    run_until(scheduler, outcomes)
    # Then the entry in use stayed (the newcomer was not stored), nothing was evicted,
    # and both rows got the reference's tokens
    assert cache.evictions["prefix"] == 0
    assert cache.bytes_held <= budget and len(cache) == 1
    for job, case_id in ((user, SAME_IMAGE), (other, "rgba_png_520x390_c16")):
        assert outcomes[job].tokens == CASES[case_id]["generated_ids"], case_id
    # And once it left, the next image's prefix takes its place (least recently used out)
    run_alone(scheduler, job_for(cached_engine, "rgba_png_520x390_c16"))
    assert cache.evictions["prefix"] == 1 and len(cache) == 1
    assert cache.bytes_held <= budget


def test_a_cancelled_row_that_shares_a_prefix_leaves_it_to_the_others(
    cached_engine: Engine,
) -> None:
    # Given an image prefix cached, and two rows served from it
    cache = ImageCache(64 * 2**20)
    scheduler = scheduler_with(cached_engine, cache)
    run_alone(scheduler, job_for(cached_engine, SHORT))
    doomed, survivor = job_for(cached_engine, SHORT), job_for(cached_engine, SAME_IMAGE)
    outcomes = submit(scheduler, [doomed, survivor])
    run_until(scheduler, outcomes, done=after_steps(5))
    key = next(iter(cache._entries))
    assert cache.pinned(key) == 2
    # When one is cancelled mid-decode
    scheduler.cancel(doomed)
    run_until(scheduler, outcomes)
    # Then it ends cancelled, the other gets the reference's tokens, and the entry stays,
    # pinned by nobody
    end, survived = outcomes[doomed].end, outcomes[survivor].end
    assert isinstance(end, Finished) and end.stop_reason == "cancelled"
    assert outcomes[survivor].tokens == CASES[SAME_IMAGE]["generated_ids"]
    assert key in cache and cache.pinned(key) == 0
    assert isinstance(survived, Finished) and survived.cached_tokens > 0


def test_the_workers_metrics_report_hits_misses_evictions_and_bytes() -> None:
    from prometheus_client import generate_latest

    from worker.metrics import WorkerMetrics

    # Given a cache with room for two 100-byte entries, watched by a worker's metrics
    cache = ImageCache(200)
    metrics = WorkerMetrics("w", "cpu")
    metrics.watch_image_cache(cache)
    # When three entries go in (the first evicted) and lookups hit and miss
    for name in ("a", "b", "c"):
        assert cache.get("prefix", name) is None
        assert cache.put("prefix", name, name, 100)
    assert cache.get("prefix", "c") == "c"
    assert cache.get("crops", "a") is None
    text = generate_latest(metrics.registry).decode()
    # Then the scrape says so
    assert 'vq_image_cache_hits_total{kind="prefix"} 1.0' in text
    assert 'vq_image_cache_misses_total{kind="prefix"} 3.0' in text
    assert 'vq_image_cache_misses_total{kind="crops"} 1.0' in text
    assert 'vq_image_cache_evictions_total{kind="prefix"} 1.0' in text
    assert "vq_image_cache_bytes 200.0" in text


def test_the_phi35_reference_holds_on_misses_and_hits() -> None:
    from support.phi35v import PHI35_CASES, PHI35_MODEL, phi35_request

    # Given Phi-3.5-vision (recompute at the LongRoPE switch) with the image cache on
    engine = Engine.load(EngineConfig(model=str(PHI35_MODEL), device="cpu"))
    try:
        cases = [c for c, case in PHI35_CASES.items() if case["images"]]
        # When every image case runs twice
        first = {c: engine.generate(phi35_request(c)) for c in cases}
        again = {c: engine.generate(phi35_request(c)) for c in cases}
    finally:
        engine.close()
    # Then each run gives the reference's tokens; rows that will recompute never take a
    # cached prefix (they need the image embeddings), the others hit the second time
    for case_id in cases:
        case = PHI35_CASES[case_id]
        assert first[case_id].token_ids == case["generated_ids"], case_id
        assert again[case_id].token_ids == case["generated_ids"], case_id
        if case["recompute_steps"]:
            assert again[case_id].cached_tokens == 0, case_id
    assert any(result.cached_tokens for result in again.values())
