"""Engine setup with EngineConfig: device, dtype, attention kernel, and the batch's sizes.

Everything here runs once in `Engine.load`; nothing is on a request's path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vision_queue.errors import ModelError
from vision_queue.protocol import control_token_in
from worker.model.attention import varlen_available
from worker.model.config import LONGROPE_SWITCHES, LongRopeSwitch, Phi3VConfig
from worker.model.image_cache import ImageCache, default_bytes
from worker.model.kvcache import KVPool
from worker.model.model_runner import ModelRunner
from worker.model.modeling import KERNELS, Phi3VForCausalLM

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Prompt positions per prefill unit on CUDA: ~10 ms of an H100 per chunk for the full
# model, so running decodes wait at most about that long for a new request's prompt.
_CUDA_PREFILL_CHUNK = 1024
# Memory kept free on CUDA for activations (prefill chunks, the image tower) and graphs.
_CUDA_RESERVE_FRACTION, _CUDA_RESERVE_MIN = 0.10, 2 << 30


@dataclass(frozen=True)
class EngineConfig:
    model: str  # local folder or Hub id
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    attention: str = "auto"  # auto | sdpa | flash_attention_2 | eager
    num_crops: int | None = None  # default from preprocessor_config.json
    compile: bool | None = None  # torch.compile the graphed decode step; None = on for CUDA
    max_batch: int = 1  # requests decoded together (batch rows); 0 = 1 on CPU, 16 on CUDA
    kv_cache_positions: int | None = None  # KV pool size; None = from free memory
    prefill_chunk_tokens: int | None = None  # None = 1024 on CUDA, whole prompts on CPU; 0 = never
    cuda_graphs: bool | None = None  # None = on where the varlen kernel is usable
    # At the LongRoPE switch: auto (what config.json says) | keep-cache | recompute.
    longrope_switch: str = "auto"
    # Image reuse (worker.model.image_cache): bytes; -1 = 2 GiB on CPU, 4 GiB on CUDA; 0 = off.
    image_cache_bytes: int = -1

    def image_cache_capacity(self, device: torch.device) -> int:
        if self.image_cache_bytes < 0:
            return default_bytes(device.type)
        return self.image_cache_bytes


@dataclass(frozen=True)
class Batching:
    """The batched engine's parts and sizes, chosen at load."""

    pool: KVPool
    runner: ModelRunner
    max_rows: int
    max_row_positions: int
    prefill_chunk_tokens: int | None

    @property
    def vision_unit_crops(self) -> int | None:
        """Image crops per prefill unit: none apart from whole prompts when not chunked.

        16 crops (about 5.5 TFLOP on ViT-L) cost about what a 1,024-token chunk of the
        full model does, so a unit of either delays the running decodes about as long.
        """
        chunk = self.prefill_chunk_tokens
        return max(1, chunk // 64) if chunk else None

    def describe(self) -> str:
        runner = self.runner
        return (
            f"batch rows {self.max_rows}, KV pool {self.pool.positions} positions "
            f"({self.pool.nbytes / 2**20:.0f} MiB), decode attention {runner.decode_kernel}, "
            f"CUDA graphs {'on' if runner.capture else 'off'}, "
            f"prefill chunk {self.prefill_chunk_tokens or 'whole prompt'}, "
            f"rows independent {'on' if runner.row_independent else 'off'}, "
            f"image cache {runner.image_cache.capacity / 2**20:.0f} MiB"
        )


def build_batching(
    config: EngineConfig,
    model: Phi3VForCausalLM,
    device: torch.device,
    dtype: torch.dtype,
    attention: str,
) -> Batching:
    """Size the KV pool, pick the decode kernel, build the runner."""
    cuda = device.type == "cuda"
    text = model.config
    decode_kernel = "rows"
    if cuda and dtype in (torch.bfloat16, torch.float16) and varlen_available():
        from worker.model.gpu_checks import varlen_problem  # CUDA only

        problem = varlen_problem(device, dtype)
        if problem is None:
            decode_kernel = "varlen"
        else:
            log.warning("%s; decoding with per-row attention", problem)
    graphs = decode_kernel == "varlen" if config.cuda_graphs is None else config.cuda_graphs
    if graphs and decode_kernel != "varlen":
        raise ModelError("CUDA graphs need the varlen attention kernel (CUDA, bf16/fp16)")
    bytes_per_position = (
        2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim
        * torch.empty((), dtype=dtype).element_size()
    )
    image_cache = ImageCache(config.image_cache_capacity(device))
    positions = kv_pool_positions(config, device, bytes_per_position, text.rope.max_positions)
    pool = KVPool(
        num_layers=text.num_hidden_layers,
        kv_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        positions=positions,
        dtype=dtype,
        device=device,
        tokens_first=decode_kernel == "varlen" or attention == "flash_attention_2",
        zeroed=cuda,
        granularity=256 if cuda else 16,
    )
    max_row_positions = min(text.rope.max_positions, positions)
    compile = cuda if config.compile is None else config.compile
    runner = ModelRunner(
        model,
        pool,
        device=device,
        kernel=attention,
        decode_kernel=decode_kernel,
        row_independent=device.type == "cpu" and dtype == torch.float32,
        max_rows=config.max_batch,
        window=max_row_positions,
        graphs=graphs,
        compile=compile and graphs,
        image_cache=image_cache,
    )
    chunk = config.prefill_chunk_tokens
    if chunk is None:
        chunk = _CUDA_PREFILL_CHUNK if cuda else 0
    return Batching(pool, runner, config.max_batch, max_row_positions, chunk or None)


def kv_pool_positions(
    config: EngineConfig, device: torch.device, bytes_per_position: int, model_positions: int
) -> int:
    """KV positions to preallocate: the setting, else what free memory allows.

    CUDA: free memory after the weights, less a reserve for activations and graphs. CPU:
    a quarter of the available RAM (slots are only touched when written). Never more
    than every row at the model's full length.
    """
    if config.kv_cache_positions:
        return config.kv_cache_positions
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - max(_CUDA_RESERVE_MIN, int(total * _CUDA_RESERVE_FRACTION))
        budget -= config.image_cache_capacity(device)  # the image cache's prefixes live there
    else:
        budget = available_ram_bytes() // 4
    positions = min(config.max_batch * model_positions, budget // bytes_per_position)
    if positions < 1024:
        raise ModelError(
            f"only {max(budget, 0) / 2**20:.0f} MiB left for the KV cache on {device}; "
            "free memory or set VQ_KV_CACHE_POSITIONS"
        )
    return int(positions)


def available_ram_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def check_prompt_guard(tokenizer: Any) -> None:
    """Refuse a checkpoint whose tokenizer adds a token prompts are not checked for.

    `vision_queue.schemas.check_request` refuses prompts holding any of the contract's control
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
            f"{', '.join(uncovered[:5])}; add them to vision_queue.protocol.PROMPT_CONTROL_TOKENS"
        )


def choose_longrope_switch(spec: str, config: Phi3VConfig) -> tuple[LongRopeSwitch, str]:
    """What a row does when it first grows past the LongRoPE switch while decoding, and why.

    `auto` follows the checkpoint (`Phi3VConfig.longrope_switch`): Phi-3.5-vision's code
    recomputes, Phi-3-vision's keeps its cache. Either can be forced, e.g. for a fine-tune
    whose config no longer says which model it came from.
    """
    name = spec.strip().lower()
    forced = [mode for mode in LONGROPE_SWITCHES if mode == name]
    if forced:
        mode, why = forced[0], "set by VQ_LONGROPE_SWITCH"
    elif name == "auto":
        mode, why = config.longrope_switch()
    else:
        known = ", ".join(LONGROPE_SWITCHES)
        raise ModelError(f"unknown LongRoPE switch {spec!r} (auto, {known})")
    if not config.rope.switches:
        why += "; never used: this config rotates every length alike"
    return mode, why


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
