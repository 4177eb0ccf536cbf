"""`n` choices of one request: one prefill, n rows decoding in the same batch.

The engine submits the first choice's job with the others as its siblings; the scheduler
admits them together, prefills the prompt once and copies the region into each sibling's
(worker.inference.scheduler). Here each choice's events are read on a thread of its own
(the first on the caller's), exactly as a single request's are, each told to the control
the caller's gives for it (`RunControl.choice`: every choice's text is streamed, marked
with its index); only the first choice counts as progress, and the caller's control is
asked between tokens of the first choice and, once it has ended, while the others finish.
Whatever stops one choice (a failure, the control raising) cancels them all.

Choice i samples with `choice_seed(seed, i)`: the same seed gives the same n texts, and
choice 0 is what the request gives with n = 1.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence

from vision_queue.generation_options import MAX_CHOICES
from worker.inference.control import RunControl
from worker.inference.generation import GenerationResult
from worker.inference.rows import Job

__all__ = ["MAX_CHOICES", "choice_seed", "collect_choices"]
_POLL_S = 0.1
_GOLDEN = 0x9E3779B97F4A7C15  # an odd constant: seeds of one request's choices never collide
_SEEDS = 2**63


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed; None (unseeded) stays None."""
    return None if seed is None else (seed + index * _GOLDEN) % _SEEDS


def collect_choices(
    collect: Callable[[Job, RunControl], GenerationResult],
    cancel: Callable[[Job], None],
    jobs: Sequence[Job],
    control: RunControl,
) -> GenerationResult:
    """The first choice's result with the others in `more`; `collect` reads one submitted
    job's events until it ends (`Engine.collect`), `cancel` abandons a job."""
    results: list[GenerationResult | None] = [None] * len(jobs)
    errors: list[BaseException] = []

    def cancel_all() -> None:
        for job in jobs:
            cancel(job)

    def run(index: int) -> None:
        try:
            results[index] = collect(jobs[index], controls[index])
        except BaseException as error:  # handed to the caller's thread
            errors.append(error)
            cancel_all()

    # Asked here, on the caller's thread, in order: before any choice's text arrives.
    controls = [control.choice(index) for index in range(len(jobs))]
    threads = [
        threading.Thread(target=run, args=(index,), name=f"vq-choice-{index}", daemon=True)
        for index in range(1, len(jobs))
    ]
    for thread in threads:
        thread.start()
    try:
        first = collect(jobs[0], controls[0])
        for thread in threads:
            while thread.is_alive():
                thread.join(_POLL_S)
                control.check()
    except BaseException:
        cancel_all()
        for thread in threads:
            thread.join()
        raise
    if errors:
        raise errors[0]
    more = tuple(result for result in results[1:] if result is not None)
    return dataclasses.replace(first, more=more)
