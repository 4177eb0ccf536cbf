"""Queue benchmark: what waiting costs, against raw Celery on the same Redis, in one run.

Starts its own redis-server, a raw Celery worker with a no-op task
(`bench_queue_raw_celery.py`) and a real `worker run` on the tiny checkpoint, then
measures, side by side:

* raw Celery round trip: `send_task(no-op).get()` (Celery's own pub/sub result wait);
* vision-queue round trip of a 1-token `ask`: `Client.submit` + `result(wait=True)`, and
  what the queue adds to it: the round trip minus the worker's own run time
  (`timings.total`, from the task's start to its result); the same with the old way of
  waiting, polling the status every 0.2 s, for comparison;
* queueing 1,000 small tasks: a loop of `submit` against one `submit_many` (and against
  a loop of the previous release's submit: a ping, then Celery's `send_task`), medians of
  `--submit-repeats` alternating rounds.

Target: at the median, the queue adds at most 1.5 x the raw round trip + 1 ms.

    python benchmarks/bench_queue.py [--rounds 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.redis_server import RedisServer  # noqa: E402
from support.workers import WorkerProcess, base_env  # noqa: E402

from producer import Client, SubmitRequest  # noqa: E402
from vision_queue.celery_config import make_celery_app  # noqa: E402
from vision_queue.settings import Settings  # noqa: E402


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def raw_celery_round_trips(redis_url: str, rounds: int, logdir: Path) -> list[float]:
    env = {**base_env(redis_url), "PYTHONPATH": str(ROOT)}
    log = (logdir / "raw-celery.log").open("wb")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "benchmarks.bench_queue_raw_celery:app",
            "worker",
            "--pool",
            "threads",
            "-c",
            "1",
            "-Q",
            "bench-raw",
            "--without-mingle",
            "--without-gossip",
            "-l",
            "WARNING",
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        os.environ["REDIS_URL"] = redis_url
        from benchmarks.bench_queue_raw_celery import QUEUE, TASK, app

        app.send_task(TASK, queue=QUEUE).get(timeout=120)  # the worker is up
        times = []
        for _ in range(rounds):
            began = time.perf_counter()
            app.send_task(TASK, queue=QUEUE).get(timeout=30)
            times.append(time.perf_counter() - began)
        app.close()
        return times
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()


def queue_round_trips(
    client: Client, rounds: int, poll: bool = False
) -> tuple[list[float], list[float]]:
    """(round trips, what the queue added: round trip minus the worker's run time)."""
    totals, added = [], []
    for i in range(rounds):
        began = time.perf_counter()
        handle = client.submit("ask", [], f"Say {i}.", max_new_tokens=1)
        if poll:
            while not client.status(handle.id).done:
                time.sleep(0.2)
            result = client.result(handle.id)
        else:
            result = client.result(handle.id, wait=True, timeout=60)
        elapsed = time.perf_counter() - began
        assert result is not None and result["state"] == "SUCCESS", result
        totals.append(elapsed)
        added.append(elapsed - result["timings"]["total"])
    return totals, added


def submit_rates(redis_url: str, count: int, repeats: int) -> tuple[float, float, float]:
    """Median seconds to queue `count` tasks, over `repeats` alternating rounds: a loop of
    submit, one submit_many, and a loop of the previous release's submit (a ping, then
    Celery's send_task, per task)."""
    settings = Settings.from_env({}, redis_url=redis_url, queue="bench-nobody")
    requests = [SubmitRequest("ask", [], f"Say {i}.") for i in range(count)]
    loops, manys, celery_loops = [], [], []
    with Client(settings) as client:
        client.submit("ask", [], "warm up")
        client.submit_many(requests[:10])
        app = make_celery_app(settings)
        for _ in range(repeats):
            began = time.perf_counter()
            for request in requests:
                client.submit(request.task, request.images, request.prompt)
            loops.append(time.perf_counter() - began)
            began = time.perf_counter()
            client.submit_many(requests)
            manys.append(time.perf_counter() - began)
            began = time.perf_counter()
            previous_release_submits(client, app, count)
            celery_loops.append(time.perf_counter() - began)
            client._redis.delete("bench-nobody")  # the next round starts from an empty list
        app.close()
    return statistics.median(loops), statistics.median(manys), statistics.median(celery_loops)


def previous_release_submits(client: Client, app: Any, count: int) -> None:
    message = {"v": 1, "task": "ask", "prompt": "Say.", "images": [], "options": {}}
    for _ in range(count):
        task_id = str(uuid.uuid4())
        client._redis.ping()
        client._redis.set(f"vq:submitted:{task_id}", "ask", ex=86400)
        app.send_task(
            "vision_queue.ask",
            args=(message,),
            task_id=task_id,
            queue="bench-nobody",
            argsrepr="(ask)",
            kwargsrepr="{}",
            retry=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--poll-rounds", type=int, default=20)
    parser.add_argument("--submits", type=int, default=1000)
    parser.add_argument("--submit-repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        logdir = Path(tmp)
        raw = raw_celery_round_trips(server.url, args.rounds, logdir)
        settings = Settings.from_env(
            {}, redis_url=server.url, max_new_tokens_caps="ask=8,describe=8,ocr=8,compare=8"
        )
        with WorkerProcess(server.url, logdir, OMP_NUM_THREADS="1"), Client(settings) as client:
            queue_round_trips(client, 10)  # warm up
            totals, added = queue_round_trips(client, args.rounds)
            poll_totals, poll_added = queue_round_trips(client, args.poll_rounds, poll=True)
        loop_s, many_s, celery_loop_s = submit_rates(server.url, args.submits, args.submit_repeats)

    raw_ms, added_ms = median_ms(raw), median_ms(added)
    limit_ms = 1.5 * raw_ms + 1.0
    figures: dict[str, Any] = {
        "raw_celery_round_trip_ms": round(raw_ms, 2),
        "queue_round_trip_ms": round(median_ms(totals), 2),
        "queue_added_ms": round(added_ms, 2),
        "queue_added_limit_ms": round(limit_ms, 2),
        "queue_added_ratio_to_raw": round(added_ms / raw_ms, 2),
        "polling_round_trip_ms": round(median_ms(poll_totals), 2),
        "polling_added_ms": round(median_ms(poll_added), 2),
        "submit_loop_per_s": round(args.submits / loop_s),
        "submit_many_per_s": round(args.submits / many_s),
        "submit_many_speedup": round(loop_s / many_s, 1),
        "previous_submit_loop_per_s": round(args.submits / celery_loop_s),
        "submit_many_speedup_vs_previous_submit": round(celery_loop_s / many_s, 1),
        "rounds": args.rounds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    for name, value in figures.items():
        print(f"{name:28} {value}")
    verdict = "meets" if added_ms <= limit_ms else "MISSES"
    print(f"target: queue adds <= 1.5 x raw + 1 ms = {limit_ms:.2f} ms at the median: {verdict}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
