"""The model engine a worker keeps resident: load once, then generate request by request.

`Engine.load` resolves the checkpoint (local folder, or Hub id through the Hugging Face
cache), builds Phi-3-vision from transformers' parts and loads the official weights.
`Engine.generate` applies the chat template, preprocesses, and decodes greedily until
`<|end|>`/`<|endoftext|>` or the token budget. Calls are serialised by a lock; nothing
about a request outlives the call except the static KV caches the engine reuses.

Errors: bad input found while preprocessing -> InvalidInput (with `field`); out of
memory -> ResourceExhausted, after the request's memory is freed (the engine keeps
serving); any other model failure -> ModelError. What `on_token` raises propagates
unchanged.

Test-only fault injection: with `VQ_FAULT_INJECTION=oom_marker=<TEXT>` in the
environment, a prompt containing TEXT makes generate() attempt an impossible allocation
on the engine's device inside its normal request path (see `worker.faults`).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from producer.contract import control_token_in
from producer.errors import InvalidInput, ModelError, ResourceExhausted, VisionQueueError
from producer.schemas import ChatMessage
from worker import faults
from worker.model.config import Phi3VConfig
from worker.model.detokenizer import TextStream, Vocabulary
from worker.model.generation import CACHE_BUCKETS, Generator, model_errors
from worker.model.modeling import KERNELS, Phi3VForCausalLM, build_model
from worker.model.processor import MAX_NUM_CROPS, EncodedPrompt, Phi3VProcessor, chat_text
from worker.model.weights import load_weights, resolve_checkpoint

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Decode steps compiled at warmup: the buckets ordinary requests land in. Larger ones are
# compiled on first use.
_WARMUP_BUCKETS = tuple(bucket for bucket in CACHE_BUCKETS if bucket <= 8192)


@dataclass(frozen=True)
class EngineConfig:
    model: str  # local folder or Hub id
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    attention: str = "auto"  # auto | sdpa | flash_attention_2 | eager
    num_crops: int | None = None  # default from preprocessor_config.json
    compile: bool | None = None  # torch.compile/static cache for decode; None = on for CUDA only


@dataclass(frozen=True)
class GenerationRequest:
    # User prompt text, or an ask conversation's turns (template applied by the engine).
    prompt: str | Sequence[ChatMessage]
    images: Sequence[Image.Image]  # already RGB
    max_new_tokens: int
    num_crops: int | None = None
    # Called after every generated token with the count so far; it may raise (e.g.
    # Cancelled, TaskTimeout) to stop generation, and the exception propagates unchanged.
    on_token: Callable[[int], None] | None = None
    # Sampling: temperature 0 is greedy; top_p and seed as in producer.schemas.TaskOptions.
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    # Generation ends before any of these strings (up to 4), which are not part of the text.
    stop: Sequence[str] = ()
    # Called with each new piece of text as soon as it is final: whole characters, never
    # part of a stop string; the pieces joined are exactly the result's text.
    on_text: Callable[[str], None] | None = None
    # Told the prompt's token count (text and image) once it is encoded, before any token is
    # generated: a task stopped midway still reports its usage.
    on_prompt: Callable[[int], None] | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    stop_reason: str  # "length" | "eos:<id>" | "stop_string"
    preprocess_s: float
    prefill_s: float
    decode_s: float

    @property
    def finish_reason(self) -> str:
        """OpenAI's vocabulary: "stop" (end token or stop string) or "length"."""
        return "length" if self.stop_reason == "length" else "stop"


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
        generator: Generator,
        num_crops: int | None,
        load_seconds: float,
    ) -> None:
        self.model_id = model_id
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")
        self.attention = attention
        self.load_seconds = load_seconds
        self.model = model
        self.processor = processor
        self.vocabulary = Vocabulary(processor.tokenizer)
        self.generator = generator
        self.num_crops = num_crops
        self._torch_device = device
        self._lock = threading.Lock()

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        """Resolve, build and load; raises ModelError with a clear message on any failure."""
        began = time.perf_counter()
        try:
            if config.num_crops is not None and not 1 <= config.num_crops <= MAX_NUM_CROPS:
                raise ModelError(f"num_crops must be between 1 and {MAX_NUM_CROPS}")
            device = resolve_device(config.device)
            dtype = resolve_dtype(config.dtype, device)
            attention, reason = choose_attention(config.attention, device, dtype)
            folder = resolve_checkpoint(config.model)
            model_config = Phi3VConfig.from_file(folder / "config.json")
            processor = Phi3VProcessor.from_dir(folder, model_config)
            check_prompt_guard(processor.tokenizer)
            model = build_model(model_config, "eager" if attention == "eager" else "sdpa")
            load_weights(model, folder, device, dtype)
            model.eval().requires_grad_(False)
            compile = device.type == "cuda" if config.compile is None else config.compile
            generator = Generator(
                model, kernel=attention, device=device, static_cache=compile, compile=compile
            )
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
            generator=generator,
            num_crops=config.num_crops,
            load_seconds=time.perf_counter() - began,
        )
        log.info(
            "loaded %s from %s on %s (%s) in %.1fs; attention %s (%s); compiled decode %s",
            config.model,
            folder,
            engine.device,
            engine.dtype,
            engine.load_seconds,
            attention,
            reason,
            "on" if compile else "off",
        )
        return engine

    def warmup(self) -> None:
        """One short generation with a tiny image, and the common decode graphs compiled."""
        began = time.perf_counter()
        image = Image.new("RGB", (336, 336), (127, 127, 127))
        self.generate(GenerationRequest("Describe this image.", [image], 2, num_crops=1))
        if self.generator.compile:
            self.generator.prepare(_WARMUP_BUCKETS)
        log.info("warmup took %.1fs", time.perf_counter() - began)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        if request.max_new_tokens < 1:
            raise InvalidInput("max_new_tokens must be at least 1", field="max_new_tokens")
        with self._lock:
            try:
                return self._generate(request)
            except ResourceExhausted as exc:
                message = exc.message
            # The failed request's frames, and the tensors they held, went with the
            # exception: return the memory before the next request.
            self._recover()
            raise ResourceExhausted(message)

    def peak_memory_bytes(self) -> int:
        if self._torch_device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self._torch_device))
        return 0

    # Request path ------------------------------------------------------------------------

    def _generate(self, request: GenerationRequest) -> GenerationResult:
        began = time.perf_counter()
        with model_errors("preprocessing"):
            text = chat_text(request.prompt, len(request.images))
            num_crops = request.num_crops or self.num_crops
            encoded = self.processor.encode(text, request.images, num_crops)
        self._check_length(encoded, request.max_new_tokens)
        if request.on_prompt is not None:
            request.on_prompt(encoded.prompt_tokens)
        with torch.inference_mode():
            with model_errors("preprocessing"):
                faults.inject(text, self.device)
                crops = self.processor.crops(encoded, self._torch_device)
            preprocess_s = time.perf_counter() - began

            began = time.perf_counter()
            with model_errors("image encoding"):
                embeds = self.embed(encoded, crops)
            del crops
            embed_s = time.perf_counter() - began
            stream = TextStream(self.vocabulary, request.stop)

            def on_id(token_id: int) -> bool:
                piece = stream.push(token_id)
                if piece and request.on_text is not None:
                    request.on_text(piece)
                return stream.stopped

            decoded = self.generator.generate(
                embeds,
                request.max_new_tokens,
                self.processor.stop_token_ids,
                request.on_token,
                on_id=on_id,
            )
        rest = stream.finish()
        if rest and request.on_text is not None:
            request.on_text(rest)
        return GenerationResult(
            text=stream.text,
            token_ids=decoded.token_ids,
            prompt_tokens=encoded.prompt_tokens,
            completion_tokens=len(decoded.token_ids),
            stop_reason=decoded.stop_reason,
            preprocess_s=preprocess_s,
            prefill_s=embed_s + decoded.prefill_s,
            decode_s=decoded.decode_s,
        )

    def embed(
        self, encoded: EncodedPrompt, crops: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The prompt's input embeddings, each image's features written into its positions.

        Call under `torch.inference_mode()`; `crops` defaults to the processor's.
        """
        if crops is None:
            crops = self.processor.crops(encoded, self._torch_device)
        input_ids = torch.tensor([encoded.input_ids], device=self._torch_device)
        embeds: torch.Tensor = self.model.model.vision_embed_tokens(
            input_ids,
            crops,
            [(hd.rows, hd.cols) for hd in encoded.images],
            [(span.start, span.length) for span in encoded.spans],
        )
        return embeds

    def _check_length(self, encoded: EncodedPrompt, max_new_tokens: int) -> None:
        limit = self.model.config.rope.max_positions
        if encoded.prompt_tokens + max_new_tokens > limit:
            raise InvalidInput(
                f"{encoded.prompt_tokens} prompt tokens + {max_new_tokens} new tokens exceed "
                f"the model's {limit} positions",
                field="images" if encoded.images else "prompt",
            )

    def _recover(self) -> None:
        self.generator.release()
        gc.collect()
        if self._torch_device.type == "cuda":
            torch.cuda.empty_cache()


def check_prompt_guard(tokenizer: Any) -> None:
    """Refuse a checkpoint whose tokenizer adds a token prompts are not checked for.

    `producer.schemas.check_request` refuses prompts holding any of the contract's control
    tokens; a tokenizer with one more added token would let user text become that token.
    """
    uncovered = sorted(
        str(token.content)
        for token in tokenizer.get_added_tokens_decoder().values()
        if control_token_in(str(token.content)) is None
    )
    if uncovered:
        raise ModelError(
            f"the tokenizer adds control tokens prompts are not checked for: "
            f"{', '.join(uncovered[:5])}; add them to producer.contract.PROMPT_CONTROL_TOKENS"
        )


def resolve_device(spec: str) -> torch.device:
    """auto -> first GPU else CPU; cuda -> the current GPU; cuda:N checked to exist."""
    name = spec.strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {spec!r} requested, but CUDA is not available here")
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise ModelError(f"bad device {spec!r}: {exc}") from exc
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ModelError(f"device {spec!r}: only {torch.cuda.device_count()} GPU(s) present")
        return torch.device("cuda", index)
    raise ModelError(f"unknown device {spec!r} (auto, cpu, cuda or cuda:N)")


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """auto -> bfloat16 on a GPU that has it (else float16), float32 on CPU."""
    name = spec.strip().lower()
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in _DTYPES:
        raise ModelError(f"unknown dtype {spec!r} (auto, {', '.join(_DTYPES)})")
    return _DTYPES[name]


def choose_attention(spec: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """The attention kernel to use and why: flash_attention_2 where it works, else SDPA."""
    name = spec.strip().lower()
    flash_ok, why = flash_attention_support(device, dtype)
    if name == "auto":
        return ("flash_attention_2", why) if flash_ok else ("sdpa", f"default; flash: {why}")
    if name not in KERNELS:
        raise ModelError(f"unknown attention {spec!r} (auto, {', '.join(KERNELS)})")
    if name == "flash_attention_2" and not flash_ok:
        raise ModelError(f"attention flash_attention_2 is not usable here: {why}")
    return name, "requested"


def flash_attention_support(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"needs compute capability 8.0+, this GPU has {major}.{minor}"
    if dtype not in (torch.bfloat16, torch.float16):
        return False, "needs bfloat16 or float16"
    if importlib.util.find_spec("flash_attn") is None:
        return False, "flash_attn is not installed"
    try:
        importlib.import_module("flash_attn")  # a broken build fails here, not mid-request
    except Exception as exc:
        return False, f"flash_attn does not import: {type(exc).__name__}: {exc}"
    return True, f"flash_attn on sm{major}{minor}"
