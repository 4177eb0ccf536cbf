"""Model failures translated in one place: out of memory -> ResourceExhausted, else ModelError.

What the caller's hooks raise (Cancelled, TaskTimeout...) never passes through here, so it
propagates unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from vision_queue.errors import ModelError, ResourceExhausted, VisionQueueError

_CPU_OOM_MARKERS = ("can't allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _CPU_OOM_MARKERS)


@contextmanager
def model_errors(stage: str) -> Iterator[None]:
    """Translate what the model raises into the project's coded errors."""
    try:
        yield
    except VisionQueueError:
        raise
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        if is_out_of_memory(exc):
            # `from None`: the caller frees memory once this error, and with it the
            # frames of the failed request, is dropped.
            raise ResourceExhausted(f"out of memory during {stage}: {first_line}") from None
        raise ModelError(f"{stage} failed: {type(exc).__name__}: {first_line}") from exc
