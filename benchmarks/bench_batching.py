"""Continuous batching: tasks/s and per-task latency at concurrency 1, 2, 4, 8, 16.

One run measures every level side by side, on the engine alone and (CPU) through the real
queue, and checks that every level produced the same texts as concurrency 1:

    python benchmarks/bench_batching.py                         # CPU, tiny checkpoint
    python benchmarks/bench_batching.py --modes engine --tasks 16 --new-tokens 200
    python benchmarks/bench_batching.py --gpu                   # full-size config, random weights
    python benchmarks/bench_batching.py --gpu --config small --device cpu --tasks 4 \\
        --levels 1,2 --new-tokens 8                             # dry run of the GPU mode

* engine: `Engine.generate` from N threads (as N worker slots would), `--tasks` tasks
  all queued at t0; latency = t0 to the task's result (queueing included), service =
  from its start.
* queue: a real redis-server and a real `worker run` with VQ_MAX_BATCH=N; the tasks are
  submitted with `producer.Client` and their results awaited.
* --gpu: the Phi-3-vision-128k config with random weights in bfloat16, describe-like
  requests (one 1344x1344 image at 16 crops, about 2,530 prompt tokens, 200 new tokens),
  on the engine alone; prints batch 1, the best batch, and the floor (weights + KV bytes
  per decode step over measured bandwidth, prefill FLOPs over measured matmul rate).

Also measured (engine mode): how long running decodes stall while a long prompt is
prefilled, whole vs in chunks. Target (CPU): 16 tasks of 200 new tokens at N = 8 at
least 2.5x faster than at N = 1, identical texts. Not a timed test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from worker.inference.control import RunControl  # noqa: E402
from worker.inference.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402

TINY = ROOT / "tests" / "data" / "phi3v-reference" / "model"
IMAGES = TINY.parent / "images"
LEVELS = (1, 2, 4, 8, 16)


@dataclass
class Level:
    concurrency: int
    wall_s: float
    latencies_s: list[float]
    service_s: list[float]
    texts: list[str]
    tokens: int

    @property
    def tasks_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s

    def summary(self) -> dict[str, float]:
        return {
            "tasks_per_s": round(self.tasks_per_s, 3),
            "wall_s": round(self.wall_s, 3),
            "latency_p50_s": round(percentile(self.latencies_s, 50), 3),
            "latency_p95_s": round(percentile(self.latencies_s, 95), 3),
            "service_p50_s": round(percentile(self.service_s, 50), 3),
            "tokens_per_s": round(self.tokens / self.wall_s, 1),
        }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else 0.0


def requests_for(args: argparse.Namespace) -> list[GenerationRequest]:
    """`--tasks` describe-like requests with different images, so texts differ per task."""
    names = sorted(p.name for p in IMAGES.iterdir())
    out = []
    for index in range(args.tasks):
        if args.text_only:
            images: list[Image.Image] = []
            prompt = f"Write a story about lighthouse number {index}."
        else:
            images = [Image.open(IMAGES / names[index % len(names)]).convert("RGB")]
            prompt = "Describe this image in detail."
        out.append(GenerationRequest(prompt, images, args.new_tokens, num_crops=args.num_crops))
    return out


def run_level(serve: Callable[[int], tuple[str, int]], tasks: int, concurrency: int) -> Level:
    """`tasks` tasks queued at t0, served by `concurrency` threads pulling from the queue."""
    lock = threading.Lock()
    pending = list(range(tasks))
    latencies, service, texts, tokens = [0.0] * tasks, [0.0] * tasks, [""] * tasks, [0]
    began = time.perf_counter()

    def slot() -> None:
        while True:
            with lock:
                if not pending:
                    return
                index = pending.pop(0)
            start = time.perf_counter()
            text, count = serve(index)
            end = time.perf_counter()
            latencies[index], service[index], texts[index] = end - began, end - start, text
            with lock:
                tokens[0] += count

    threads = [threading.Thread(target=slot) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Level(concurrency, time.perf_counter() - began, latencies, service, texts, tokens[0])


# Engine alone ---------------------------------------------------------------------------


def bench_engine(args: argparse.Namespace, make_engine: Callable[[int], Engine]) -> list[Level]:
    requests = requests_for(args)
    levels = []
    for concurrency in args.levels:
        engine = make_engine(concurrency)

        def serve(index: int, engine: Engine = engine) -> tuple[str, int]:
            result = engine.generate(requests[index])
            return result.text, result.completion_tokens

        serve(0)  # warm: first-call allocations, tokenizer caches
        levels.append(run_level(serve, args.tasks, concurrency))
        report("engine", levels[-1], levels[0])
        engine.close()
    return levels


class _TokenStamps(RunControl):
    """When each token of the running request arrived; `started` once it is decoding."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.started = threading.Event()

    def on_token(self, count: int) -> None:
        self.times.append(time.perf_counter())
        if count == 5:
            self.started.set()


