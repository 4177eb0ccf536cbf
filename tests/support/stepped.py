"""Schedulers a test steps itself (`Scheduler.step()`), on the CPU, and their jobs' events.

The engine runs its scheduler on a thread of its own; a test that wants to see each step
builds one here over the engine's model: float32, the exact per-row decode kernel by
default, a KV pool of its own.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.inference.engine import Engine
from worker.inference.scheduler import Event, Failed, Finished, Job, Scheduler, Token
from worker.model.kvcache import KVPool
from worker.model.model_runner import ModelRunner

CPU = torch.device("cpu")


def cpu_pool(engine: Engine, positions: int, *, zeroed: bool = False) -> KVPool:
    """A float32 KV pool of `positions` for the engine's model."""
    config = engine.model.config
    return KVPool(
        num_layers=config.num_hidden_layers,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        positions=positions,
        dtype=torch.float32,
        device=CPU,
        tokens_first=False,
        zeroed=zeroed,
    )


def stepped_scheduler(
    engine: Engine,
    *,
    max_rows: int,
    positions: int = 16384,
    row_positions: int | None = None,
    window: int | None = None,
    decode_kernel: str = "rows",
    runner_options: dict[str, Any] | None = None,
    **scheduler_options: Any,
) -> Scheduler:
    """A scheduler over a pool of `positions` (a row at most `row_positions`, all by
    default); the gather kernel reads masked slots, so its pool starts zeroed."""
    pool = cpu_pool(engine, positions, zeroed=decode_kernel != "rows")
    runner = ModelRunner(
        engine.model, pool, device=CPU, kernel="sdpa", decode_kernel=decode_kernel,
        row_independent=True, max_rows=max_rows, window=window or min(positions, 4096),
        graphs=False, **(runner_options or {}),
    )
    return Scheduler(
        runner, pool, stop_ids=engine.processor.stop_token_ids, max_rows=max_rows,
        max_row_positions=row_positions or positions, **scheduler_options,
    )


@dataclass
class Outcome:
    """What a job's thread read: its tokens, then how it ended."""

    tokens: list[int] = field(default_factory=list)
    end: Finished | Failed | None = None


def waiting_events(job: Job) -> list[Event]:
    """The job's events handed over so far and not read yet, in order."""
    events: list[Event] = []
    while True:
        try:
            events.append(job.events.get_nowait())
        except queue.Empty:
            return events


def drain(job: Job, outcome: Outcome) -> None:
    """Move the job's waiting events into `outcome`; nothing may follow its end."""
    for event in waiting_events(job):
        if isinstance(event, Token):
            assert outcome.end is None, "a token after the job's end"
            outcome.tokens.append(event.token_id)
        else:
            assert outcome.end is None, "two ends"
            outcome.end = event


def submit(scheduler: Scheduler, jobs: Iterable[Job]) -> dict[Job, Outcome]:
    """Queue the jobs (without the engine's thread); an empty outcome for each."""
    outcomes = {}
    for job in jobs:
        scheduler.enqueue(job)
        outcomes[job] = Outcome()
    return outcomes


def run_until(
    scheduler: Scheduler,
    outcomes: dict[Job, Outcome],
    done: Callable[[], bool] | None = None,
    max_steps: int = 5000,
) -> int:
    """Step until every job ended (or `done()`); returns the number of steps."""
    for steps in range(1, max_steps + 1):
        scheduler.step()
        for job, outcome in outcomes.items():
            drain(job, outcome)
        if done() if done is not None else all(o.end for o in outcomes.values()):
            return steps
    raise AssertionError("the scheduler did not finish")
