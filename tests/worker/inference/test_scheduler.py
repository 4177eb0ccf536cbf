"""Continuous batching, driven step by step on the tiny reference checkpoint (float32, CPU).

Exactness is the gate: whatever shares its batch, however its prompt is chunked, and
whichever LongRoPE regime its neighbours are in, every job gets the reference's tokens.
Around it: admission order, rows that leave at once, cancellation, and failures that stay
with their own request.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from support.in_flight import keep_in_flight
from support.reference import CASES, TINY_MODEL, case_job
from support.stepped import Outcome, run_until, stepped_scheduler, submit

from vision_queue.errors import ModelError, ResourceExhausted
from worker.inference.engine import Engine, EngineConfig
from worker.inference.scheduler import Failed, Finished, Scheduler, Token
from worker.model.model_runner import RowInput
from worker.model.steps import UNKNOWN_TOKEN

CROSSING = "decode_crosses_2048_c16"  # a 2,043-token prompt: short factors, then long


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(EngineConfig(model=str(TINY_MODEL), device="cpu"))


def scheduler_for(
    engine: Engine,
    *,
    max_rows: int,
    positions: int = 32768,
    chunk: int | None = None,
    vision_unit_crops: int | None = None,
    decode_kernel: str = "rows",
) -> Scheduler:
    return stepped_scheduler(
        engine, max_rows=max_rows, positions=positions, decode_kernel=decode_kernel,
        prefill_chunk_tokens=chunk, vision_unit_crops=vision_unit_crops,
    )


def assert_reference(outcome: Outcome, case_id: str) -> None:
    case = CASES[case_id]
    assert outcome.tokens == case["generated_ids"], case_id
    assert isinstance(outcome.end, Finished) and outcome.end.stop_reason == case["stop_reason"]


def record_decode_batches(scheduler: Scheduler) -> list[list[RowInput]]:
    batches: list[list[RowInput]] = []
    decode = scheduler.runner.decode

    def recording(batch: Any) -> list[int]:
        batches.append(list(batch))
        return decode(batch)

    scheduler.runner.decode = recording  # type: ignore[method-assign]
    return batches


# Exactness -----------------------------------------------------------------------------------


def test_every_reference_case_batched_together_gets_the_reference_tokens(engine: Engine) -> None:
    # Given all twelve cases at once, five rows, prompts prefilled in chunks of 512, and a
    # pool too small for all of them (so some wait for space, then fill freed regions),
    scheduler = scheduler_for(engine, max_rows=5, positions=12288, chunk=512)
    jobs = {case_id: case_job(engine, case_id) for case_id in CASES}
    batches = record_decode_batches(scheduler)
    outcomes = submit(scheduler, jobs.values())

    # when the device thread serves them,
    scheduler._ensure_running()
    for job, outcome in outcomes.items():
        while outcome.end is None:
            event = job.events.get(timeout=120)
            if isinstance(event, Token):
                outcome.tokens.append(event.token_id)
            else:
                outcome.end = event
    scheduler.stop()

    # then every job has exactly the reference's tokens, and steps really were shared.
    for case_id, job in jobs.items():
        assert_reference(outcomes[job], case_id)
    assert max(len(batch) for batch in batches) >= 3
    assert scheduler.pool.allocator.free_positions == 12288  # every region returned


@pytest.mark.parametrize("decode_kernel", ["rows", "gather"])
def test_steps_launched_before_the_last_is_read_give_the_reference_tokens(
    engine: Engine, decode_kernel: str
) -> None:
    # Given launches that stay in flight until the scheduler must wait (as on a GPU), so
    # every step after a row's first is fed a token only the runner's device tensor has,
    scheduler = scheduler_for(engine, max_rows=4, chunk=512, decode_kernel=decode_kernel)
    runner = scheduler.runner
    keep_in_flight(runner)
    fed_unknown: list[bool] = []
    launch_decode = runner.launch_decode

    def recording(batch: Any) -> Any:
        fed_unknown.extend(row.token == UNKNOWN_TOKEN for row in batch)
        return launch_decode(batch)

    runner.launch_decode = recording  # type: ignore[method-assign]
    case_ids = [CROSSING, "text_eos_stop", "two_images_c4", "wide_800x400_c1", "text_only"]
    outcomes = submit(scheduler, [case_job(engine, c) for c in case_ids])

    # when they are served, then every job gets the reference's tokens.
    run_until(scheduler, outcomes)
    for case_id, outcome in zip(case_ids, outcomes.values(), strict=True):
        assert_reference(outcome, case_id)
    assert sum(fed_unknown) > len(fed_unknown) // 2
    assert scheduler.pool.allocator.free_positions == 32768


def test_rows_in_different_rope_regimes_share_steps_and_keep_their_own(engine: Engine) -> None:
    # A row crossing 2,048 during decode, one past it from its prompt, one far below it.
    scheduler = scheduler_for(engine, max_rows=3)
    case_ids = [CROSSING, "img_1280x720_jpeg_c16", "max_new_tokens_24_c4"]
    outcomes = submit(scheduler, [case_job(engine, c) for c in case_ids])
    batches = record_decode_batches(scheduler)

    run_until(scheduler, outcomes)

    for case_id, outcome in zip(case_ids, outcomes.values(), strict=True):
        assert_reference(outcome, case_id)
    shared = [b for b in batches if len(b) == 3]
    crossing_positions = {row.position for b in shared for row in b if row.position < 2100}
    # The crossing row decoded on both sides of the switch inside three-row steps.
    assert min(crossing_positions) < 2047 and max(crossing_positions) >= 2048


def test_chunked_prefill_gives_the_same_tokens_and_lets_decodes_run(engine: Engine) -> None:
    # Given a decoding row, and a 3,876-token prompt arriving, prefilled 256 at a time,
    scheduler = scheduler_for(engine, max_rows=2, chunk=256)
    short = case_job(engine, "text_only", max_new_tokens=40)
    outcomes = submit(scheduler, [short])
    run_until(scheduler, outcomes, done=lambda: len(outcomes[short].tokens) >= 2)
    long = case_job(engine, "long_two_images_c16")
    outcomes.update(submit(scheduler, [long]))
    tokens_before = len(outcomes[short].tokens)

    # when it is prefilled (image tower, then 256-position chunks, the prefix ending with
    # the last image's tokens apart: image reuse's unit, worker/model/image_cache.py),
    steps = run_until(scheduler, outcomes, done=lambda: bool(outcomes[long].tokens))

    # then the running row got a token in every one of those steps,
    prefix = max(span.start + span.length for span in long.encoded.spans)
    rest = long.encoded.prompt_tokens - prefix
    assert steps == 1 + math.ceil(prefix / 256) + math.ceil(rest / 256)
    assert len(outcomes[short].tokens) == tokens_before + steps
    # and both end with the reference's tokens (text_only's first 12 are its reference).
    run_until(scheduler, outcomes)
    assert_reference(outcomes[long], "long_two_images_c16")
    assert outcomes[short].tokens[:12] == CASES["text_only"]["generated_ids"]


def test_the_image_tower_runs_in_units_of_crops_between_decode_steps() -> None:
    # Given an engine whose prompts are chunked by 256 positions (so 4 crops per tower unit),
    chunked = Engine.load(
        EngineConfig(model=str(TINY_MODEL), device="cpu", prefill_chunk_tokens=256)
    )
    assert chunked.scheduler.vision_unit_crops == 4
    scheduler = scheduler_for(chunked, max_rows=2, chunk=256, vision_unit_crops=4)
    short = case_job(chunked, "text_only", max_new_tokens=80)
    outcomes = submit(scheduler, [short])
    run_until(scheduler, outcomes, done=lambda: bool(outcomes[short].tokens))
    long = case_job(chunked, "long_two_images_c16")  # 2 images, 13 + 13 crops
    outcomes.update(submit(scheduler, [long]))
    before = len(outcomes[short].tokens)

    # when it is prefilled: 7 tower units of <= 4 crops, then 256-position chunks (the
    # prefix ending with the last image's tokens apart),
    steps = run_until(scheduler, outcomes, done=lambda: bool(outcomes[long].tokens))

    # then the running row got a token every step, and the tokens are the reference's.
    prefix = max(span.start + span.length for span in long.encoded.spans)
    rest = long.encoded.prompt_tokens - prefix
    assert steps == 7 + math.ceil(prefix / 256) + math.ceil(rest / 256)
    assert len(outcomes[short].tokens) == before + steps
    run_until(scheduler, outcomes)
    assert_reference(outcomes[long], "long_two_images_c16")
    chunked.close()


# Rows come and go ----------------------------------------------------------------------------


def test_a_finished_request_leaves_at_once_and_its_row_goes_to_the_next(engine: Engine) -> None:
    # Given two rows, a job that ends on <|end|> after 6 tokens, a long one, and one waiting,
    scheduler = scheduler_for(engine, max_rows=2)
    short = case_job(engine, "text_eos_stop")
    long = case_job(engine, "text_only", max_new_tokens=60)
    waiting = case_job(engine, "wide_800x400_c1")
    outcomes = submit(scheduler, [short, long, waiting])

    # when the short one ends,
    run_until(scheduler, outcomes, done=lambda: outcomes[short].end is not None)

    # then the long one is still running, and the waiting job takes the freed row next step.
    assert_reference(outcomes[short], "text_eos_stop")
    assert 0 < len(outcomes[long].tokens) < 60
    assert scheduler.stats()["waiting"] == 1
    scheduler.step()
    assert scheduler.stats()["waiting"] == 0
    run_until(scheduler, outcomes)
    assert_reference(outcomes[waiting], "wide_800x400_c1")
    assert len(outcomes[long].tokens) == 60


def test_cancelling_one_row_stops_only_it(engine: Engine) -> None:
    scheduler = scheduler_for(engine, max_rows=3)
    case_ids = ["two_images_c4", "text_only", "max_new_tokens_24_c4"]
    jobs = [case_job(engine, c) for c in case_ids]
    outcomes = submit(scheduler, jobs)
    run_until(scheduler, outcomes, done=lambda: all(len(o.tokens) >= 3 for o in outcomes.values()))

    scheduler.cancel(jobs[1])
    run_until(scheduler, outcomes)

    cancelled = outcomes[jobs[1]]
    assert isinstance(cancelled.end, Finished) and cancelled.end.stop_reason == "cancelled"
    assert len(cancelled.tokens) < 12
    assert_reference(outcomes[jobs[0]], "two_images_c4")
    assert_reference(outcomes[jobs[2]], "max_new_tokens_24_c4")


def test_the_oldest_waiting_job_is_admitted_first(engine: Engine) -> None:
    # A pool with room for one of the large prompts at a time: a small job behind a large
    # one waits for it rather than overtaking it (no starvation of large requests).
    scheduler = scheduler_for(engine, max_rows=3, positions=3000)
    first, large, small = (
        case_job(engine, c)
        for c in ("img_640x480_png_c16", "portrait_gray_480x1200_jpeg_c16", "text_only")
    )
    outcomes = submit(scheduler, [first, large, small])

    scheduler.step()

    assert scheduler.stats() == {
        "waiting": 2,
        "prefilling": 1,
        "decoding": 0,
        "free_kv_positions": 3000 - scheduler.pool.allocator.rounded(first.positions_needed),
    }
    run_until(scheduler, outcomes)
    assert_reference(outcomes[small], "text_only")


def test_a_job_that_can_never_fit_is_refused_when_submitted(engine: Engine) -> None:
    scheduler = scheduler_for(engine, max_rows=2, positions=1024)

    with pytest.raises(ResourceExhausted, match="holds at most 1024"):
        scheduler.enqueue(case_job(engine, "img_640x480_png_c16"))


# Failures stay with their requests -----------------------------------------------------------


def test_out_of_memory_in_a_decode_step_halves_the_batch_and_keeps_everyone(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = scheduler_for(engine, max_rows=4)
    decode = scheduler.runner.decode

    def fits_two_rows(batch: Any) -> list[int]:
        if len(batch) > 2:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate")
        return decode(batch)

    monkeypatch.setattr(scheduler.runner, "decode", fits_two_rows)
    case_ids = ["text_only", "two_images_c4", "wide_800x400_c1", "text_eos_stop"]
    outcomes = submit(scheduler, [case_job(engine, c) for c in case_ids])

    run_until(scheduler, outcomes)

    for case_id, outcome in zip(case_ids, outcomes.values(), strict=True):
        assert_reference(outcome, case_id)
    assert scheduler._decode_limit == 2


def test_a_row_that_cannot_decode_even_alone_fails_alone(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = scheduler_for(engine, max_rows=3)
    doomed = case_job(engine, "wide_800x400_c1")
    others = [case_job(engine, c) for c in ("text_only", "two_images_c4")]
    outcomes = submit(scheduler, [others[0], doomed, others[1]])
    decode = scheduler.runner.decode
    doomed_start: list[int] = []

    def oom_with_doomed(batch: Any) -> list[int]:
        if not doomed_start:
            doomed_start.extend(r.start for r in scheduler._decoding if r.job is doomed)
        if doomed_start and any(r.start == doomed_start[0] for r in batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return decode(batch)

    monkeypatch.setattr(scheduler.runner, "decode", oom_with_doomed)
    run_until(scheduler, outcomes)

    failed = outcomes[doomed].end
    assert isinstance(failed, Failed) and isinstance(failed.error, ResourceExhausted)
    assert_reference(outcomes[others[0]], "text_only")
    assert_reference(outcomes[others[1]], "two_images_c4")


def test_a_failing_image_encoding_fails_only_its_job(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = scheduler_for(engine, max_rows=2)
    broken = case_job(engine, "wide_800x400_c1")
    fine = case_job(engine, "text_only")  # no image: never reaches the image tower

    def failing_tower(crops: torch.Tensor) -> torch.Tensor:
        raise IndexError("index 40000 is out of bounds")

    monkeypatch.setattr(engine.model.model.vision_embed_tokens, "crop_features", failing_tower)
    outcomes = submit(scheduler, [broken, fine])
    run_until(scheduler, outcomes)

    failed = outcomes[broken].end
    assert isinstance(failed, Failed) and isinstance(failed.error, ModelError)
    assert "image encoding failed: IndexError" in failed.error.message
    assert_reference(outcomes[fine], "text_only")
    assert scheduler.pool.allocator.free_positions == 32768


def test_stopping_fails_what_is_still_queued(engine: Engine) -> None:
    scheduler = scheduler_for(engine, max_rows=1)
    job = case_job(engine, "text_only")
    scheduler.enqueue(job)

    scheduler.stop()

    event = job.events.get(timeout=10)
    assert isinstance(event, Failed) and "stopped" in event.error.message
    with pytest.raises(ModelError, match="shutting down"):
        scheduler.enqueue(case_job(engine, "text_only"))