def bench_prefill_stall(args: argparse.Namespace) -> dict[str, Any]:
    """Longest gap between a running request's tokens while a 3,876-token prompt arrives."""
    from support.reference import case_request

    figures: dict[str, Any] = {}
    for chunk in (0, 512, 256):
        engine = Engine.load(
            EngineConfig(model=str(TINY), device="cpu", max_batch=2, prefill_chunk_tokens=chunk)
        )
        stamps = _TokenStamps()
        runner = threading.Thread(
            target=engine.generate,
            args=(GenerationRequest("Tell a long story.", [], 400, control=stamps),),
        )
        runner.start()
        stamps.started.wait()
        arrived = time.perf_counter()
        engine.generate(case_request("long_two_images_c16", max_new_tokens=1))
        runner.join()
        times = stamps.times
        during = [b - a for a, b in itertools.pairwise(times) if b > arrived]
        steady = statistics.median(b - a for a, b in itertools.pairwise(times[:6]))
        figures[f"chunk_{chunk or 'whole'}"] = {
            "longest_gap_ms": round(max(during) * 1e3, 1),
            "steady_gap_ms": round(steady * 1e3, 2),
        }
        print(
            f"prefill stall, chunk {chunk or 'whole prompt'}: longest gap between a running "
            f"request's tokens {max(during) * 1e3:.0f} ms (steady {steady * 1e3:.1f} ms)",
            flush=True,
        )
        engine.close()
    return figures


# Through the queue ----------------------------------------------------------------------


@contextmanager
def redis_server() -> Iterator[str]:
    from support.redis_server import RedisServer  # the test suite's own fixture code

    with tempfile.TemporaryDirectory() as folder, RedisServer(Path(folder)) as server:
        yield server.url


def bench_queue(args: argparse.Namespace) -> list[Level]:
    from support.workers import WorkerProcess

    from producer.client import Client
    from vision_queue.settings import Settings

    names = sorted(p.name for p in IMAGES.iterdir())
    levels = []
    with redis_server() as url, tempfile.TemporaryDirectory() as logs:
        settings = Settings.from_env(None, redis_url=url)
        for concurrency in args.levels:
            env = {
                "VQ_MAX_BATCH": str(concurrency),
                "VQ_MAX_NEW_TOKENS_CAPS": f"describe={args.new_tokens},ask={args.new_tokens}",
                "VQ_NUM_CROPS": str(args.num_crops),
                "OMP_NUM_THREADS": str(args.threads),
            }
            with WorkerProcess(url, Path(logs), **env), Client(settings=settings) as client:

                def serve(index: int, client: Client = client) -> tuple[str, int]:
                    if args.text_only:
                        handle = client.submit(
                            "ask",
                            prompt=f"Write a story about lighthouse number {index}.",
                            max_new_tokens=args.new_tokens,
                        )
                    else:
                        handle = client.submit(
                            "describe",
                            images=[IMAGES / names[index % len(names)]],
                            max_new_tokens=args.new_tokens,
                        )
                    result = client.result(handle.id, wait=True, timeout=600)
                    assert result is not None
                    return str(result["text"]), int(result["usage"]["completion_tokens"])

                serve(0)
                levels.append(run_level(serve, args.tasks, concurrency))
                report("queue", levels[-1], levels[0])
    return levels


def report(mode: str, level: Level, first: Level) -> None:
    same = level.texts == first.texts
    speedup = level.tasks_per_s / first.tasks_per_s
    s = level.summary()
    print(
        f"{mode} N={level.concurrency}: {s['tasks_per_s']:.2f} tasks/s ({speedup:.2f}x N=1), "
        f"{s['tokens_per_s']:.0f} tokens/s, latency p50 {s['latency_p50_s']:.2f} s "
        f"p95 {s['latency_p95_s']:.2f} s, service p50 {s['service_p50_s']:.2f} s; "
        f"texts identical to N=1: {same}",
        flush=True,
    )


# GPU, full size -------------------------------------------------------------------------


