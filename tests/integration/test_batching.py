"""A real worker running several tasks at once (VQ_MAX_BATCH): each task still gets its own
exact answer, cancel, deadline, progress and failure.

The tiny reference checkpoint runs in float32 on the CPU, so every reference case must come
back with exactly the reference's text however the worker batched it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from support.reference import CASES, IMAGES_DIR
from support.workers import WorkerProcess, wait_until_generating

from producer import Client
from vision_queue.settings import Settings

pytestmark = pytest.mark.timeout(600)

LONG = 100_000  # tokens: far more than any test waits for
SLOTS = 4


@pytest.fixture(scope="module")
def batch_worker(module_redis, tmp_path_factory) -> Iterator[WorkerProcess]:
    with WorkerProcess(
        module_redis.url,
        tmp_path_factory.mktemp("batch-worker"),
        VQ_MAX_BATCH=str(SLOTS),
        VQ_MAX_NEW_TOKENS_CAPS=f"ask={LONG},describe=16,ocr=16,compare=16",
        VQ_MAX_RETRIES="0",  # an out-of-memory fails at once instead of being retried
        VQ_FAULT_INJECTION="decode_oom_marker=__DECODE_OOM__",
    ) as worker:
        yield worker


@pytest.fixture
def batch_client(module_redis, batch_worker) -> Iterator[Client]:
    settings = Settings.from_env({}, redis_url=module_redis.url, max_new_tokens_caps=f"ask={LONG}")
    with Client(settings) as client:
        yield client


def submit_case(client: Client, case_id: str) -> str:
    case = CASES[case_id]
    handle = client.submit(
        "ask",
        [IMAGES_DIR / name for name in case["images"]],
        case["prompt"],
        max_new_tokens=case["max_new_tokens"],
        num_crops=case["num_crops"],
    )
    return handle.id


def most_running(worker: WorkerProcess, until: Callable[[], bool], timeout_s: float = 300) -> int:
    """The most tasks the worker's health file showed running at once, until `until()`."""
    most, deadline = 0, time.monotonic() + timeout_s
    while not until() and time.monotonic() < deadline:
        running = worker._health().get("running") or {}
        most = max(most, len(running) if isinstance(running, dict) else 0)
        time.sleep(0.02)
    return most


def test_every_reference_case_run_together_gets_the_reference_text(
    batch_client: Client, batch_worker: WorkerProcess
) -> None:
    # Given all twelve reference cases queued at once for a worker with four slots,
    ids = {case_id: submit_case(batch_client, case_id) for case_id in CASES}

    # when it runs them, four at a time,
    overlap = most_running(
        batch_worker, lambda: all(batch_client.status(i).done for i in ids.values())
    )

    # then each has exactly the reference's text and token count.
    for case_id, task_id in ids.items():
        result = batch_client.result(task_id, wait=True, timeout=120)
        assert result is not None and result["state"] == "SUCCESS", (case_id, result)
        assert result["text"] == CASES[case_id]["generated_text"], case_id
        assert result["usage"]["completion_tokens"] == len(CASES[case_id]["generated_ids"]), case_id
    assert overlap > 1  # tasks really ran side by side


def test_cancelling_one_of_several_running_tasks_stops_only_it(batch_client: Client) -> None:
    handles = [
        batch_client.submit("ask", [], f"Tell story number {n}.", max_new_tokens=LONG)
        for n in range(3)
    ]
    for handle in handles:
        wait_until_generating(batch_client, handle.id)

    batch_client.cancel(handles[1].id)
    cancelled = batch_client.result(handles[1].id, wait=True, timeout=60)

    assert cancelled is not None and cancelled["error"]["code"] == "cancelled"
    # The other two go on generating, each reporting its own progress.
    before = [batch_client.status(h.id).tokens for h in (handles[0], handles[2])]
    time.sleep(1.0)
    after = [batch_client.status(h.id) for h in (handles[0], handles[2])]
    assert all(s.state == "PROGRESS" for s in after)
    assert all(s.tokens > b for s, b in zip(after, before, strict=True))
    for handle in (handles[0], handles[2]):
        batch_client.cancel(handle.id)
        result = batch_client.result(handle.id, wait=True, timeout=60)
        assert result is not None and result["error"]["code"] == "cancelled"


