"""Host work per decode step against device time: does the device ever wait for Python?

    python benchmarks/bench_host_overhead.py --json OUT              # simulated H200
    python benchmarks/bench_host_overhead.py --device-model h100      # simulated H100
    python benchmarks/bench_host_overhead.py --sync                   # also the synchronous loop
    python benchmarks/bench_host_overhead.py --device cuda            # the real GPU, same load
    python benchmarks/bench_host_overhead.py --device cpu --config small   # dry run of that

The engine's own request path (`Engine.generate` on request threads: detokenizing,
stop strings, hooks, cancels) and its scheduler (device thread: admission, KV regions,
input building, samplers' draws, token hand-off) run unchanged. On `--device sim` only
the forward is simulated (worker.model.simulated): a stream busy for the bandwidth
model's step time at each step's batch and context, results readable when done.

Load, per batch size B: B + max(2, B/4) client threads, each sending describe-like
requests back to back (one 1344x1344 image at 16 crops, ~2,530 prompt positions, 200
new tokens; the prompt is encoded once, so preprocessing, which runs on request
threads, is left out); one request in two streams its text (`on_text`), one in four is
sampled, one in eight is cancelled at a random token. The engine holds B rows.
After a warm-up, over a window:

* device_busy: device-busy time / wall time (sim: the stream's timeline; CUDA: event
  pairs around every launch; CPU: time inside launches, which are synchronous there);
* host_ms_per_step: device idle time per decode step (host work not overlapped);
* loop_ms_per_step: the device thread's time per step outside waits for the device
  (host work per step, overlapped or not);
* step_ms: mean device time of a decode step;
* tokens_per_s, against ideal_tokens_per_s (the same tokens in device time alone);
* predicted_tasks_per_s (sim): describe tasks/s, 1 / (prefill + 200 x step / B) at the
  model's times, times device_busy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from vision_queue.errors import Cancelled, VisionQueueError  # noqa: E402
from worker.inference.control import RunControl  # noqa: E402
from worker.inference.engine import Engine, GenerationRequest  # noqa: E402
from worker.inference.engine_setup import Batching  # noqa: E402
from worker.inference.scheduler import Job  # noqa: E402
from worker.model.config import Phi3VConfig  # noqa: E402
from worker.model.kvcache import KVPool  # noqa: E402
from worker.model.processor import Phi3VProcessor, chat_text  # noqa: E402
from worker.model.sampling import SamplingParams  # noqa: E402
from worker.model.simulated import H100, H200, DeviceModel, SimulatedRunner  # noqa: E402

TOKENIZER_DIR = ROOT / "tests" / "data" / "phi3v-reference" / "model"
FULL_CONFIG = ROOT / "benchmarks" / "configs" / "phi3v-128k-config.json"
MODELS = {"h200": H200, "h100": H100}
PROMPT = "Describe this image in detail."


class Client(RunControl):
    """One request's control: streams text or not, may cancel itself; counts tokens."""

    def __init__(self, counts: dict[str, int], stream: bool, cancel_at: int | None) -> None:
        self.counts = counts
        self.stream = stream
        self.cancel_at = cancel_at
        self.text: list[str] = []

    def on_text(self, piece: str) -> None:
        if self.stream:
            self.text.append(piece)

    def on_token(self, count: int) -> None:
        self.counts["tokens"] += 1
        if count == self.cancel_at:
            raise Cancelled("cancelled by the benchmark")


def clients(
    engine: Engine, count: int, new_tokens: int, stop: threading.Event
) -> list[dict[str, int]]:
    """Start `count` client threads sending requests back to back until `stop`."""
    tallies = [{"tokens": 0, "finished": 0, "cancelled": 0} for _ in range(count)]

    def run(index: int) -> None:
        rng, counts = random.Random(index), tallies[index]
        while not stop.is_set():
            cancel_at = rng.randrange(1, new_tokens) if rng.random() < 1 / 8 else None
            control = Client(counts, rng.random() < 0.5, cancel_at)
            sampled = rng.random() < 0.25
            request = GenerationRequest(
                PROMPT, [], new_tokens, temperature=0.7 if sampled else 0.0, top_p=0.9,
                seed=rng.randrange(1 << 30), control=control,
            )
            try:
                engine.generate(request)
                counts["finished"] += 1
            except Cancelled:
                counts["cancelled"] += 1
            except VisionQueueError:  # the engine closed under a request still running
                if not stop.is_set():
                    raise

    for index in range(count):
        threading.Thread(target=run, args=(index,), daemon=True).start()
    return tallies


