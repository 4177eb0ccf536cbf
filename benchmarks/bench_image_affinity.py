"""Routing measured (issue #22 item 5): how often a later question about an image reaches
the worker that cached it, with tasks taken from the shared queue as they are today.

A real redis-server and N real `worker run`s (tiny checkpoint, CPU, image cache on, one
row each by default), the clients' normal submit. Per round a new image and four
different questions about it, in two patterns:

* one after another: each question submitted once the previous one ended (a user or a
  pipeline asking in turn);
* together: the four submitted at once (a backend fanning out its questions).

For questions 2-4 it counts hits (`usage.cached_tokens` > 0) and how many ran on the
worker that ran question 1 (`worker` in the result). With perfect affinity every later
question would be a hit; what is missing is what routing could gain.

    python benchmarks/bench_image_affinity.py                    # 2 workers, 8 rounds
    python benchmarks/bench_image_affinity.py --workers 3 --batch 2

Figures and the decision in docs/benchmarks.md and docs/model.md. Not a timed test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_image_reuse import QUESTIONS, image  # noqa: E402


def run_round(client: Any, picture: bytes, together: bool, new_tokens: int) -> list[dict]:
    """The four questions' results, in question order."""
    if together:
        handles = [
            client.submit("ask", [picture], question, max_new_tokens=new_tokens)
            for question in QUESTIONS
        ]
        return [client.result(h.id, wait=True, timeout=600) for h in handles]
    results = []
    for question in QUESTIONS:
        handle = client.submit("ask", [picture], question, max_new_tokens=new_tokens)
        results.append(client.result(handle.id, wait=True, timeout=600))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="VQ_MAX_BATCH of each worker")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--num-crops", type=int, default=4)
    args = parser.parse_args()

    from support.redis_server import RedisServer
    from support.workers import WorkerProcess

    from producer.client import Client
    from vision_queue.settings import Settings

    caps = "describe=16,ocr=16,compare=16,ask=64"
    env = {
        "VQ_MAX_BATCH": str(args.batch),
        "VQ_MAX_NEW_TOKENS_CAPS": caps,
        "VQ_NUM_CROPS": str(args.num_crops),
        "VQ_IMAGE_CACHE_BYTES": "-1",
    }
    with tempfile.TemporaryDirectory() as folder, RedisServer(Path(folder)) as server:
        workers = [
            WorkerProcess(server.url, Path(folder) / f"w{i}", **env) for i in range(args.workers)
        ]
        for worker in workers:
            worker.start()
        settings = Settings.from_env(None, redis_url=server.url, max_new_tokens_caps=caps)
        try:
            with Client(settings) as client:
                for together in (False, True):
                    later = same_worker = hits = 0
                    for number in range(args.rounds):
                        # Another image per round and pattern: its first question is a miss.
                        picture = image(number + (args.rounds if together else 0))
                        results = run_round(client, picture, together, args.new_tokens)
                        assert all(r and r["state"] == "SUCCESS" for r in results), results
                        first = results[0]["worker"]
                        for result in results[1:]:
                            later += 1
                            same_worker += result["worker"] == first
                            hits += result["usage"].get("cached_tokens", 0) > 0
                    name = "together" if together else "one after another"
                    print(
                        f"{args.workers} workers x {args.batch} rows, {name}: questions 2-4 "
                        f"on question 1's worker {same_worker}/{later}, image-cache hits "
                        f"{hits}/{later} ({hits / later:.0%})",
                        flush=True,
                    )
        finally:
            for worker in workers:
                worker.stop()


if __name__ == "__main__":
    main()
