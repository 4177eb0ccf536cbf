"""How a step runs: row independence, token choice near ties, the graph-shaped decode step
(buckets, idle rows, static buffers; uncaptured on the CPU), its compiled form, errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from support.reference import CASES, case_job
from support.stepped import CPU, cpu_pool

from vision_queue.errors import InvalidInput, ModelError, ResourceExhausted
from worker.inference.engine import Engine
from worker.inference.scheduler import Finished, Scheduler, Token
from worker.model import model_runner
from worker.model.errors import model_errors
from worker.model.model_runner import ModelRunner, RowInput, bucket_for, graph_buckets
from worker.model.sampling import SamplingParams, TokenSampler
from worker.model.steps import UNKNOWN_TOKEN


def runner_for(
    engine: Engine, *, decode_kernel: str = "rows", max_rows: int = 4, **options: Any
) -> ModelRunner:
    pool = cpu_pool(engine, 16384, zeroed=True)
    settings: dict[str, Any] = {
        "device": CPU,
        "kernel": "sdpa",
        "decode_kernel": decode_kernel,
        "row_independent": True,
        "max_rows": max_rows,
        "window": 4096,
        "graphs": False,
    }
    settings.update(options)
    return ModelRunner(engine.model, pool, **settings)


def serve(engine: Engine, runner: ModelRunner, case_ids: list[str]) -> dict[str, list[int]]:
    scheduler = Scheduler(
        runner,
        runner.pool,
        stop_ids=engine.processor.stop_token_ids,
        max_rows=runner.max_rows,
        max_row_positions=runner.pool.positions,
    )
    jobs = {case_id: case_job(engine, case_id) for case_id in case_ids}
    for job in jobs.values():
        scheduler.enqueue(job)
    tokens: dict[str, list[int]] = {case_id: [] for case_id in case_ids}
    ended: set[str] = set()
    while len(ended) < len(jobs):
        scheduler.step()
        for case_id, job in jobs.items():
            while not job.events.empty():
                event = job.events.get()
                if isinstance(event, Token):
                    tokens[case_id].append(event.token_id)
                elif isinstance(event, Finished):
                    ended.add(case_id)
    return tokens


def filled_region(runner: ModelRunner, start: int, length: int, seed: int) -> None:
    """Random keys and values in slots [start, start + length) of every layer."""
    generator = torch.Generator().manual_seed(seed)
    for store in (*runner.pool.keys, *runner.pool.values):
        view = store[:, start : start + length]
        view.copy_(torch.randn(view.shape, generator=generator))


# Exactness of the host path ------------------------------------------------------------------


def test_a_row_gets_the_same_bits_alone_and_among_any_neighbours(cpu_engine: Engine) -> None:
    runner = runner_for(cpu_engine, max_rows=8)
    for index in range(8):
        filled_region(runner, 2048 * index, 2000, seed=index)
    rows = [RowInput(token=100 + i, position=1990 - 37 * i, start=2048 * i) for i in range(8)]

    with torch.inference_mode():
        alone = runner._decode_host(rows[3:4])
        for neighbours in (rows, rows[::-1], rows[2:5], [rows[3], rows[0]]):
            batched = runner._decode_host(neighbours)
            index = next(i for i, r in enumerate(neighbours) if r is rows[3])
            assert torch.equal(batched[index : index + 1], alone)


def test_near_ties_and_sampled_rows_are_decided_on_single_row_logits(cpu_engine: Engine) -> None:
    runner = runner_for(cpu_engine)
    hidden = torch.randn(3, cpu_engine.model.config.hidden_size)
    with torch.inference_mode():
        exact = cpu_engine.model.logits(hidden)
        # Pretend the batched product rounded row 1 into a tie with a wrong winner.
        wrong = int(exact[1].argsort()[-2])
        batched = exact.clone()
        batched[1, wrong] = batched[1].max()
        sampler = TokenSampler(SamplingParams(temperature=1.0, seed=7))
        twin = TokenSampler(SamplingParams(temperature=1.0, seed=7))
        batch = [RowInput(0, 0, 0), RowInput(0, 0, 0), RowInput(0, 0, 0, sampler)]

        tokens = runner.chooser.choose(hidden, batch, batched)

    assert tokens[0] == int(exact[0].argmax())
    assert tokens[1] == int(exact[1].argmax()) != wrong
    assert tokens[2] == twin.choose(exact[2])


# The graph-shaped step -----------------------------------------------------------------------


def test_batch_size_buckets() -> None:
    assert graph_buckets(16) == (1, 2, 4, 8, 16)
    assert graph_buckets(12) == (1, 2, 4, 8, 12)
    assert graph_buckets(1) == (1,)
    assert [bucket_for(n, graph_buckets(16)) for n in (1, 3, 5, 9, 16)] == [1, 4, 8, 16, 16]


def test_the_graph_step_pads_to_buckets_and_gives_the_reference_tokens(cpu_engine: Engine) -> None:
    # Three rows in buckets (1, 2, 3); idle rows write to and read the scratch slot.
    runner = runner_for(cpu_engine, decode_kernel="gather", max_rows=3)
    case_ids = ["decode_crosses_2048_c16", "text_eos_stop", "two_images_c4"]

    tokens = serve(cpu_engine, runner, case_ids)

    for case_id in case_ids:
        assert tokens[case_id] == CASES[case_id]["generated_ids"]
    buffers = runner._buffers
    buffers.fill([RowInput(5, 10, 64)], 2)
    assert buffers.slots[:2].tolist() == [74, runner.pool.scratch_slot]
    assert buffers.starts[:2].tolist() == [64, runner.pool.scratch_slot]
    assert buffers.used[:2].tolist() == [11, 1]


@pytest.mark.parametrize("decode_kernel", ["gather", "rows"])
def test_a_launch_reads_a_token_left_on_the_device_as_if_it_were_given(
    cpu_engine: Engine, decode_kernel: str
) -> None:
    # Given rows (one sampled) whose next input token only the device has (UNKNOWN_TOKEN),
    def rows(tokens: list[int], at: int, samplers: list[Any]) -> list[RowInput]:
        return [
            RowInput(token, 1500 + at - 50 * i, 2048 * i, samplers[i])
            for i, token in enumerate(tokens)
        ]

    def samplers() -> list[Any]:
        return [None, TokenSampler(SamplingParams(0.9, 0.8, seed=3)), None]

    launched, given = (runner_for(cpu_engine, decode_kernel=decode_kernel) for _ in range(2))
    for runner in (launched, given):
        for index in range(3):
            filled_region(runner, 2048 * index, 1600, seed=index)
    ours, theirs = samplers(), samplers()

    # when one runner launches two steps, the second fed from the device,
    with torch.inference_mode():
        first = launched.launch_decode(rows([7, 8, 9], 0, ours)).tokens()
        second = launched.launch_decode(rows([UNKNOWN_TOKEN] * 3, 1, ours)).tokens()
        # and the other decodes the same steps with every token given,
        expected_first = given.decode(rows([7, 8, 9], 0, theirs))
        expected_second = given.decode(rows(expected_first, 1, theirs))

    # then both give the same tokens.
    assert (first, second) == (expected_first, expected_second)


def test_the_graph_step_traces_as_one_graph(cpu_engine: Engine) -> None:
    # fullgraph=True makes any graph break an error; the eager backend skips code generation.
    runner = runner_for(
        cpu_engine, decode_kernel="gather", max_rows=2, compile=True, compile_backend="eager"
    )

    tokens = serve(cpu_engine, runner, ["text_eos_stop", "wide_800x400_c1"])

    assert runner.compile is True
    assert tokens["text_eos_stop"] == CASES["text_eos_stop"]["generated_ids"]
    assert tokens["wide_800x400_c1"] == CASES["wide_800x400_c1"]["generated_ids"]


def test_a_failing_compiler_falls_back_to_the_uncompiled_step(
    cpu_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_compile(step: Callable[..., Any], **_: Any) -> Callable[..., Any]:
        def fail(*args: Any) -> Any:
            raise RuntimeError("no compiler for this platform")

        return fail

    monkeypatch.setattr(model_runner.torch, "compile", broken_compile)
    runner = runner_for(cpu_engine, decode_kernel="gather", max_rows=1, compile=True)

    tokens = serve(cpu_engine, runner, ["max_new_tokens_24_c4"])

    assert tokens["max_new_tokens_24_c4"] == CASES["max_new_tokens_24_c4"]["generated_ids"]
    assert runner.compile is False


# Errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), ResourceExhausted),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: 1 TB"), ResourceExhausted),
        (RuntimeError("DefaultCPUAllocator: not enough memory"), ResourceExhausted),
        (RuntimeError("shape mismatch"), ModelError),
        (ValueError("bad"), ModelError),
        (InvalidInput("bad tag", field="prompt"), InvalidInput),
    ],
)
def test_model_errors_become_coded_errors(raised: Exception, expected: type) -> None:
    with pytest.raises(expected) as caught, model_errors("decoding"):
        raise raised

    assert "decoding" in str(caught.value) or expected is InvalidInput