def describe_prompt(processor: Phi3VProcessor, crops: bool) -> tuple[Any, torch.Tensor | None]:
    pixels = np.random.default_rng(0).integers(0, 256, size=(1344, 1344, 3), dtype=np.uint8)
    encoded = processor.encode(chat_text(PROMPT, 1), [Image.fromarray(pixels)], 16)
    return encoded, processor.crops(encoded, torch.cuda.is_available()) if crops else None


def reuse_prompt(engine: Engine, encoded: Any, crops: torch.Tensor | None) -> None:
    """Every request gets the same encoded prompt (preprocessing is left out of the load)."""

    def prepare(request: GenerationRequest) -> Job:
        request.control.on_prompt(encoded.prompt_tokens)
        sampling = SamplingParams(request.temperature, request.top_p, request.seed)
        return Job(encoded, crops, request.max_new_tokens, sampling)

    engine._prepare = prepare  # type: ignore[method-assign]


# Engines --------------------------------------------------------------------------------------


def simulated_engine(model: DeviceModel, rows: int, new_tokens: int) -> Engine:
    config = Phi3VConfig.from_file(FULL_CONFIG)
    processor = Phi3VProcessor.from_dir(TOKENIZER_DIR, config)
    row_positions = 4096
    pool = KVPool(
        num_layers=1, kv_heads=1, head_dim=1, positions=rows * row_positions,
        dtype=torch.float32, device=torch.device("cpu"), tokens_first=False, zeroed=False,
        granularity=256,
    )
    stop_id = min(processor.stop_token_ids)
    runner = SimulatedRunner(pool, model, stop_id=stop_id)
    batching = Batching(pool, runner, rows, row_positions, 1024)  # type: ignore[arg-type]
    engine = Engine(
        model_id=f"simulated-{model.name}", device=torch.device("cpu"), dtype=torch.bfloat16,
        attention="flash_attention_2", model=types.SimpleNamespace(config=config),  # type: ignore[arg-type]
        processor=processor, num_crops=16, load_seconds=0.0, batching=batching,
    )
    encoded, _ = describe_prompt(processor, crops=False)
    reuse_prompt(engine, encoded, None)
    return engine


class LaunchTimes:
    """Device time of every launch of a real runner: CUDA event pairs, or wall time on CPU."""

    def __init__(self, runner: Any) -> None:
        self.cuda = runner.device.type == "cuda"
        self.records: list[tuple[float, Any, Any, str]] = []  # (host time, start, end, kind)
        for name, kind in (
            ("launch_decode", "decode"), ("launch_first_token", "prefill"),
            ("prefill_unit", "prefill"), ("marker", "marker"),
        ):
            setattr(runner, name, self._timed(getattr(runner, name), kind))

    def _timed(self, launch: Callable[..., Any], kind: str) -> Callable[..., Any]:
        def timed(*args: Any, **options: Any) -> Any:
            now = time.perf_counter()
            start = torch.cuda.Event(enable_timing=True) if self.cuda else now
            if self.cuda:
                start.record()
            result = launch(*args, **options)
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
            else:
                end = time.perf_counter()
            self.records.append((now, start, end, kind))
            return result

        return timed

    def busy(self, begin: float, end: float, kind: str | None = None) -> tuple[float, int]:
        """Device seconds of the launches made in [begin, end], and how many."""
        if self.cuda:
            torch.cuda.synchronize()
        total, count = 0.0, 0
        for at, start, stop, what in list(self.records):
            if begin <= at <= end and (kind is None or what == kind):
                total += start.elapsed_time(stop) / 1e3 if self.cuda else stop - start
                count += 1
        return total, count


# Measuring ------------------------------------------------------------------------------------


