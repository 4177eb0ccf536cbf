"""The rules of a task's generation options (sampling, stop strings, structured output,
logprobs, choices), the same on both sides; each fault is InvalidInput naming its field."""

from __future__ import annotations

import math
from typing import Any, Protocol

from vision_queue.errors import InvalidInput
from vision_queue.logprobs import check_logprobs_options
from vision_queue.structured import check_response_format

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1
MAX_CHOICES = 8


class GenerationOptions(Protocol):
    """What `vision_queue.schemas.TaskOptions` carries for these rules."""

    @property
    def temperature(self) -> Any: ...
    @property
    def top_p(self) -> Any: ...
    @property
    def seed(self) -> Any: ...
    @property
    def stop(self) -> Any: ...
    @property
    def response_format(self) -> Any: ...
    @property
    def logprobs(self) -> Any: ...
    @property
    def top_logprobs(self) -> Any: ...
    @property
    def n(self) -> Any: ...


def check_generation_options(options: GenerationOptions) -> None:
    """Sampling and stop options; each fault names its field."""
    temperature = options.temperature
    if not is_number(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidInput(
            f"temperature must be a number from 0 to {MAX_TEMPERATURE:g}", field="temperature"
        )
    top_p = options.top_p
    if not is_number(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidInput("top_p must be a number above 0 and at most 1", field="top_p")
    seed = options.seed
    if seed is not None and (not is_integer(seed) or not 0 <= seed <= MAX_SEED):
        raise InvalidInput(f"seed must be an integer from 0 to {MAX_SEED}", field="seed")
    check_response_format(options.response_format)
    check_logprobs_options(options.logprobs, options.top_logprobs)
    if options.n is not None and (not is_integer(options.n) or not 1 <= options.n <= MAX_CHOICES):
        raise InvalidInput(f"n must be an integer from 1 to {MAX_CHOICES}", field="n")
    stop = options.stop
    if not isinstance(stop, tuple) or len(stop) > MAX_STOP_STRINGS:
        raise InvalidInput(f"stop takes at most {MAX_STOP_STRINGS} strings", field="stop")
    for item in stop:
        if not isinstance(item, str) or not 1 <= len(item) <= MAX_STOP_CHARS:
            raise InvalidInput(
                f"each stop string must have 1 to {MAX_STOP_CHARS} characters", field="stop"
            )


def is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    )


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
