"""The baseline for `bench_queue.py`: a raw Celery app with a no-op task, nothing of ours.

Same broker, result backend and serializer settings as vision-queue (threads pool,
concurrency 1, late acks), so the difference `bench_queue.py` measures is what the queue
adds: staging and validation, leases, streams, first-writer-wins storing, pushed waits.

    celery -A benchmarks.bench_queue_raw_celery:app worker --pool threads -c 1 -Q bench-raw
"""

from __future__ import annotations

import os

from vision_queue.celery_config import make_celery_app
from vision_queue.settings import Settings

QUEUE = "bench-raw"
TASK = "bench.noop"

app = make_celery_app(Settings.from_env({}, redis_url=os.environ["REDIS_URL"], queue=QUEUE))


@app.task(name=TASK)
def noop() -> None:
    return None
