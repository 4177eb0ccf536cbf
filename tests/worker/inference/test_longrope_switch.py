"""Phi-3.5-vision's LongRoPE switch in the batched engine, against Microsoft's Phi-3.5 code.

Phi-3-vision's code keeps the keys it cached under the short factors when a sequence grows
past `original_max_position_embeddings` (2,048 in the tiny checkpoints) while decoding;
Phi-3.5's code recomputes the whole sequence with the long factors at that step. The engine
reads which from the checkpoint (VQ_LONGROPE_SWITCH overrides it) and, for Phi-3.5,
re-prefills the crossing row into its own KV region while the other rows decode on.

Exactness is the gate: every case of tests/data/phi35v-reference gives the reference's
token ids and text, alone and batched with rows that do not cross (float32, CPU).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
import torch
from support.in_flight import keep_in_flight
from support.phi35v import (
    CROSSING,
    PHI35_CASES,
    PHI35_MODEL,
    SWITCH,
    phi35_job,
    phi35_request,
)
from support.reference import TINY_MODEL
from support.stepped import run_until, stepped_scheduler, submit

from vision_queue.errors import ModelError
from worker.inference.control import RunControl
from worker.inference.engine import Engine, EngineConfig
from worker.inference.scheduler import Finished, Scheduler
from worker.model.model_runner import PromptPrefill


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(EngineConfig(model=str(PHI35_MODEL), device="cpu", max_batch=4))


def assert_reference(token_ids: list[int], text: str | None, case_id: str) -> None:
    case = PHI35_CASES[case_id]
    assert token_ids == case["generated_ids"], case_id
    if text is not None:
        assert text == case["generated_text"], case_id


# Which behaviour ------------------------------------------------------------------------------


def test_the_checkpoint_says_which_behaviour_it_needs(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="worker.inference.engine"):
        phi3v = Engine.load(EngineConfig(model=str(TINY_MODEL), device="cpu"))

    assert (engine.longrope_switch, engine.scheduler.recompute_past) == ("recompute", SWITCH)
    assert (phi3v.longrope_switch, phi3v.scheduler.recompute_past) == ("keep-cache", None)
    # The start-up line says what was chosen and why.
    assert "LongRoPE switch at 2048 positions: keep-cache (config.json shows no sign of" in (
        caplog.text
    )


def test_the_setting_overrides_the_checkpoint_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="worker.inference.engine"):
        forced = Engine.load(
            EngineConfig(model=str(PHI35_MODEL), device="cpu", longrope_switch="keep-cache")
        )

    assert forced.longrope_switch == "keep-cache"
    assert "keep-cache (set by VQ_LONGROPE_SWITCH)" in caplog.text
    # Then Phi-3.5's crossing cases continue from the short-rotated keys, as Phi-3-vision's
    # code would: the same tokens up to the recompute step, different ones after it.
    for case_id in CROSSING:
        step = PHI35_CASES[case_id]["recompute_steps"][0]
        tokens = forced.generate(phi35_request(case_id)).token_ids
        assert tokens[:step] == PHI35_CASES[case_id]["generated_ids"][:step]
        assert tokens != PHI35_CASES[case_id]["generated_ids"], case_id


def test_an_unknown_switch_behaviour_is_refused_at_load() -> None:
    with pytest.raises(ModelError, match="unknown LongRoPE switch 'sometimes'"):
        Engine.load(EngineConfig(model=str(PHI35_MODEL), device="cpu", longrope_switch="sometimes"))


# Exactness through the engine -----------------------------------------------------------------


@pytest.mark.parametrize("case_id", list(PHI35_CASES))
def test_every_phi35_case_gives_the_reference_alone(engine: Engine, case_id: str) -> None:
    result = engine.generate(phi35_request(case_id))

    assert_reference(result.token_ids, result.text, case_id)
    assert result.stop_reason == PHI35_CASES[case_id]["stop_reason"]
    assert result.prompt_tokens == PHI35_CASES[case_id]["prompt_tokens"]


class Streamed(RunControl):
    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.counts: list[int] = []

    def on_text(self, piece: str) -> None:
        self.pieces.append(piece)

    def on_token(self, count: int) -> None:
        self.counts.append(count)


def test_a_recomputing_request_streams_every_token_as_any_other(engine: Engine) -> None:
    control = Streamed()

    result = engine.generate(phi35_request("crosses_2048_two_frames_c4", control=control))

    assert_reference(result.token_ids, result.text, "crosses_2048_two_frames_c4")
    assert "".join(control.pieces) == result.text
    assert control.counts == list(range(1, 25))


# The batched engine ---------------------------------------------------------------------------


def scheduler_for(
    engine: Engine,
    *,
    max_rows: int,
    positions: int = 16384,
    chunk: int | None = None,
    vision_unit_crops: int | None = None,
) -> Scheduler:
    return stepped_scheduler(
        engine, max_rows=max_rows, positions=positions, window=positions,
        prefill_chunk_tokens=chunk, vision_unit_crops=vision_unit_crops, recompute_past=SWITCH,
    )


def record_prefills(scheduler: Scheduler) -> list[tuple[int, int, int]]:
    """(region start, prompt length, offset before the unit) of every prefill unit that
    runs a recompute: a prompt built by `ModelRunner.regrown`, or a first one as long."""
    units: list[tuple[int, int, int]] = []
    prefill_unit = scheduler.runner.prefill_unit

    def recording(prompt: PromptPrefill, **options: Any) -> torch.Tensor | None:
        if not prompt.grids or prompt.length != SWITCH + 1:  # not the 2,049-token control
            units.append((prompt.start, prompt.length, prompt.offset))
        return prefill_unit(prompt, **options)

    scheduler.runner.prefill_unit = recording  # type: ignore[method-assign]
    return units


@pytest.mark.parametrize("in_flight", [False, True])
def test_every_phi35_case_batched_together_gets_the_reference(
    engine: Engine, in_flight: bool
) -> None:
    # Given all seventeen cases at once, five rows, prompts (and recomputes) prefilled 512
    # positions at a time, the image tower 8 crops a unit, and a pool that holds only some
    # of them at once (rows crossing the switch next to rows that never do), with each
    # step launched before the previous one is read, as on a GPU, or read at once,
    scheduler = scheduler_for(engine, max_rows=5, positions=12288, chunk=512, vision_unit_crops=8)
    if in_flight:
        keep_in_flight(scheduler.runner)
    jobs = {case_id: phi35_job(engine, case_id) for case_id in PHI35_CASES}
    units = record_prefills(scheduler)
    outcomes = submit(scheduler, jobs.values())

    run_until(scheduler, outcomes)

    # then every job has exactly the reference's tokens and stop reason,
    for case_id, job in jobs.items():
        assert_reference(outcomes[job].tokens, None, case_id)
        end = outcomes[job].end
        assert isinstance(end, Finished) and end.stop_reason == PHI35_CASES[case_id]["stop_reason"]
    # each crossing case was re-prefilled once, as 2,049 positions (5 units of <= 512),
    recomputed = [unit for unit in units if unit[1] == SWITCH + 1]
    assert len(recomputed) == 5 * len(CROSSING)
    # and every region was returned.
    assert scheduler.pool.allocator.free_positions == 12288


def test_a_row_re_prefills_in_units_while_its_neighbours_keep_decoding(engine: Engine) -> None:
    # Given a decoding row and a 2,045-token prompt that crosses 2,048 at its 4th decode
    # step, with prefill units of 256 positions,
    scheduler = scheduler_for(engine, max_rows=2, chunk=256)
    other = phi35_job(engine, "text_only")
    other.max_new_tokens = 200
    crossing = phi35_job(engine, "crosses_2048_prompt2045_c16")
    outcomes = submit(scheduler, [other, crossing])
    units = record_prefills(scheduler)
    run_until(scheduler, outcomes, done=lambda: len(outcomes[crossing].tokens) == 3)
    row = scheduler._decoding[-1]
    assert (row.job, row.kv_factors, row.prompt_embeds is not None) == (crossing, "short", True)

    # when its 4th token arrives, so that the next one fed would be the first past 2,048,
    run_until(scheduler, outcomes, done=lambda: len(outcomes[crossing].tokens) == 4)
    assert scheduler._prefilling == [row] and row.recomputing
    start, before = row.start, len(outcomes[other].tokens)
    steps = run_until(scheduler, outcomes, done=lambda: len(outcomes[crossing].tokens) >= 5)

    # then its whole sequence (2,045 + 4 = 2,049 positions) was prefilled again into the
    # same region, with the long factors, in 9 units of <= 256, one per step,
    recompute = [unit for unit in units if unit[1] == SWITCH + 1]
    assert [offset for _, _, offset in recompute] == list(range(0, 2049, 256))
    assert {unit_start for unit_start, _, _ in recompute} == {start}
    assert steps == 9
    assert (row.kv_factors, row.prompt_embeds, row.recomputing) == ("long", None, False)
    # the other row got a token in every one of those steps,
    assert len(outcomes[other].tokens) == before + steps
    # and both end with the reference's tokens (text_only's first 12 are its reference).
    run_until(scheduler, outcomes)
    assert_reference(outcomes[crossing].tokens, None, "crosses_2048_prompt2045_c16")
    assert outcomes[other].tokens[:12] == PHI35_CASES["text_only"]["generated_ids"]


def test_a_prompt_long_from_the_start_or_one_that_ends_first_never_recomputes(
    engine: Engine,
) -> None:
    # Given the 2,049-token control, and a crossing case whose budget ends at the switch,
    scheduler = scheduler_for(engine, max_rows=2)
    long = phi35_job(engine, "prompt_2049_long_prefill_c16")
    short = phi35_job(engine, "crosses_2048_prompt2045_c16")
    short.max_new_tokens = 4  # feeds positions up to 2,047: the sequence stays within 2,048
    outcomes = submit(scheduler, [long, short])
    units = record_prefills(scheduler)
    run_until(scheduler, outcomes, done=lambda: len(scheduler._decoding) == 2)

    # then neither keeps its embeddings, the control's keys are long from its prefill,
    assert [(r.kv_factors, r.prompt_embeds) for r in scheduler._decoding] == [
        ("long", None), ("short", None)
    ]
    run_until(scheduler, outcomes)

    # and neither was prefilled again (the control's own prefill is not recorded).
    assert {length for _, length, _ in units} == {2045}
    assert_reference(outcomes[long].tokens, None, "prompt_2049_long_prefill_c16")
    reference = PHI35_CASES["crosses_2048_prompt2045_c16"]["generated_ids"]
    assert outcomes[short].tokens == reference[:4]


def test_cancelling_a_row_while_it_recomputes_frees_its_region(engine: Engine) -> None:
    scheduler = scheduler_for(engine, max_rows=2, positions=8192, chunk=256)
    job = phi35_job(engine, "crosses_2048_at_step1_c16")
    outcomes = submit(scheduler, [job])
    run_until(scheduler, outcomes, done=lambda: any(r.recomputing for r in scheduler._prefilling))

    scheduler.cancel(job)
    run_until(scheduler, outcomes)

    end = outcomes[job].end
    assert isinstance(end, Finished) and end.stop_reason == "cancelled"
    assert outcomes[job].tokens == PHI35_CASES["crosses_2048_at_step1_c16"]["generated_ids"][:1]
    assert scheduler.pool.allocator.free_positions == 8192
    assert scheduler.stats()["prefilling"] == scheduler.stats()["decoding"] == 0


# GPU (skipped without CUDA) -------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def serve_concurrently(engine: Engine, case_ids: list[str]) -> dict[str, Any]:
    """Each case from its own thread, as the worker's slots do; results or exceptions."""
    outcomes: dict[str, Any] = {}

    def serve(case_id: str) -> None:
        try:
            outcomes[case_id] = engine.generate(phi35_request(case_id))
        except Exception as exc:
            outcomes[case_id] = exc

    threads = [threading.Thread(target=serve, args=(c,)) for c in case_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@pytest.mark.gpu
@needs_gpu
def test_float32_on_gpu_batched_recomputes_as_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Full float32 in the patch convolution too, as in the CPU reference; CUDA's default
    # prefill units (1,024 positions) split each recompute in three.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    gpu = Engine.load(
        EngineConfig(model=str(PHI35_MODEL), device="cuda", dtype="float32", max_batch=4)
    )
    case_ids = [*CROSSING, "prompt_2049_long_prefill_c16", "text_only"]

    results = serve_concurrently(gpu, case_ids)

    for case_id in case_ids:
        result = results[case_id]
        assert not isinstance(result, Exception), (case_id, result)
        assert_reference(result.token_ids, result.text, case_id)
    gpu.close()


@pytest.mark.gpu
@needs_gpu
def test_bfloat16_on_gpu_recomputes_batched_as_alone() -> None:
    # Given the CUDA path (varlen attention, decode graphs), crossing rows beside others,
    gpu = Engine.load(EngineConfig(model=str(PHI35_MODEL), device="cuda", max_batch=4))
    gpu.warmup()
    case_ids = [*CROSSING[:3], "two_frames_c4"]
    alone = {c: gpu.generate(phi35_request(c)) for c in case_ids}

    together = serve_concurrently(gpu, case_ids)

    # then each gets its batch-1 tokens up to the first step where bf16 noise could decide.
    for case_id in case_ids:
        steps = PHI35_CASES[case_id]["steps"]
        clear = next((i for i, step in enumerate(steps) if step["margin"] < 0.05), len(steps))
        assert together[case_id].token_ids[:clear] == alone[case_id].token_ids[:clear]
        assert together[case_id].completion_tokens == PHI35_CASES[case_id]["max_new_tokens"]
    gpu.close()