def test_an_out_of_memory_in_a_batched_step_fails_only_its_request(
    batch_client: Client, batch_worker: WorkerProcess
) -> None:
    # Given a request whose every decode step runs out of memory, batched with two others,
    doomed = batch_client.submit("ask", [], "__DECODE_OOM__ tell me more", max_new_tokens=40)
    others = [submit_case(batch_client, c) for c in ("text_only", "two_images_c4")]

    failed = batch_client.result(doomed.id, wait=True, timeout=120)
    results = [batch_client.result(i, wait=True, timeout=120) for i in others]

    # then it alone fails, as out of memory, and the others get their exact answers,
    assert failed is not None and failed["error"]["code"] == "resource_exhausted"
    for case_id, result in zip(("text_only", "two_images_c4"), results, strict=True):
        assert result is not None and result["text"] == CASES[case_id]["generated_text"]
    # and the worker keeps serving.
    again = batch_client.result(submit_case(batch_client, "text_eos_stop"), wait=True, timeout=60)
    assert again is not None and again["text"] == CASES["text_eos_stop"]["generated_text"]


@pytest.fixture(scope="module")
def deadline_worker(module_redis, tmp_path_factory) -> Iterator[WorkerProcess]:
    with WorkerProcess(
        module_redis.url,
        tmp_path_factory.mktemp("deadline-worker"),
        VQ_QUEUE="short",
        VQ_MAX_BATCH="2",
        VQ_MAX_NEW_TOKENS_CAPS=f"ask={LONG}",
        VQ_TASK_TIME_LIMIT_S="6",  # the deployment's visibility timeout (3600 s) still exceeds it
    ) as worker:
        yield worker


def test_each_task_has_its_own_deadline(module_redis, deadline_worker) -> None:
    settings = Settings.from_env(
        {}, redis_url=module_redis.url, queue="short", max_new_tokens_caps=f"ask={LONG}"
    )
    with Client(settings) as client:
        endless = client.submit("ask", [], "Tell an endless story.", max_new_tokens=LONG)
        wait_until_generating(client, endless.id)
        # A short task joins the batch while the endless one runs,
        short = client.submit("ask", [], "Say hello.", max_new_tokens=8)

        short_result = client.result(short.id, wait=True, timeout=60)
        endless_result = client.result(endless.id, wait=True, timeout=60)

    # then it finishes on its own, and the endless one fails at its own limit.
    assert short_result is not None and short_result["state"] == "SUCCESS"
    assert short_result["usage"]["completion_tokens"] == 8
    assert endless_result is not None and endless_result["error"]["code"] == "timeout"
    assert endless_result["timings"]["total"] >= 6


def test_a_worker_holds_only_the_messages_its_slots_are_running(batch_client: Client) -> None:
    # Given more long tasks than the worker has slots,
    handles = [
        batch_client.submit("ask", [], f"Tell story {n}.", max_new_tokens=LONG)
        for n in range(SLOTS + 2)
    ]
    running = handles[:SLOTS]
    for handle in running:
        wait_until_generating(batch_client, handle.id)

    # then the rest stay in the queue, free for any other worker to take.
    assert batch_client._redis.llen("gpu") == 2
    assert all(batch_client.status(h.id).state == "PENDING" for h in handles[SLOTS:])
    for handle in handles:
        batch_client.cancel(handle.id)
    for handle in handles:
        result = batch_client.result(handle.id, wait=True, timeout=60)
        assert result is not None and result["error"]["code"] == "cancelled"
