"""Engine benchmark: preprocessing, prefill, batched decode steps, memory.

Builds Phi-3-vision with random weights from a config (no download) and the reference
tokenizer, on whatever device it finds, and prints each figure next to a floor:

* decode floor = bytes read per step (language-model weights, plus every row's KV cache
  at the benchmark's context) / memory bandwidth measured with a large device copy;
* prefill floor = FLOPs of the prompt / matmul throughput measured on the device.

Decode runs through the engine's `ModelRunner` as a worker would: on CUDA the varlen
kernel in CUDA graphs (bfloat16/float16), elsewhere per-row attention; one step per
batch size in `--batch-sizes`, each row with the same prompt in its own KV region.

    python benchmarks/bench_engine.py                      # full config, first GPU
    python benchmarks/bench_engine.py --config small       # tiny config on CPU, < 1 min
    python benchmarks/bench_engine.py --config full --device cpu --skip-prefill \\
        --batch-sizes 1 --decode-tokens 3                  # bounded full-size run on CPU

Targets (H100/H200, bfloat16, batch 1): decode <= 2.5 ms/token, prefill of ~2,500 tokens
<= 60 ms. Not a timed test: numbers go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# Run as a script: this checkout's packages first (not another installed copy).
sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from benchmarks.inputs import test_jpeg  # noqa: E402
from vision_queue.images import decode_image  # noqa: E402
from worker.inference.engine_setup import choose_attention, resolve_device, resolve_dtype  # noqa: E402
from worker.model.attention import varlen_available  # noqa: E402
from worker.model.config import Phi3VConfig  # noqa: E402
from worker.model.kvcache import DynamicKVCache, KVPool  # noqa: E402
from worker.model.model_runner import ModelRunner, RowInput  # noqa: E402
from worker.model.modeling import Phi3VForCausalLM, build_model  # noqa: E402
from worker.model.processor import EncodedPrompt, Phi3VProcessor, chat_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "tests" / "data" / "phi3v-reference" / "model"
CONFIGS = {
    "full": ROOT / "benchmarks" / "configs" / "phi3v-128k-config.json",
    "small": TOKENIZER_DIR / "config.json",
}
TARGET_DECODE_MS, TARGET_PREFILL_MS = 2.5, 60.0


@dataclass
class Report:
    setup: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def add(self, key: str, value: Any, line: str) -> None:
        self.figures[key] = value
        self.lines.append(line)
        print(line, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` calls (after one warm-up call), and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        began = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def random_model(config: Phi3VConfig, device: torch.device, dtype: torch.dtype) -> Phi3VForCausalLM:
    model = build_model(config).to(dtype)  # still on meta: no memory yet
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1 and "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    model.reset_buffers(device)
    return model.eval().requires_grad_(False)


def lm_weight_bytes(model: Phi3VForCausalLM) -> int:
    """What one decode step reads: decoder layers, final norm, lm_head (not the embedding
    table, of which it reads one row, nor the vision tower)."""
    parts = (model.model.layers, model.model.norm, model.lm_head)
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def measure_bandwidth(device: torch.device) -> float:
    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds, _ = timed(lambda: target.copy_(source), device, 5)
    return 2 * size / seconds  # read + write


def measure_matmul(device: torch.device, dtype: torch.dtype) -> float:
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds, _ = timed(lambda: a @ b, device, 5)
    return 2 * size**3 / seconds


def bench_preprocess(
    processor: Phi3VProcessor, device: torch.device, repeats: int, report: Report
) -> None:
    data = test_jpeg(4000, 3000)
    text = chat_text("Describe this image in detail.", 1)
    decode_s, image = timed(lambda: decode_image(data), device, repeats)
    encode_s, encoded = timed(lambda: processor.encode(text, [image]), device, repeats)
    crops_s, _ = timed(lambda: processor.crops(encoded), device, repeats)
    total_ms = (decode_s + encode_s + crops_s) * 1e3
    report.add(
        "preprocess_ms", round(total_ms, 1),
        f"preprocess 4000x3000 JPEG ({len(data) / 1e6:.1f} MB, {encoded.prompt_tokens} tokens): "
        f"{total_ms:.1f} ms = decode {decode_s * 1e3:.1f} + HD transform & tokens "
        f"{encode_s * 1e3:.1f} + crops {crops_s * 1e3:.1f}",
    )


def prompt_embeddings(
    model: Phi3VForCausalLM, processor: Phi3VProcessor, encoded: EncodedPrompt,
    device: torch.device,
) -> torch.Tensor:
    return model.model.vision_embed_tokens(  # type: ignore[no-any-return]
        torch.tensor([encoded.input_ids], device=device),
        processor.crops(encoded) if encoded.images else None,
        [(hd.rows, hd.cols) for hd in encoded.images],
        [(span.start, span.length) for span in encoded.spans],
    )


def bench_prefill(
    model: Phi3VForCausalLM, processor: Phi3VProcessor, device: torch.device, kernel: str,
    flops: float, repeats: int, report: Report,
) -> torch.Tensor:
    # A square image at 16 crops: 2,509 image tokens, about 2,530 with the text.
    image = Image.fromarray(np.full((1344, 1344, 3), 90, dtype=np.uint8))
    encoded = processor.encode(chat_text("Describe this image in detail.", 1), [image], 16)
    length = encoded.prompt_tokens
    positions = torch.arange(length, device=device).unsqueeze(0)
    layers = len(model.model.layers)

    vision_s, embeds_any = timed(
        lambda: prompt_embeddings(model, processor, encoded, device), device, repeats
    )
    embeds: torch.Tensor = embeds_any
    lm_s, _ = timed(
        lambda: model(embeds, positions, DynamicKVCache(layers), kernel=kernel, causal=True),
        device, repeats,
    )
    config = model.config
    lm_params = sum(p.numel() for p in model.model.layers.parameters())
    embedding = model.model.vision_embed_tokens
    vision_params = sum(
        p.numel() for part in (embedding.img_processor, embedding.img_projection)
        for p in part.parameters()
    )
    crops = encoded.images[0].num_crops_used
    work = (
        2 * lm_params * length
        + 2 * layers * length * length * config.hidden_size  # causal attention
        + 2 * vision_params * crops * (config.vision.grid**2 + 1)
    )
    floor_ms = work / flops * 1e3
    total_ms = (vision_s + lm_s) * 1e3
    report.add(
        "prefill_ms", round(total_ms, 1),
        f"prefill {length} tokens ({crops} crops): {total_ms:.1f} ms = vision {vision_s * 1e3:.1f} "
        f"+ language model {lm_s * 1e3:.1f}; floor {floor_ms:.1f} ms at measured matmul rate"
        + _target(total_ms, TARGET_PREFILL_MS, device),
    )
    return embeds


def bench_decode(
    model: Phi3VForCausalLM, embeds: torch.Tensor, device: torch.device, kernel: str,
    tokens: int, bandwidth: float, batch_sizes: list[int], compile: bool, report: Report,
) -> None:
    length = int(embeds.shape[1])
    region = length + tokens + 16
    config = model.config
    kv_per_position = (
        2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        * model.lm_head.weight.element_size()
    )
    cuda = device.type == "cuda"
    varlen = cuda and model.lm_head.weight.dtype != torch.float32 and varlen_available()
    rows = max(batch_sizes)
    pool = KVPool(
        num_layers=config.num_hidden_layers, kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim, positions=rows * region, dtype=model.lm_head.weight.dtype,
        device=device, tokens_first=varlen, zeroed=cuda,
    )
    runner = ModelRunner(
        model, pool, device=device, kernel=kernel, decode_kernel="varlen" if varlen else "rows",
        row_independent=not cuda and model.lm_head.weight.dtype == torch.float32,
        max_rows=rows, window=region, graphs=varlen, compile=varlen and compile,
    )
    with torch.inference_mode():
        for row in range(rows):  # the same prompt in every row's region
            runner.prefill(row * region, embeds, 0, length)
        began = time.perf_counter()
        runner.capture_graphs()
        if varlen:
            report.add("graph_capture_s", round(time.perf_counter() - began, 1),
                       f"decode graphs captured for {runner.buckets} in "
                       f"{time.perf_counter() - began:.1f} s"
                       + (" (compiled)" if runner.compile else ""))
        weights_ms = lm_weight_bytes(model) / bandwidth * 1e3
        path = "varlen attention, CUDA graphs" if varlen else "per-row attention"
        for batch in batch_sizes:
            def step(position: int, batch: int = batch) -> None:
                runner.decode([RowInput(7, position, row * region) for row in range(batch)])

            for position in range(length, length + 2):
                step(position)
            sync(device)
            began = time.perf_counter()
            for position in range(length + 2, length + tokens):
                step(position)
            sync(device)
            step_ms = (time.perf_counter() - began) / (tokens - 2) * 1e3
            context = length + tokens // 2
            floor_ms = weights_ms + batch * context * kv_per_position / bandwidth * 1e3
            report.add(
                f"decode_step_ms_b{batch}", round(step_ms, 3),
                f"decode, batch {batch} ({path}): {step_ms:.2f} ms/step = "
                f"{step_ms / batch:.2f} ms/token, {batch * 1e3 / step_ms:.0f} tokens/s; "
                f"floor {floor_ms:.2f} ms/step (weights {weights_ms:.2f} + KV of {batch} rows "
                f"at context {context})"
                + (_target(step_ms, TARGET_DECODE_MS, device) if batch == 1 else ""),
            )


def _target(value_ms: float, target_ms: float, device: torch.device, label: str = "") -> str:
    if device.type != "cuda":
        return ""
    verdict = "meets" if value_ms <= target_ms else "misses"
    return f"; {verdict} the {target_ms:g} ms target{label}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda:N (default: auto; "
                        "cpu for --config small)")
    parser.add_argument("--dtype", default=None, help="default: auto (bfloat16 on GPU, float32 "
                        "on CPU), but bfloat16 for the full config on CPU (half the memory)")
    parser.add_argument(
        "--attention", default="auto", help="auto | sdpa | flash_attention_2 | eager"
    )
    parser.add_argument("--decode-tokens", type=int, default=None, help="timed decode steps")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of timed stages")
    parser.add_argument("--skip-preprocess", action="store_true")
    parser.add_argument("--skip-prefill", action="store_true",
                        help="decode after a short text prompt instead of the ~2,500-token one")
    parser.add_argument("--batch-sizes", default="1,8", help="decode batch sizes, e.g. 1,8,16")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True,
        help="torch.compile the graphed decode step (CUDA; default on, as a worker)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = resolve_device(args.device or ("cpu" if args.config == "small" else "auto"))
    # Full size on CPU defaults to bfloat16: float32 would need 17 GB of host memory.
    full_on_cpu = args.config == "full" and device.type == "cpu"
    dtype = resolve_dtype(args.dtype or ("bfloat16" if full_on_cpu else "auto"), device)
    kernel, why = choose_attention(args.attention, device, dtype)
    cuda = device.type == "cuda"
    tokens = args.decode_tokens or (64 if cuda else 24)
    repeats = args.repeats or (10 if cuda else 3)

    config = Phi3VConfig.from_file(CONFIGS[args.config])
    processor = Phi3VProcessor.from_dir(TOKENIZER_DIR, config)
    began = time.perf_counter()
    model = random_model(config, device, dtype)
    report = Report(setup={
        "config": args.config, "device": str(device), "dtype": str(dtype), "attention": kernel,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor()
        or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    })
    print(f"setup: {json.dumps(report.setup)}; attention because {why}; "
          f"model built in {time.perf_counter() - began:.1f}s", flush=True)
    bandwidth, flops = measure_bandwidth(device), measure_matmul(device, dtype)
    report.add("bandwidth_gbs", round(bandwidth / 1e9, 1),
               f"memory bandwidth (device copy): {bandwidth / 1e9:.1f} GB/s; "
               f"matmul: {flops / 1e12:.2f} TFLOP/s ({dtype})")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    with torch.inference_mode():
        if not args.skip_preprocess:
            bench_preprocess(processor, device, repeats, report)
        if args.skip_prefill:
            short = processor.encode(chat_text("Describe this image in detail.", 0), [])
            embeds = prompt_embeddings(model, processor, short, device)
        else:
            embeds = bench_prefill(model, processor, device, kernel, flops, repeats, report)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    bench_decode(
        model, embeds, device, kernel, tokens, bandwidth, batch_sizes, args.compile, report
    )

    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        report.add("peak_memory_gib", round(peak / 2**30, 2),
                   f"peak device memory: {peak / 2**30:.2f} GiB")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        report.add("peak_host_rss_gib", round(peak / 2**30, 2),
                   f"peak host memory (process RSS): {peak / 2**30:.2f} GiB")
    if args.json:
        summary = {"setup": report.setup, "figures": report.figures}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
