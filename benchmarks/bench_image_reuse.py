"""Image reuse: four different questions about one image, with the worker's image cache
and with VQ_IMAGE_CACHE_BYTES=0, through the real queue, in one run.

A real redis-server and a real `worker run` (tiny checkpoint by default, CPU) per arm,
one after the other on the same Redis. Each round draws a new image (so its first
question is a miss in both arms), then asks four different questions about it one after
another, each submitted once the previous one ended, and measures its time to first
token: from `submit` to the first text delta on the task's stream (`Client.stream`).
The texts of both arms must be identical (image reuse changes no token).

    python benchmarks/bench_image_reuse.py                 # 5 rounds, 16 crops
    python benchmarks/bench_image_reuse.py --rounds 3 --num-crops 4 --threads 2
    python benchmarks/bench_image_reuse.py --device cuda     # benchmarks/gpu_batching.sh

Target (issue #22 item 6): questions 2-4 reach their first token in at most 0.4x the time
they take without the cache (medians). Figures in docs/benchmarks.md. Not a timed test.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

QUESTIONS = (
    "What is written on this sign?",
    "What colour is the background?",
    "How many shapes are there?",
    "Describe the picture in one sentence.",
)


def image(round_: int) -> bytes:
    from PIL import Image, ImageDraw

    round_ %= 20
    picture = Image.new("RGB", (640, 480), (240, 240 - 10 * round_, 200))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((60 + 7 * round_, 60, 300, 260), fill=(30, 90, 200))
    draw.ellipse((340, 120, 560, 400), fill=(200, 60, 40))
    draw.text((40, 420), f"Round {round_}: open 9-17", fill="black")
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def arm(server_url: str, folder: Path, cache_bytes: str, args: Any) -> list[list[tuple]]:
    """Per round, per question: (time to first token s, text, cached tokens)."""
    from support.workers import WorkerProcess

    from producer.client import Client
    from vision_queue.settings import Settings

    caps = "describe=16,ocr=16,compare=16,ask=64"
    env = {
        "VQ_MAX_BATCH": "1",
        "VQ_MAX_NEW_TOKENS_CAPS": caps,
        "VQ_NUM_CROPS": str(args.num_crops),
        "VQ_IMAGE_CACHE_BYTES": cache_bytes,
        "OMP_NUM_THREADS": str(args.threads),
        "VQ_DEVICE": args.device,
        "VQ_DTYPE": "float32" if args.device == "cpu" else "bfloat16",
    }
    settings = Settings.from_env(None, redis_url=server_url, max_new_tokens_caps=caps)
    rounds: list[list[tuple]] = []
    with WorkerProcess(server_url, folder, **env), Client(settings) as client:

        def ask(picture: bytes, question: str) -> tuple:
            began = time.perf_counter()
            handle = client.submit("ask", [picture], question, max_new_tokens=args.new_tokens)
            first = None
            for _piece in client.stream(handle.id):
                if first is None:
                    first = time.perf_counter() - began
            result = client.result(handle.id, wait=True, timeout=600)
            assert result is not None and result["state"] == "SUCCESS", result
            ttft = first if first is not None else time.perf_counter() - began
            return ttft, result["text"], result["usage"].get("cached_tokens", 0)

        ask(image(19), QUESTIONS[0])  # warm-up, another image
        for number in range(args.rounds):
            picture = image(number)
            rounds.append([ask(picture, question) for question in QUESTIONS])
            times = ", ".join(f"{t:.2f}" for t, _, _ in rounds[-1])
            print(f"  cache {cache_bytes}: round {number}: ttft {times} s", flush=True)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--num-crops", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the worker")
    parser.add_argument("--device", default="cpu", help="VQ_DEVICE of the worker (cpu, cuda)")
    args = parser.parse_args()

    from support.redis_server import RedisServer

    with tempfile.TemporaryDirectory() as folder, RedisServer(Path(folder)) as server:
        cached = arm(server.url, Path(folder), "-1", args)
        plain = arm(server.url, Path(folder), "0", args)
    same = all(
        [text for _, text, _ in a] == [text for _, text, _ in b]
        for a, b in zip(cached, plain, strict=True)
    )
    later_cached = [t for round_ in cached for t, _, _ in round_[1:]]
    later_plain = [t for round_ in plain for t, _, _ in round_[1:]]
    first_cached = [round_[0][0] for round_ in cached]
    first_plain = [round_[0][0] for round_ in plain]
    reused = [c for round_ in cached for _, _, c in round_[1:]]
    median = statistics.median
    print(
        f"questions 2-4, time to first token (median of {len(later_cached)}): "
        f"cache {median(later_cached):.3f} s, VQ_IMAGE_CACHE_BYTES=0 {median(later_plain):.3f} s: "
        f"{median(later_cached) / median(later_plain):.2f}x; question 1: "
        f"{median(first_cached):.3f} s against {median(first_plain):.3f} s; cached tokens per "
        f"later question {min(reused)}..{max(reused)}; texts identical: {same}"
    )
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
