"""Structured output's cost: constrained rows against free ones at batch 4 (CPU, tiny checkpoint).

    python benchmarks/bench_structured.py                 # 4 free, 4 constrained, 2 + 2
    python benchmarks/bench_structured.py --rounds 5 --new-tokens 96

Each configuration runs 4 requests from 4 threads (as 4 worker slots would) on one engine
with max_batch 4, greedy, the same image and prompts; the figure is wall time per generated
token (prefill included alike), the median of `--rounds` (the configurations interleaved).
The constrained requests carry a schema whose output is long (an array of bounded strings),
so they run as many tokens as the free ones. Also printed: the mask's own time per row per
step (`RowConstraint.allowed`, llguidance's mask plus unpacking it over the 32,064 logits)
and the first compile of a schema against a cached one. Target (issue 21): constrained rows
cost at most 1.5x per generated token. Not a timed test.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.reference import TINY_MODEL  # noqa: E402

from vision_queue.structured import parse_response_format  # noqa: E402
from worker.inference.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402

LONG = {
    "type": "object",
    "properties": {
        "lines": {
            "type": "array",
            "items": {"type": "string", "maxLength": 24},
            "minItems": 40,
            "maxItems": 40,
        }
    },
    "required": ["lines"],
    "additionalProperties": False,
}
IMAGE = Image.new("RGB", (336, 336), (120, 60, 30))
PROMPTS = ["Describe the cover.", "What is written?", "Who wrote it?", "List the colours."]


def schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    spec = {"name": name, "schema": schema}
    fmt = parse_response_format({"type": "json_schema", "json_schema": spec})
    assert fmt is not None
    return fmt


def requests(constrained: list[bool], new_tokens: int) -> list[GenerationRequest]:
    fmt = schema_format("long", LONG)
    return [
        GenerationRequest(
            prompt, [IMAGE], new_tokens, num_crops=1, response_format=fmt if flag else None
        )
        for prompt, flag in zip(PROMPTS, constrained, strict=True)
    ]


def run(engine: Engine, batch: list[GenerationRequest]) -> tuple[float, int, list[Any]]:
    results: list[Any] = [None] * len(batch)

    def serve(index: int) -> None:
        results[index] = engine.generate(batch[index])

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(batch))]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    return wall, sum(r.completion_tokens for r in results), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    engine = Engine.load(EngineConfig(model=TINY_MODEL, device="cpu", max_batch=4))
    print(f"# {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}, max_batch 4, {args.new_tokens} new tokens, {args.rounds} rounds")
    configs = {
        "4 free": [False] * 4,
        "4 constrained": [True] * 4,
        "2 free + 2 constrained": [False, True, False, True],
    }
    run(engine, requests([True] * 4, 8))  # warm up, and compile the schema once
    samples: dict[str, list[float]] = {name: [] for name in configs}
    tokens: dict[str, int] = {}
    for _ in range(args.rounds):  # interleaved: a shared machine's load hits every config
        for name, flags in configs.items():
            wall, tokens[name], _ = run(engine, requests(flags, args.new_tokens))
            samples[name].append(wall / tokens[name])
    per_token = {name: statistics.median(values) for name, values in samples.items()}
    for name in configs:
        print(f"{name:>24}: {per_token[name] * 1e3:7.2f} ms per generated token "
              f"({tokens[name]} tokens per round)")
    ratio = per_token["4 constrained"] / per_token["4 free"]
    print(f"{'constrained / free':>24}: {ratio:.2f}x (target <= 1.5x)")

    constraint = engine.grammars.constraint(schema_format("long", LONG))
    constraint.advance(6377)  # '{"'
    spent, steps = 0.0, 200
    for _ in range(steps):
        began = time.perf_counter()
        allowed = constraint.allowed()
        spent += time.perf_counter() - began
        constraint.advance(int(allowed.nonzero()[0]))
    print(f"{'mask per row per step':>24}: {spent / steps * 1e6:7.1f} us (llguidance + unpacking)")
    schema = {**LONG, "description": f"fresh {time.time()}"}
    fresh = schema_format("fresh", schema)
    began = time.perf_counter()
    engine.grammars.constraint(fresh)
    first = time.perf_counter() - began
    began = time.perf_counter()
    engine.grammars.constraint(fresh)
    cached = time.perf_counter() - began
    print(f"{'schema compile':>24}: first {first * 1e3:.2f} ms, cached {cached * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