def random_engine(args: argparse.Namespace, max_batch: int) -> Engine:
    """A config (full size by default) with random weights on `--device` (first GPU)."""
    from benchmarks.bench_engine import CONFIGS, TOKENIZER_DIR, random_model
    from worker.inference.engine_setup import (
        build_batching,
        choose_attention,
        resolve_device,
        resolve_dtype,
    )
    from worker.model.config import Phi3VConfig
    from worker.model.processor import Phi3VProcessor

    global _GPU_MODEL
    device = resolve_device(args.device)
    dtype = resolve_dtype("bfloat16" if device.type == "cuda" else "float32", device)
    attention, _ = choose_attention("auto", device, dtype)
    config = Phi3VConfig.from_file(CONFIGS[args.config])
    if _GPU_MODEL is None:
        torch.manual_seed(0)
        _GPU_MODEL = random_model(config, device, dtype)
    engine = Engine(
        model_id=f"phi3v-{args.config}-random",
        device=device,
        dtype=dtype,
        attention=attention,
        model=_GPU_MODEL,
        processor=Phi3VProcessor.from_dir(TOKENIZER_DIR, config),
        num_crops=16,
        load_seconds=0.0,
        batching=build_batching(
            EngineConfig(model="random", max_batch=max_batch, compile=args.compile),
            _GPU_MODEL,
            device,
            dtype,
            attention,
        ),
    )
    engine.warmup()
    return engine


_GPU_MODEL: Any = None


def describe_like(args: argparse.Namespace) -> list[GenerationRequest]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(args.tasks):
        pixels = rng.integers(0, 256, size=(1344, 1344, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        prompt = "Describe this image in detail."
        out.append(GenerationRequest(prompt, [image], args.new_tokens, num_crops=16))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="engine,queue,stall", help="engine, queue, stall")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--num-crops", type=int, default=1)
    parser.add_argument("--text-only", action="store_true", help="ask prompts, no images")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="random weights from --config on --device, describe-like requests at 16 crops",
    )
    parser.add_argument("--config", default="full", help="full | small (with --gpu)")
    parser.add_argument("--device", default="cuda", help="with --gpu; cpu for a dry run")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the graphed decode step (default: as a worker, on for CUDA)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.levels = [int(level) for level in args.levels.split(",")]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    setup = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(f"setup: {json.dumps(setup)}", flush=True)
    figures: dict[str, Any] = {"setup": setup}
    if args.gpu:
        figures.update(bench_gpu(args))
    else:
        modes = args.modes.split(",")
        if "engine" in modes:
            levels = bench_engine(
                args,
                lambda n: Engine.load(EngineConfig(model=str(TINY), device="cpu", max_batch=n)),
            )
            figures["engine"] = {str(lv.concurrency): lv.summary() for lv in levels}
            figures["engine_texts_identical"] = all(lv.texts == levels[0].texts for lv in levels)
        if "queue" in modes:
            levels = bench_queue(args)
            figures["queue"] = {str(lv.concurrency): lv.summary() for lv in levels}
            figures["queue_texts_identical"] = all(lv.texts == levels[0].texts for lv in levels)
        if "stall" in modes:
            figures["prefill_stall"] = bench_prefill_stall(args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def bench_gpu(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.bench_engine import lm_weight_bytes, measure_bandwidth, measure_matmul

    requests = describe_like(args)
    levels = []
    # One engine for every level (graphs captured, and compiled, once): N threads keep at
    # most N of its rows busy, as N worker slots would.
    began = time.perf_counter()
    engine = random_engine(args, max(args.levels))
    print(
        f"engine built and warmed up in {time.perf_counter() - began:.1f} s: "
        f"{engine.runner.decode_kernel} decode, graphs {sorted(engine.runner._graphs)}",
        flush=True,
    )

    def serve(index: int) -> tuple[str, int]:
        result = engine.generate(requests[index])
        return result.text, result.completion_tokens

    serve(0)
    for concurrency in args.levels:
        levels.append(run_level(serve, args.tasks, concurrency))
        report("gpu engine", levels[-1], levels[0])
    engine.close()
    model = _GPU_MODEL
    device = model.lm_head.weight.device
    bandwidth, flops = measure_bandwidth(device), measure_matmul(device, model.lm_head.weight.dtype)
    config = model.config
    prompt = 2530
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    best = max(levels, key=lambda lv: lv.tasks_per_s)
    batch = best.concurrency
    context = prompt + args.new_tokens // 2
    step_s = (lm_weight_bytes(model) + batch * context * kv_per_token) / bandwidth
    params = sum(p.numel() for p in model.parameters())
    prefill_s = 2 * params * prompt / flops
    floor_tasks_per_s = 1 / (prefill_s + args.new_tokens * step_s / batch)
    print(
        f"floor at batch {batch}: {floor_tasks_per_s:.2f} tasks/s (prefill {prefill_s * 1e3:.0f} "
        f"ms/task at {flops / 1e12:.0f} TFLOP/s, decode step {step_s * 1e3:.2f} ms at "
        f"{bandwidth / 1e12:.2f} TB/s); best measured {best.tasks_per_s:.2f} tasks/s; "
        f"target >= 8 tasks/s",
        flush=True,
    )
    return {
        "gpu": {str(lv.concurrency): lv.summary() for lv in levels},
        "gpu_floor_tasks_per_s": round(floor_tasks_per_s, 2),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


if __name__ == "__main__":
    sys.exit(main())
