"""Greedy decoding: one prefill over the prompt, then one token per step.

Two decode paths give the same tokens:

* eager: a growing cache (`DynamicKVCache`), one uncompiled forward per token. Works for
  any length and is what the CPU reference test runs.
* static: the prompt's keys go into a preallocated `StaticKVCache`, and each decode step
  is one call of a function compiled with `torch.compile` (on CUDA in "reduce-overhead"
  mode, i.e. replayed as a CUDA graph), attending over the whole cache with a mask.
  Cache sizes come in a few buckets, each compiled once per process and kept; a request
  longer than the largest bucket uses the eager path.

Model failures are translated in one place, `model_errors()`: out of memory becomes
ResourceExhausted, anything else ModelError. The caller's `on_token` runs outside it, so
whatever it raises (Cancelled, TaskTimeout...) propagates unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator
from collections.abc import Generator as StepStream
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from producer.errors import ModelError, ResourceExhausted, VisionQueueError
from worker.model.kvcache import DynamicKVCache, StaticKVCache
from worker.model.modeling import Phi3VForCausalLM

log = logging.getLogger(__name__)

# Static cache sizes (prompt + new tokens): each is compiled once per process, and decoding
# reads the whole bucket, so there are few and they are not much larger than requests.
# One image at 16 crops plus its answer fits 4096; two to four images need 8192.
CACHE_BUCKETS = (4096, 8192, 16384)
_CPU_OOM_MARKERS = ("can't allocate memory", "not enough memory")

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


@dataclass
class Decoded:
    token_ids: list[int]
    stop_reason: str  # "length" | "eos:<id>"
    prefill_s: float
    decode_s: float


@dataclass
class _Workspace:
    cache: StaticKVCache
    step: Step
    compiled: bool
    pinned: bool = False  # prepared at warmup: kept even after an out-of-memory


class Generator:
    """Greedy decoding for one model; holds the static caches and their compiled steps."""

    def __init__(
        self,
        model: Phi3VForCausalLM,
        *,
        kernel: str,
        device: torch.device,
        static_cache: bool,
        compile: bool,
        compile_backend: str = "inductor",
    ) -> None:
        self.model = model
        self.kernel = kernel
        self.device = device
        self.static_cache = static_cache
        self.compile = compile and static_cache
        self.compile_backend = compile_backend
        # Decoding over a masked static cache needs a kernel that takes a mask.
        self.static_kernel = "eager" if kernel == "eager" else "sdpa"
        self._workspaces: dict[int, _Workspace] = {}

    def generate(
        self,
        inputs_embeds: torch.Tensor,
        max_new_tokens: int,
        stop_ids: Collection[int],
        on_token: Callable[[int], None] | None = None,
    ) -> Decoded:
        length = int(inputs_embeds.shape[1])
        capacity = self.capacity_for(length + max_new_tokens)
        begin = time.perf_counter()
        if capacity is None:
            steps = self._eager_steps(inputs_embeds)
        else:
            steps = self._static_steps(inputs_embeds, self._workspace(capacity))
        with model_errors("prefill"):
            token = next(steps)
        prefill_s = time.perf_counter() - begin

        begin = time.perf_counter()
        tokens: list[int] = []
        try:
            while True:
                tokens.append(token)
                if on_token is not None:
                    on_token(len(tokens))
                if token in stop_ids:
                    reason = f"eos:{token}"
                    break
                if len(tokens) >= max_new_tokens:
                    reason = "length"
                    break
                with model_errors("decoding"):
                    token = next(steps)
        finally:
            steps.close()  # releases the request's cache now, not at garbage collection
        return Decoded(tokens, reason, prefill_s, time.perf_counter() - begin)

    def capacity_for(self, needed: int) -> int | None:
        """The static cache bucket for `needed` positions; None means the eager path."""
        if not self.static_cache:
            return None
        return next((bucket for bucket in CACHE_BUCKETS if bucket >= needed), None)

    def prepare(self, capacities: Collection[int]) -> None:
        """Allocate and compile the decode step of each bucket now (worker warmup)."""
        dummy = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        for capacity in capacities:
            workspace = self._workspace(capacity)
            workspace.pinned = True
            position = torch.zeros(1, dtype=torch.long, device=self.device)
            with model_errors("warmup"), torch.inference_mode():
                # CUDA-graph trees run a step once plainly, record it on the second call
                # and replay from the third: all of that happens here, not in a request.
                for _ in range(3):
                    self._call_step(workspace, dummy, position).clone()

    def release(self) -> None:
        """Drop the caches not prepared at warmup (after an out-of-memory)."""
        self._workspaces = {c: w for c, w in self._workspaces.items() if w.pinned}

    @property
    def cache_bytes(self) -> int:
        return sum(w.cache.nbytes for w in self._workspaces.values())

    # Paths -------------------------------------------------------------------------

    def _eager_steps(self, embeds: torch.Tensor) -> StepStream[int, None, None]:
        model, length = self.model, int(embeds.shape[1])
        cache = DynamicKVCache(len(model.model.layers))
        positions = torch.arange(length, device=self.device).unsqueeze(0)
        logits = model(embeds, positions, cache, kernel=self.kernel, causal=True)
        del embeds, positions
        position = length
        while True:
            token = int(logits.argmax(dim=-1)[0])
            yield token
            token_ids = torch.tensor([[token]], device=self.device)
            positions = torch.tensor([[position]], device=self.device)
            logits = model(model.embed_tokens(token_ids), positions, cache, kernel=self.kernel)
            position += 1

    def _static_steps(
        self, embeds: torch.Tensor, workspace: _Workspace
    ) -> StepStream[int, None, None]:
        length = int(embeds.shape[1])
        positions = torch.arange(length, device=self.device).unsqueeze(0)
        logits = self.model(
            embeds, positions, workspace.cache.prefill(length), kernel=self.kernel, causal=True
        )
        del embeds, positions
        token = logits.argmax(dim=-1, keepdim=True)
        position = torch.tensor([length], dtype=torch.long, device=self.device)
        reader = _TokenReader(self.device)
        while True:
            # Queue the next step before reading this token, so the device is never idle
            # while the host checks for a stop token and reports progress. At most one
            # step is computed in vain, at the end.
            reader.start(token)
            # A clone: the output of a CUDA graph is overwritten by its next replay.
            following = self._call_step(workspace, token, position).clone()
            position.add_(1)
            yield reader.value()
            token = following

    # Static cache machinery --------------------------------------------------------------

    def _workspace(self, capacity: int) -> _Workspace:
        workspace = self._workspaces.get(capacity)
        if workspace is None:
            model = self.model
            with model_errors("cache allocation"):
                cache = StaticKVCache(
                    num_layers=model.config.num_hidden_layers,
                    kv_heads=model.config.num_key_value_heads,
                    head_dim=model.config.head_dim,
                    capacity=capacity,
                    dtype=model.lm_head.weight.dtype,
                    device=self.device,
                )
            step = _bind_step(model, cache, self.static_kernel)
            compiled = False
            if self.compile:
                step = torch.compile(
                    step, fullgraph=True, dynamic=False, backend=self.compile_backend,
                    mode=_compile_mode(self.device, self.compile_backend),
                )
                compiled = True
            workspace = _Workspace(cache, step, compiled)
            self._workspaces[capacity] = workspace
            log.info("static KV cache of %d positions (%.1f MiB)%s", capacity,
                     cache.nbytes / 2**20, ", decode step compiled" if compiled else "")
        return workspace

    def _call_step(
        self, workspace: _Workspace, token_ids: torch.Tensor, position: torch.Tensor
    ) -> torch.Tensor:
        if self.device.type == "cuda" and workspace.compiled:
            # Each call is a new inference step for CUDA-graph trees: the previous
            # output (our input) may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return workspace.step(token_ids, position)
        except Exception as exc:
            if not workspace.compiled or is_out_of_memory(exc):
                raise
            # A compiler that cannot handle this platform must not take the worker
            # down: fall back to the same step, uncompiled, for good.
            log.warning("compiled decode failed (%s: %s); decoding uncompiled from now on",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self.compile = False
            for other in self._workspaces.values():
                other.step = _bind_step(self.model, other.cache, self.static_kernel)
                other.compiled = False
            return workspace.step(token_ids, position)


class _TokenReader:
    """Reads a token id from the device without waiting for the work queued after it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._value = 0
        if self.cuda:
            self._host = torch.empty(1, dtype=torch.long, pin_memory=True)
            self._copied = torch.cuda.Event()

    def start(self, token: torch.Tensor) -> None:
        if self.cuda:
            self._host.copy_(token.view(-1), non_blocking=True)
            self._copied.record()
        else:
            self._value = int(token.view(-1)[0])

    def value(self) -> int:
        if self.cuda:
            self._copied.synchronize()
            return int(self._host[0])
        return self._value


def _bind_step(model: Phi3VForCausalLM, cache: StaticKVCache, kernel: str) -> Step:
    def decode_step(token_ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Feed one token at `position`; return the greedy next token, [1, 1]."""
        embeds = model.embed_tokens(token_ids)
        logits = model(
            embeds, position.view(1, 1), cache.at(position),
            attention_mask=cache.mask(position), kernel=kernel,
        )
        next_token: torch.Tensor = logits.argmax(dim=-1, keepdim=True)
        return next_token

    return decode_step


def _compile_mode(device: torch.device, backend: str) -> Any:
    if backend != "inductor":
        return None
    return "reduce-overhead" if device.type == "cuda" else None
