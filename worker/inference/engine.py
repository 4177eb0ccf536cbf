"""The model engine a worker keeps resident: load once, then serve many requests at once.

`Engine.load` resolves the checkpoint (local folder, or Hub id through the Hugging Face
cache), builds Phi-3-vision from our own layers (worker/model), loads the official weights, and
sets up continuous batching: a KV pool sized from free memory, a `ModelRunner` (how a
step runs) and a `Scheduler` (who runs in it) with its own device thread.

`Engine.generate(request)` may be called from many threads at once. Each call
preprocesses its request on its own thread (chat template, HD transform, tokens, crops
on the CPU), hands it to the scheduler, turns the tokens it gets back into text (stop
strings included), and keeps the request's `RunControl` (worker.inference.control) told
and asked, all on its own thread. With one caller it behaves as a single-request engine;
with N callers their decode steps are shared, and each caller still gets exactly the
tokens it would get alone (CPU float32: bit for bit, see worker/model/model_runner.py).

Errors: bad input found while preprocessing -> InvalidInput (with `field`); out of
memory -> ResourceExhausted, after the request's memory is freed (the engine keeps
serving); any other model failure -> ModelError. What the request's `RunControl` raises
propagates unchanged, and the request leaves the batch at once.

Test-only fault injection: with `VQ_FAULT_INJECTION=oom_marker=<TEXT>` in the
environment, a prompt containing TEXT makes generate() attempt an impossible allocation
on the engine's device inside its normal request path (see `worker.inference.faults`).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import queue
import time

import torch
from PIL import Image

from vision_queue.errors import InvalidInput, ModelError, ResourceExhausted, VisionQueueError
from vision_queue.logprobs import TokenLogprob, alternative, entry
from worker.inference import faults
from worker.inference.choices import MAX_CHOICES, choice_seed, collect_choices
from worker.inference.constraint import Grammars
from worker.inference.control import RunControl
from worker.inference.engine_setup import (
    Batching,
    build_batching,
    check_prompt_guard,
    choose_attention,
    choose_longrope_switch,
    resolve_device,
    resolve_dtype,
)

# Re-exported: callers of `Engine.load(EngineConfig(...))` import both names from here.
from worker.inference.engine_setup import EngineConfig as EngineConfig
from worker.inference.generation import GenerationRequest as GenerationRequest
from worker.inference.generation import GenerationResult as GenerationResult
from worker.inference.image_crops import ImageCrops, pixels_hash
from worker.inference.scheduler import Failed, Finished, Job, Scheduler
from worker.model.config import Phi3VConfig
from worker.model.detokenizer import TextStream, Vocabulary
from worker.model.errors import model_errors
from worker.model.modeling import Phi3VForCausalLM, build_model
from worker.model.processor import MAX_NUM_CROPS, EncodedPrompt, Phi3VProcessor, chat_text
from worker.model.sampling import SamplingParams
from worker.model.steps import RowLogprobs
from worker.model.weights import load_weights, resolve_checkpoint

log = logging.getLogger(__name__)

# How often a waiting request's `RunControl.check` runs (cancel and deadline checks).
_POLL_S = 0.1
# Requests decoded together by default on CUDA (docs/benchmarks.md: memory per row and the
# bandwidth argument); on the CPU batching only amortises overheads, so 1.
CUDA_DEFAULT_MAX_BATCH = 16


class Engine:
    """Phi-3-vision resident on one device. Build it with `Engine.load`."""

    def __init__(
        self,
        *,
        model_id: str,
        device: torch.device,
        dtype: torch.dtype,
        attention: str,
        model: Phi3VForCausalLM,
        processor: Phi3VProcessor,
        num_crops: int | None,
        load_seconds: float,
        batching: Batching,
        longrope_switch: str = "keep-cache",
    ) -> None:
        self.model_id = model_id
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")
        self.attention = attention
        self.load_seconds = load_seconds
        self.model = model
        self.processor = processor
        self.vocabulary = Vocabulary(processor.tokenizer)
        # A finished JSON may only be followed by <|end|>, a stop token (else another one).
        end = processor.tokenizer.token_to_id("<|end|>")
        end = end if end in processor.stop_token_ids else min(processor.stop_token_ids)
        self.grammars = Grammars(processor.tokenizer, end, model.config.vocab_size)
        self.num_crops = num_crops
        self.max_batch = batching.max_rows
        self.pool = batching.pool
        self.runner = batching.runner
        self.image_cache = batching.runner.image_cache
        self.longrope_switch = longrope_switch
        rope = model.config.rope
        recompute = longrope_switch == "recompute" and rope.switches
        self.scheduler = Scheduler(
            batching.runner,
            batching.pool,
            stop_ids=processor.stop_token_ids,
            max_rows=batching.max_rows,
            max_row_positions=batching.max_row_positions,
            prefill_chunk_tokens=batching.prefill_chunk_tokens,
            vision_unit_crops=batching.vision_unit_crops,
            recompute_past=rope.original_max_positions if recompute else None,
            recover=self._recover,
        )
        self._torch_device = device

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        """Resolve, build and load; raises ModelError with a clear message on any failure."""
        began = time.perf_counter()
        try:
            if config.num_crops is not None and not 1 <= config.num_crops <= MAX_NUM_CROPS:
                raise ModelError(f"num_crops must be between 1 and {MAX_NUM_CROPS}")
            if config.max_batch < 0:
                raise ModelError("max_batch must not be negative")
            device = resolve_device(config.device)
            if not config.max_batch:
                default = CUDA_DEFAULT_MAX_BATCH if device.type == "cuda" else 1
                config = dataclasses.replace(config, max_batch=default)
            dtype = resolve_dtype(config.dtype, device)
            attention, reason = choose_attention(config.attention, device, dtype)
            folder = resolve_checkpoint(config.model)
            model_config = Phi3VConfig.from_file(folder / "config.json")
            switch, switch_reason = choose_longrope_switch(config.longrope_switch, model_config)
            processor = Phi3VProcessor.from_dir(folder, model_config)
            check_prompt_guard(processor.tokenizer)
            model = build_model(model_config, "eager" if attention == "eager" else "sdpa")
            load_weights(model, folder, device, dtype)
            model.eval().requires_grad_(False)
            batching = build_batching(config, model, device, dtype, attention)
        except VisionQueueError:
            raise
        except Exception as exc:
            raise ModelError(f"loading {config.model} failed: {type(exc).__name__}: {exc}") from exc
        engine = cls(
            model_id=config.model,
            device=device,
            dtype=dtype,
            attention=attention,
            model=model,
            processor=processor,
            num_crops=config.num_crops,
            load_seconds=time.perf_counter() - began,
            batching=batching,
            longrope_switch=switch,
        )
        log.info(
            "loaded %s from %s on %s (%s) in %.1fs; attention %s (%s); %s; "
            "LongRoPE switch at %d positions: %s (%s)",
            config.model, folder, engine.device, engine.dtype, engine.load_seconds,
            attention, reason, batching.describe(),
            model_config.rope.original_max_positions, switch, switch_reason,
        )
        return engine

    def warmup(self) -> None:
        """Record the decode graphs (CUDA), then one short generation with a tiny image."""
        began = time.perf_counter()
        with model_errors("warmup"), torch.inference_mode():
            self.runner.capture_graphs()  # before the scheduler thread ever runs
        image = Image.new("RGB", (336, 336), (127, 127, 127))
        self.generate(GenerationRequest("Describe this image.", [image], 2, num_crops=1))
        log.info("warmup took %.1fs", time.perf_counter() - began)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Serve one request; safe to call from many threads (their steps are batched).

        With `n` above 1 the result is the first choice, the others in its `more`."""
        if request.max_new_tokens < 1:
            raise InvalidInput("max_new_tokens must be at least 1", field="max_new_tokens")
        if not 1 <= request.n <= MAX_CHOICES:
            raise InvalidInput(f"n must be from 1 to {MAX_CHOICES}", field="n")
        began = time.perf_counter()
        job = self._prepare(request)
        job.siblings = [self._sibling(job, request, index) for index in range(1, request.n)]
        preprocess_s = time.perf_counter() - began
        self.scheduler.submit(job)
        if job.siblings:
            return collect_choices(
                lambda job, control: self.collect(job, request, control, preprocess_s),
                self.scheduler.cancel,
                [job, *job.siblings],
                request.control,
            )
        return self.collect(job, request, request.control, preprocess_s)

    def collect(
        self, job: Job, request: GenerationRequest, control: RunControl, preprocess_s: float
    ) -> GenerationResult:
        """Read a submitted job's events on this thread until it ends: its result."""
        stream = TextStream(self.vocabulary, request.stop)
        tokens: list[int] = []
        logprobs: list[TokenLogprob] | None = None if request.logprobs is None else []
        finished: Finished | None = None
        failure: VisionQueueError | None = None
        decode_began = 0.0
        try:
            while True:
                try:
                    event = job.events.get(timeout=_POLL_S)
                except queue.Empty:
                    control.check()
                    continue
                if isinstance(event, Finished):
                    finished = event
                    break
                if isinstance(event, Failed):
                    failure = event.error
                    break
                if not tokens:
                    decode_began = time.perf_counter()
                tokens.append(event.token_id)
                if logprobs is not None and event.token_id not in self.processor.stop_token_ids:
                    logprobs.append(self._logprob_entry(event.token_id, event.logprobs))
                    control.on_logprobs(logprobs[-1])
                piece = stream.push(event.token_id)
                if piece:
                    control.on_text(piece)
                if stream.stopped:
                    break
                control.on_token(len(tokens))
        finally:
            if finished is None and failure is None:
                self.scheduler.cancel(job)  # a stop string, or the run's control raised
        if failure is not None:
            if isinstance(failure, ResourceExhausted):
                # A fresh error: nothing of the failed request stays referenced.
                raise ResourceExhausted(failure.message)
            raise failure
        rest = stream.finish()
        if rest:
            control.on_text(rest)
        if finished is None:  # ended by a stop string
            reason, wait_s, prefill_s = "stop_string", 0.0, 0.0
            decode_s = time.perf_counter() - decode_began
        else:
            reason, wait_s = finished.stop_reason, finished.wait_s
            prefill_s, decode_s = finished.prefill_s, finished.decode_s
        return GenerationResult(
            text=stream.text,
            token_ids=tokens,
            prompt_tokens=job.encoded.prompt_tokens,
            completion_tokens=len(tokens),
            stop_reason=reason,
            preprocess_s=preprocess_s,
            prefill_s=prefill_s,
            decode_s=decode_s,
            wait_s=wait_s,
            logprobs=logprobs,
            cached_tokens=finished.cached_tokens if finished is not None else 0,
        )

    def _logprob_entry(self, token_id: int, chosen: RowLogprobs | None) -> TokenLogprob:
        """A token's logprobs in the result's shape (vision_queue.logprobs)."""
        text, data = self.vocabulary.piece(token_id)
        if chosen is None:  # a device that reports none (the simulated one)
            return entry(text, data, 0.0, [])
        top = [alternative(*self.vocabulary.piece(i), logprob) for i, logprob in chosen.top]
        return entry(text, data, chosen.logprob, top)

    def close(self) -> None:
        """Stop the scheduler's device thread; requests still queued fail with ModelError."""
        self.scheduler.stop()

    def peak_memory_bytes(self) -> int:
        if self._torch_device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self._torch_device))
        return 0

    # Request path ------------------------------------------------------------------------

    def _prepare(self, request: GenerationRequest) -> Job:
        """Everything CPU-side, on the caller's thread: template, HD transform, tokens, crops."""
        with model_errors("preprocessing"):
            text = chat_text(request.prompt, len(request.images))
            num_crops = request.num_crops or self.num_crops
            hashes = self._image_hashes(request)
            crops_of = ImageCrops(self.processor, self.image_cache, self._torch_device.type)
            cached = crops_of.cached(hashes, num_crops)
            encoded = self.processor.encode(text, request.images, num_crops, cached)
        self._check_length(encoded, request.max_new_tokens)
        request.control.on_prompt(encoded.prompt_tokens)
        crops = None
        with torch.inference_mode(), model_errors("preprocessing"):
            faults.inject(text, self.device)
            if encoded.images:
                crops = crops_of.crops(encoded, hashes, num_crops)
        sampling = SamplingParams(request.temperature, request.top_p, request.seed)
        decode_fault = faults.fault_for(text) == "decode_oom"
        constraint = None
        if request.response_format is not None:  # compiled here, off the device thread
            constraint = self.grammars.constraint(request.response_format)
        return Job(
            encoded, crops, request.max_new_tokens, sampling,
            constraint=constraint, decode_fault=decode_fault, logprobs=request.logprobs,
            image_hashes=tuple(hashes) if self.image_cache.enabled else (),
        )

    def _sibling(self, job: Job, request: GenerationRequest, index: int) -> Job:
        """Choice `index` of an `n` request: the same prompt (prefilled once, by `job`),
        its own sampler stream and grammar state."""
        sampling = dataclasses.replace(job.sampling, seed=choice_seed(job.sampling.seed, index))
        constraint = None
        if request.response_format is not None:
            constraint = self.grammars.constraint(request.response_format)
        return Job(
            job.encoded, None, job.max_new_tokens, sampling, constraint=constraint,
            logprobs=job.logprobs, decode_fault=job.decode_fault,
        )

    def _image_hashes(self, request: GenerationRequest) -> list[str]:
        if not self.image_cache.enabled:
            return []
        if request.image_hashes is not None and len(request.image_hashes) == len(request.images):
            return list(request.image_hashes)
        return [pixels_hash(image) for image in request.images]

    def _check_length(self, encoded: EncodedPrompt, max_new_tokens: int) -> None:
        limit = self.model.config.rope.max_positions
        if encoded.prompt_tokens + max_new_tokens > limit:
            raise InvalidInput(
                f"{encoded.prompt_tokens} prompt tokens + {max_new_tokens} new tokens exceed "
                f"the model's {limit} positions",
                field="images" if encoded.images else "prompt",
            )

    def _recover(self) -> None:
        gc.collect()
        if self._torch_device.type == "cuda":
            torch.cuda.empty_cache()