def measure(
    engine: Engine, rows: int, args: argparse.Namespace, times: LaunchTimes | None
) -> dict[str, float]:
    scheduler = engine.scheduler
    scheduler.max_rows = rows
    stop = threading.Event()
    tallies = clients(engine, rows + max(2, rows // 4), args.new_tokens, stop)

    def snapshot() -> tuple[float, int, float, int, int]:
        finished = sum(t["finished"] + t["cancelled"] for t in tallies)
        tokens = sum(t["tokens"] for t in tallies)
        return time.perf_counter(), tokens, scheduler.sync_wait_s, scheduler.steps, finished

    time.sleep(args.warmup)
    t0, tokens0, wait0, steps0, done0 = snapshot()
    time.sleep(args.seconds)
    t1, tokens1, wait1, steps1, done1 = snapshot()
    stop.set()
    window = t1 - t0
    if times is None:
        stream = scheduler.runner.stream  # type: ignore[attr-defined]
        busy = stream.busy_between(t0, t1)
        decode = [(s, e) for s, e, k in list(stream.timeline) if k == "decode" and t0 <= s <= t1]
        decode_busy, decode_steps = sum(e - s for s, e in decode), len(decode)
    else:
        busy, _ = times.busy(t0, t1)
        decode_busy, decode_steps = times.busy(t0, t1, "decode")
    steps = max(1, steps1 - steps0)
    tokens = tokens1 - tokens0
    return {
        "device_busy": round(busy / window, 4),
        "host_ms_per_step": round(max(0.0, window - busy) / steps * 1e3, 4),
        "loop_ms_per_step": round((window - (wait1 - wait0)) / steps * 1e3, 4),
        "step_ms": round(decode_busy / max(1, decode_steps) * 1e3, 4),
        "steps": steps,
        "tokens_per_s": round(tokens / window, 1),
        "ideal_tokens_per_s": round(tokens / busy, 1) if busy else 0.0,
        "requests_per_s": round((done1 - done0) / window, 2),
    }


def predicted_tasks_per_s(model: DeviceModel, rows: int, new_tokens: int, busy: float) -> float:
    prompt, crops = 2_530, 17
    step = model.decode_s([prompt + new_tokens // 2] * rows)
    return round(busy / (model.prefill_s(prompt, crops) + new_tokens * step / rows), 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,16,32")
    parser.add_argument("--device", default="sim", help="sim | cuda | cpu (a dry run)")
    parser.add_argument("--device-model", default="h200", choices=sorted(MODELS))
    parser.add_argument("--step-ms", type=float, help="sim: a fixed decode step instead")
    parser.add_argument("--config", default="full", help="full | small (cuda/cpu)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds before the window")
    parser.add_argument("--seconds", type=float, default=10.0, help="the window, per batch")
    parser.add_argument("--sync", action="store_true", help="also the synchronous loop")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    batches = [int(b) for b in args.batches.split(",")]
    model = MODELS[args.device_model]
    if args.step_ms is not None:
        model = DeviceModel(f"fixed {args.step_ms} ms", 1.0, model.flops, step_s=args.step_ms / 1e3)
    setup = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "device": f"{model.name} (simulated)" if args.device == "sim" else args.device,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(f"setup: {json.dumps(setup)}", flush=True)
    results: dict[str, Any] = {"setup": setup, "batches": {}}
    if args.sync:
        results["batches_sync"] = {}
    real = None
    times = None
    if args.device != "sim":
        real, times = real_engine(args, max(batches))
    for rows in batches:
        for overlap in [True, False] if args.sync else [True]:
            engine = real or simulated_engine(model, rows, args.new_tokens)
            engine.scheduler.overlap = overlap
            figures = measure(engine, rows, args, times)
            if args.device == "sim":
                figures["predicted_tasks_per_s"] = predicted_tasks_per_s(
                    model, rows, args.new_tokens, figures["device_busy"]
                )
            if real is None:
                engine.close()
                engine.runner.stream.close()  # type: ignore[attr-defined]
            else:
                wait_idle(engine)
            key = "batches" if overlap else "batches_sync"
            results[key][str(rows)] = figures
            print(f"batch {rows:2d} {'overlap' if overlap else 'sync   '}: "
                  + ", ".join(f"{k} {v}" for k, v in figures.items()), flush=True)
    if real is not None:
        real.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def wait_idle(engine: Engine) -> None:
    """Let the clients' last requests end before the next level reuses the engine."""
    for _ in range(600):
        stats = engine.scheduler.stats()
        if not (stats["waiting"] or stats["prefilling"] or stats["decoding"]):
            return
        time.sleep(0.1)


def real_engine(args: argparse.Namespace, rows: int) -> tuple[Engine, LaunchTimes]:
    from benchmarks.bench_batching import random_engine

    engine = random_engine(args, rows)
    encoded, crops = describe_prompt(engine.processor, crops=True)
    reuse_prompt(engine, encoded, crops)
    return engine, LaunchTimes(engine.runner)


if __name__ == "__main__":
    sys.exit(main())
