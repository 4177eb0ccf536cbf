"""Host work overlapped with the device: the scheduler on a simulated device (issue 20).

The simulated device runs on a virtual clock here: it advances only when the scheduler
waits for it, so every launch the host has not waited for is still running, and what is
in flight, and in which order tokens arrive, does not depend on the machine's speed.
Its tokens are a function of each row's whole history, so a token fed wrongly, lost or
doubled changes the row's stream: streams equal to the synchronous loop's, and to each
job served alone, are the exactness check.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from support.stepped import Outcome, drain

from worker.inference.scheduler import Failed, Finished, Job, Scheduler, Token
from worker.model.kvcache import KVPool
from worker.model.processor import EncodedPrompt
from worker.model.sampling import SamplingParams
from worker.model.simulated import (
    H200,
    DeviceModel,
    SimulatedDevice,
    SimulatedRunner,
    VirtualClock,
)
from worker.model.steps import UNKNOWN_TOKEN, RowInput

STOP = 32007
STEP = DeviceModel("fixed", bandwidth=1.0, flops=1e12, step_s=0.005)


_devices: list[SimulatedDevice] = []


@pytest.fixture(autouse=True)
def _close_devices() -> Iterator[None]:
    yield
    while _devices:
        _devices.pop().close()


def simulated(
    *,
    max_rows: int,
    overlap: bool = True,
    positions: int = 65536,
    chunk: int | None = 64,
    recompute_past: int | None = None,
) -> tuple[Scheduler, SimulatedDevice]:
    clock = VirtualClock()
    device = SimulatedDevice(clock=clock, sleep=clock.sleep)
    _devices.append(device)
    pool = KVPool(
        num_layers=1, kv_heads=1, head_dim=1, positions=positions, dtype=torch.float32,
        device=torch.device("cpu"), tokens_first=False, zeroed=False,
    )
    runner = SimulatedRunner(
        pool, STEP, stop_id=STOP, device=device, end_every=61, long_past=recompute_past
    )
    scheduler = Scheduler(
        runner, pool, stop_ids=frozenset({STOP}), max_rows=max_rows, max_row_positions=positions,
        prefill_chunk_tokens=chunk, recompute_past=recompute_past, overlap=overlap,
    )
    return scheduler, device


@dataclass(frozen=True)
class Spec:
    prompt: tuple[int, ...]
    max_new_tokens: int
    seed: int | None = None  # sampled (temperature 0.8) when set

    def job(self) -> Job:
        sampled = self.seed is not None
        sampling = SamplingParams(0.8, 0.9, self.seed) if sampled else SamplingParams()
        encoded = EncodedPrompt(list(self.prompt), (), ())
        return Job(encoded, None, self.max_new_tokens, sampling)


def specs(count: int, seed: int = 0, prompt: int = 150) -> list[Spec]:
    rng = random.Random(seed)
    return [
        Spec(
            tuple(rng.randrange(300, 32000) for _ in range(rng.randrange(20, prompt))),
            rng.randrange(1, 90),
            seed=rng.randrange(1000) if i % 3 == 0 else None,
        )
        for i in range(count)
    ]


def serve(
    scheduler: Scheduler,
    jobs: Sequence[Job],
    on_step: Callable[[dict[Job, Outcome]], None] = lambda outcomes: None,
) -> dict[Job, Outcome]:
    outcomes = {job: Outcome() for job in jobs}
    for job in jobs:
        scheduler.enqueue(job)
    for _ in range(20000):
        scheduler.step()
        for job, outcome in outcomes.items():
            drain(job, outcome)
        on_step(outcomes)
        if all(o.end for o in outcomes.values()) and not scheduler._has_work():
            return outcomes
    raise AssertionError("the scheduler did not finish")


def streams(scheduler: Scheduler, todo: Sequence[Spec]) -> list[list[int]]:
    outcomes = serve(scheduler, [spec.job() for spec in todo])
    for outcome in outcomes.values():
        assert isinstance(outcome.end, Finished)
    return [outcome.tokens for outcome in outcomes.values()]


def record_launches(scheduler: Scheduler) -> list[list[RowInput]]:
    launches: list[list[RowInput]] = []
    launch = scheduler.runner.launch_decode

    def recording(batch: Sequence[RowInput]) -> Any:
        launches.append(list(batch))
        return launch(batch)

    scheduler.runner.launch_decode = recording  # type: ignore[method-assign]
    return launches


# The simulated device --------------------------------------------------------------------------


def test_the_simulated_device_is_a_stream() -> None:
    clock = VirtualClock()
    device = SimulatedDevice(clock=clock, sleep=clock.sleep)

    # Launches return at once and queue one behind the other,
    first = device.launch(2.0, "decode", lambda: [1])
    second = device.launch(3.0, "decode", lambda: [2, 3])
    assert clock() == 0.0 and not first.ready() and not second.ready()
    assert device.timeline == [(0.0, 2.0, "decode"), (2.0, 5.0, "decode")]

    # their results are readable when the stream gets there (waiting moves the clock),
    assert second.tokens() == [2, 3] and clock() == 5.0
    assert first.ready() and first.tokens() == [1]

    # and a launch after an idle gap starts when it is launched: the gap is not busy.
    clock.sleep(1.0)
    third = device.launch(1.0, "marker", list)
    assert third.tokens() == [] and clock() == 7.0
    assert device.busy_between(0.0, 7.0) == 6.0
    assert device.busy_between(4.0, 6.5) == 1.5
    device.close()


def test_the_bandwidth_model_gives_the_documented_h200_steps() -> None:
    context = [2_630]  # a describe row halfway through its 200 tokens
    assert 1.7e-3 < H200.decode_s(context) < 1.9e-3
    assert 4.8e-3 < H200.decode_s(context * 16) < 5.1e-3
    assert 40e-3 < H200.prefill_s(2_530, 17) < 50e-3


# Exactness ------------------------------------------------------------------------------------


def test_overlapped_steps_give_the_synchronous_streams_and_each_alone() -> None:
    # Given jobs that come and go (budgets, end tokens, sampled and greedy rows),
    todo = specs(14)
    overlapped, device = simulated(max_rows=5)
    launches = record_launches(overlapped)

    # when served with the device always a step ahead, synchronously, and each alone,
    got = streams(overlapped, todo)
    synchronous = streams(simulated(max_rows=5, overlap=False)[0], todo)
    alone = [streams(simulated(max_rows=1, overlap=False)[0], [spec])[0] for spec in todo]

    # then every job has the same tokens in all three,
    assert got == synchronous == alone
    assert any(t[-1] == STOP for t in got)
    assert any(len(t) == s.max_new_tokens for t, s in zip(got, todo, strict=True))
    for tokens, spec in zip(got, todo, strict=True):
        assert len(tokens) <= spec.max_new_tokens
    # the overlapped steps really fed tokens the host had not read,
    assert any(row.token == UNKNOWN_TOKEN for batch in launches for row in batch)
    # and every region came back.
    assert overlapped.pool.allocator.free_positions == 65536
    device.close()


def test_a_row_is_never_launched_past_its_budget_and_at_most_one_step_past_its_end() -> None:
    todo = specs(10, seed=3)
    scheduler, _ = simulated(max_rows=4)
    fed: list[tuple[Job, int]] = []  # (job, position) of every row of every decode launch
    launch = scheduler.runner.launch_decode

    def recording(batch: Sequence[RowInput]) -> Any:
        job_at = {row.start: row.job for row in scheduler._decoding}
        fed.extend((job_at[row.start], row.position) for row in batch)
        return launch(batch)

    scheduler.runner.launch_decode = recording  # type: ignore[method-assign]
    jobs = [spec.job() for spec in todo]
    outcomes = serve(scheduler, jobs)

    # No position is fed twice; a job's decode steps chose at most its budget less the
    # prefill's token, and at most one more than the tokens it got (its end in flight).
    assert len(fed) == len(set(fed))
    for job, outcome in outcomes.items():
        steps = sum(1 for fed_job, _ in fed if fed_job is job)
        assert steps <= job.max_new_tokens - 1
        assert len(outcome.tokens) - 1 <= steps <= len(outcome.tokens)
    assert any(len(o.tokens) < job.max_new_tokens for job, o in outcomes.items())


def test_the_longrope_recompute_stays_exact_with_overlap() -> None:
    # Rows cross a switch at 200 positions while decoding, beside rows that do not.
    todo = [
        Spec(tuple(range(400, 580)), 60),
        Spec(tuple(range(900, 1090)), 40, seed=5),
        Spec(tuple(range(2000, 2030)), 80),
    ]
    overlapped, _ = simulated(max_rows=3, recompute_past=200)
    prefills = 0
    prefill_unit = overlapped.runner.prefill_unit

    def counting(prompt: Any, **options: Any) -> Any:
        nonlocal prefills
        prefills += 1
        return prefill_unit(prompt, **options)

    overlapped.runner.prefill_unit = counting  # type: ignore[method-assign]
    got = streams(overlapped, todo)
    synchronous = streams(simulated(max_rows=3, overlap=False, recompute_past=200)[0], todo)
    alone = [
        streams(simulated(max_rows=1, overlap=False, recompute_past=200)[0], [spec])[0]
        for spec in todo
    ]

    assert got == synchronous == alone
    no_recompute = streams(simulated(max_rows=3)[0], todo)
    assert got != no_recompute  # the recompute changed the crossing rows' histories
    assert prefills > 3  # regrown prompts were prefilled again


# Rows that leave ------------------------------------------------------------------------------


def test_a_cancelled_row_leaves_and_the_others_keep_their_streams() -> None:
    todo = [Spec(tuple(range(300 + i, 400 + i)), 80) for i in range(4)]
    expected = [streams(simulated(max_rows=1)[0], [spec])[0] for spec in todo]
    scheduler, _ = simulated(max_rows=4)
    jobs = [spec.job() for spec in todo]
    cancelled_at: list[int] = []

    def cancel_the_second(outcomes: dict[Job, Outcome]) -> None:
        if not cancelled_at and len(outcomes[jobs[1]].tokens) >= 10:
            cancelled_at.append(len(outcomes[jobs[1]].tokens))
            scheduler.cancel(jobs[1])

    outcomes = serve(scheduler, jobs, on_step=cancel_the_second)

    cancelled = outcomes[jobs[1]]
    assert isinstance(cancelled.end, Finished) and cancelled.end.stop_reason == "cancelled"
    # A token launched before the cancel may still arrive, none after the next step.
    assert cancelled.tokens == expected[1][: len(cancelled.tokens)]
    assert len(cancelled.tokens) <= cancelled_at[0] + 2
    for index in (0, 2, 3):
        assert outcomes[jobs[index]].tokens == expected[index]
    assert scheduler.pool.allocator.free_positions == 65536


def test_a_failure_read_at_the_sync_fails_that_steps_rows_only() -> None:
    scheduler, _ = simulated(max_rows=2)
    doomed, fine = Spec(tuple(range(300, 340)), 50), Spec(tuple(range(500, 560)), 30)
    expected = streams(simulated(max_rows=1)[0], [fine])[0]
    jobs = [doomed.job(), fine.job()]
    launch = scheduler.runner.launch_decode
    failing: list[int] = []

    def fails_once_with_doomed(batch: Sequence[RowInput]) -> Any:
        if not failing and len(batch) == 1 and batch[0].position > 45:
            failing.append(batch[0].start)

            def error() -> list[int]:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

            return scheduler.runner.stream.launch(0.001, "decode", error)  # type: ignore[attr-defined]
        return launch(batch)

    scheduler.runner.launch_decode = fails_once_with_doomed  # type: ignore[method-assign]
    # The short job ends first; the long one then decodes alone and its step fails.
    outcomes = serve(scheduler, jobs)

    assert failing
    failed = outcomes[jobs[0]].end
    assert isinstance(failed, Failed) and "illegal memory access" in failed.error.message
    assert outcomes[jobs[1]].tokens == expected
    assert scheduler.pool.allocator.free_positions == 65536


@pytest.mark.parametrize("overlap", [True, False])
def test_the_device_thread_serves_simulated_requests_to_the_end(overlap: bool) -> None:
    # The real loop on its own thread, the device on wall time (a fixed short step).
    pool = KVPool(
        num_layers=1, kv_heads=1, head_dim=1, positions=16384, dtype=torch.float32,
        device=torch.device("cpu"), tokens_first=False, zeroed=False,
    )
    runner = SimulatedRunner(pool, STEP, stop_id=STOP, end_every=61)
    scheduler = Scheduler(
        runner, pool, stop_ids=frozenset({STOP}), max_rows=4, max_row_positions=16384,
        prefill_chunk_tokens=64, overlap=overlap,
    )
    todo = specs(6, seed=9)
    expected = [streams(simulated(max_rows=1)[0], [spec])[0] for spec in todo]
    jobs = [spec.job() for spec in todo]
    for job in jobs:
        scheduler.submit(job)
    got = []
    for job in jobs:
        outcome = Outcome()
        while outcome.end is None:
            event = job.events.get(timeout=60)
            if isinstance(event, Token):
                outcome.tokens.append(event.token_id)
            else:
                outcome.end = event
        got.append(outcome.tokens)
    scheduler.stop()
    runner.stream.close()
    assert got == expected


def test_the_host_overhead_benchmark_writes_its_figures(tmp_path: Any) -> None:
    # The benchmark's own plumbing (not its figures): a tiny simulated run, its JSON keys.
    import json

    from benchmarks import bench_host_overhead

    out = tmp_path / "host.json"

    bench_host_overhead.main(
        ["--batches", "2", "--warmup", "0.2", "--seconds", "0.3", "--step-ms", "2",
         "--new-tokens", "20", "--json", str(out)]
    )

    figures = json.loads(out.read_text())["batches"]["2"]
    for key in ("device_busy", "host_ms_per_step", "step_ms", "tokens_per_s"):
        assert figures[key] >= 0
    assert figures["step_ms"] in (0.0, pytest.approx(2.0))  # 0: no step in the window
