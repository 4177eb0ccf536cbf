"""A simulated device: a model runner stand-in that behaves like a CUDA stream.

`SimulatedRunner` has the interface the scheduler uses (worker.model.runner_api.Runner),
so the real scheduler, KV bookkeeping (the pool's region allocator), samplers and request
threads run unchanged on top of it; only the forward is simulated:

* every launch returns at once; the stream (`SimulatedDevice`) is busy for the launch's
  device time, from `DeviceModel` (decode: weights plus each row's KV over memory
  bandwidth; prefill: FLOPs over matmul rate) after whatever was launched before it;
* its tokens become readable only when it is done: `tokens()` waits for the stream's
  clock to reach the launch's end (`time.sleep`, which releases the GIL);
* the tokens are a deterministic function of the row's history (its prompt, then every
  token fed and where), computed in stream order on the stream's own thread, so a token
  fed wrongly (stale, lost, doubled) changes every later token of the row; sampled rows
  draw their uniform number on the host, as the real runner does;
* `VirtualClock` replaces wall time for tests: the device then only advances when the
  host waits for it, so ordering is deterministic whatever the machine's speed.

The stream records each launch's (start, end) on its timeline: device busy time, and
the idle gaps where the host launched late, are read from it (`busy_between`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from worker.model.config import RopeFactors
from worker.model.image_cache import ImageCache
from worker.model.kvcache import KVPool
from worker.model.model_runner import PromptPrefill
from worker.model.steps import UNKNOWN_TOKEN, RowInput, RowLogprobs

_MASK = (1 << 61) - 1


@dataclass(frozen=True)
class DeviceModel:
    """How long the device is busy. Defaults: Phi-3-vision-128k in bfloat16."""

    name: str
    bandwidth: float  # bytes/s a decode step streams at
    flops: float  # effective FLOP/s of prefill
    weights_bytes: float = 7.45e9  # read once per decode step, for all rows
    kv_bytes_per_position: int = 32 * 2 * 3072 * 2  # 32 layers, K and V, 3,072 wide, bf16
    flops_per_prompt_token: float = 2 * 4.2e9  # the language model
    flops_per_crop: float = 2 * 0.29e9 * 577  # ViT-L/14-336 over one crop's 577 tokens
    step_s: float | None = None  # a fixed decode step time instead of the bandwidth model

    def decode_s(self, contexts: Sequence[int]) -> float:
        """One decode step over rows holding `contexts` positions each."""
        if self.step_s is not None:
            return self.step_s
        return (self.weights_bytes + self.kv_bytes_per_position * sum(contexts)) / self.bandwidth

    def prefill_s(self, tokens: int, crops: int) -> float:
        return (tokens * self.flops_per_prompt_token + crops * self.flops_per_crop) / self.flops


H200 = DeviceModel("H200", bandwidth=4.8e12, flops=600e12)
H100 = DeviceModel("H100", bandwidth=3.35e12, flops=600e12)


class VirtualClock:
    """Time that passes only when someone waits for it (tests)."""

    def __init__(self) -> None:
        self._now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self._now += max(0.0, seconds)


class SimTokens:
    """One launch on the simulated stream (a `StepTokens`)."""

    def __init__(self, device: SimulatedDevice, end: float, work: Callable[[], list[int]]) -> None:
        self._device = device
        self.end = end
        self._work = work
        self._tokens: list[int] = []
        self._error: BaseException | None = None
        self._computed = threading.Event()

    def run(self) -> None:
        try:
            self._tokens = self._work()
        except BaseException as error:  # handed to whoever reads the tokens
            self._error = error
        self._computed.set()

    def ready(self) -> bool:
        return self._computed.is_set() and self._device.clock() >= self.end

    def tokens(self) -> list[int]:
        self._computed.wait()
        self._device.wait_until(self.end)
        if self._error is not None:
            raise self._error
        return self._tokens

    def logprobs(self) -> list[RowLogprobs | None]:
        """The stand-in device has no distribution to report."""
        return [None] * len(self._tokens)


class SimulatedDevice:
    """The stream: launches run in order, each busy from max(launch, previous end)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.clock = clock
        self._sleep = sleep
        self._end = 0.0
        self.timeline: list[tuple[float, float, str]] = []  # (start, end, kind) per launch
        self._queue: queue.SimpleQueue[SimTokens | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vq-sim-device", daemon=True)
        self._thread.start()

    def launch(self, seconds: float, kind: str, work: Callable[[], list[int]]) -> SimTokens:
        start = max(self.clock(), self._end)
        self._end = start + seconds
        self.timeline.append((start, self._end, kind))
        op = SimTokens(self, self._end, work)
        self._queue.put(op)
        return op

    def wait_until(self, end: float) -> None:
        delay = end - self.clock()
        if delay > 0:
            self._sleep(delay)

    def busy_between(self, begin: float, end: float, kind: str | None = None) -> float:
        """Device-busy seconds within [begin, end] (of launches of `kind`, or all)."""
        return sum(
            max(0.0, min(e, end) - max(s, begin))
            for s, e, k in list(self.timeline)
            if kind is None or k == kind
        )

    def close(self) -> None:
        """Stop the stream's thread once what was launched has run."""
        self._queue.put(None)

    def _run(self) -> None:
        while (op := self._queue.get()) is not None:
            op.run()


def _mix(state: int, *values: int) -> int:
    for value in values:
        state = (state * 1_000_003 + value + 0x9E3779B9) & _MASK
    return state


class SimulatedRunner:
    """The scheduler's runner, on a `SimulatedDevice`; no model, no KV tensors."""

    def __init__(
        self,
        pool: KVPool,
        model: DeviceModel,
        *,
        stop_id: int,
        device: SimulatedDevice | None = None,
        end_every: int = 0,  # about one token in `end_every` is `stop_id` (0: never)
        vocabulary: tuple[int, int] = (300, 32000),  # ordinary tokens are drawn from here
        long_past: int | None = None,  # LongRoPE's switch: longer prompts use "long"
    ) -> None:
        self.pool = pool
        self.model = model
        self.stream = device or SimulatedDevice()
        self.image_cache = ImageCache(0)  # it caches nothing
        self.device = torch.device("cpu")
        self.stop_id = stop_id
        self.end_every = end_every
        self.vocabulary = vocabulary
        self.long_past = long_past
        # "Device memory", touched only by the stream's thread: per region start, the
        # row's history so far (what its KV would hold) and its last chosen token.
        self._state: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._placeholder = torch.empty(0)

    # Prefill ------------------------------------------------------------------------------

    def prefill_unit(
        self, prompt: PromptPrefill, *, max_tokens: int | None = None, max_crops: int | None = None
    ) -> torch.Tensor | None:
        if prompt.embeds is None:
            crops = sum(rows * cols + 1 for rows, cols in prompt.grids)
            if prompt.crops_encoded < crops:
                unit = min(max_crops or crops, crops - prompt.crops_encoded)
                prompt.crops_encoded += unit
                self.stream.launch(self.model.prefill_s(0, unit), "prefill", list)
                return None
            prompt.embeds = self._placeholder
        length = prompt.length
        end = length if max_tokens is None else min(length, prompt.offset + max_tokens)
        seconds = self.model.prefill_s(end - prompt.offset, 0)
        prompt.offset = end
        if end < length:
            self.stream.launch(seconds, "prefill", list)
            return None
        start, history = prompt.start, hash(tuple(prompt.input_ids))

        def fill() -> list[int]:
            self._state[start] = history
            return []

        self.stream.launch(seconds, "prefill", fill)
        if not prompt.keep_embeds:
            prompt.embeds = None
        return self._placeholder

    def copy_region(self, source: int, target: int, length: int) -> None:
        def copy() -> list[int]:
            self._state[target] = self._state[source]
            return []

        self.stream.launch(0.0, "prefill", copy)  # in stream order, behind the prefill

    def release(self, prompt_pin: Hashable | None) -> None:
        """The stand-in device caches no image prefixes."""

    def rope_factors(self, length: int) -> RopeFactors:
        return "long" if self.long_past is not None and length > self.long_past else "short"

    def regrown(
        self,
        input_ids: Sequence[int],
        prompt_embeds: torch.Tensor,
        generated: Sequence[int],
        start: int,
    ) -> PromptPrefill:
        ids = [*input_ids, *generated]
        return PromptPrefill(input_ids=ids, start=start, embeds=self._placeholder)

    # Launches -----------------------------------------------------------------------------

    def launch_first_token(self, hidden: torch.Tensor, row: RowInput) -> SimTokens:
        draw = self._draw(row)

        def first() -> list[int]:
            return [self._choose(row.start, self._state[row.start], draw)]

        return self.stream.launch(0.0, "prefill", first)

    def launch_decode(self, batch: Sequence[RowInput]) -> SimTokens:
        rows = [(row.start, row.token, row.position, self._draw(row)) for row in batch]

        def step() -> list[int]:
            chosen = []
            for start, token, position, draw in rows:
                fed = self._last[start] if token == UNKNOWN_TOKEN else token
                state = self._state[start] = _mix(self._state[start], fed, position)
                chosen.append(self._choose(start, state, draw))
            return chosen

        seconds = self.model.decode_s([row.position + 1 for row in batch])
        return self.stream.launch(seconds, "decode", step)

    def marker(self) -> SimTokens:
        return self.stream.launch(0.0, "marker", list)

    def _draw(self, row: RowInput) -> int:
        return -1 if row.sampler is None else int(row.sampler.draw() * 2**32)

    def _choose(self, start: int, state: int, draw: int) -> int:
        if draw >= 0:
            state = _mix(state, draw)
        if self.end_every and state % self.end_every == 0:
            token = self.stop_id
        else:
            low, high = self.vocabulary
            token = low + (state >> 7) % (high - low)
        self._last[start] = token
        return token
