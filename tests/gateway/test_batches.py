"""The Files and Batch APIs through the official `openai` SDK, unchanged.

Real parts: `producer serve` (one per test here when a restart is part of the test),
redis-server, a worker on the tiny checkpoint. Lines are chat completions (and responses)
with a small token limit, so a batch ends in seconds whatever the machine's speed; tests
that stop a batch part-way use more lines than the feeder keeps in flight
(`batch_feeder.IN_FLIGHT`), so some lines have certainly not been queued yet.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from gateway_support import (
    API_KEY,
    ENDLESS,
    MODEL,
    OTHER_KEY,
    STACK_ENV,
    GatewayProcess,
    SentEvents,
    data_uri,
)
from support.redis_server import RedisServer
from support.workers import WorkerProcess

from producer import Client
from producer.gateway.batch_feeder import IN_FLIGHT
from producer.gateway.batch_lines import line_task_id
from vision_queue.errors import UnknownTaskId

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def other(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=gateway.url("/v1"), api_key=OTHER_KEY, max_retries=0, timeout=60
    ) as client:
        yield client


def chat_line(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": MODEL,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 4,
            **body,
        },
    }


def jsonl(lines: list[Any]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def upload(sdk: openai.OpenAI, lines: list[Any]) -> str:
    return sdk.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id


def wait_until_ended(sdk: openai.OpenAI, batch_id: str, timeout_s: float = 240) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = sdk.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.2)
    raise TimeoutError(f"batch {batch_id} did not end: {batch}")


def read_lines(sdk: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in sdk.files.content(file_id).text.splitlines()]


def test_a_files_list_pages_in_order_past_files_that_expired(
    sdk: openai.OpenAI, module_redis: RedisServer
):
    # Given five files of this key, the middle one's record expired (its id still indexed)
    ids = [
        sdk.files.create(
            file=(f"{n}.jsonl", io.BytesIO(jsonl([chat_line("a", "Hi")]))), purpose="batch"
        ).id
        for n in range(5)
    ]
    redis.Redis.from_url(module_redis.url).delete(f"vq:gw:file:{ids[2]}")
    wanted = [i for i in ids if i != ids[2]]
    # When they are listed oldest first, two at a time, following `after`
    pages: list[Any] = []
    after: str | None = None
    while True:
        page = sdk.files.with_raw_response.list(limit=2, order="asc", after=after).parse()
        mine = [f.id for f in page.data if f.id in ids]
        pages.append(mine)
        if not page.has_more:
            break
        after = page.data[-1].id
    # Then every page is full but the last, in order, and the expired file is in none
    listed = [file_id for page in pages for file_id in page]
    assert listed[-4:] == wanted
    assert all(len(page) == 2 for page in pages[:-1])


def test_files_belong_to_the_key_that_uploaded_them(sdk: openai.OpenAI, other: openai.OpenAI):
    created = sdk.files.create(
        file=("in.jsonl", io.BytesIO(jsonl([chat_line("a", "Hi")]))), purpose="batch"
    )
    assert created.purpose == "batch" and created.bytes > 0
    assert sdk.files.retrieve(created.id).filename == "in.jsonl"
    assert sdk.files.content(created.id).content == jsonl([chat_line("a", "Hi")])
    assert created.id in [f.id for f in sdk.files.list()]
    assert created.id not in [f.id for f in other.files.list()]
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(created.id)
    with pytest.raises(openai.NotFoundError):
        other.files.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.create(
            input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert sdk.files.delete(created.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(created.id)


def test_a_batch_runs_its_lines_at_low_priority_and_writes_openais_files(
    sdk: openai.OpenAI, other: openai.OpenAI, module_redis: RedisServer, gateway: GatewayProcess
):
    lines = [
        chat_line("first", "Name a colour."),
        chat_line("second", "Name an animal."),
        chat_line("bad-model", "Hello.", model="gpt-4o"),
        {"custom_id": "first", "method": "POST", "url": "/v1/chat/completions", "body": {}},
        chat_line("picture", "What is here?"),
        "not an object",
    ]
    lines[4]["body"]["messages"][0]["content"] = [
        {"type": "text", "text": "What is here?"},
        {"type": "image_url", "image_url": {"url": data_uri()}},
    ]
    file_id = upload(sdk, lines)
    usage_before = _usage(gateway)
    sent = SentEvents(module_redis.url)
    batch = sdk.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly-ocr"},
    )
    assert batch.status in ("validating", "in_progress")
    assert batch.metadata == {"job": "nightly-ocr"}
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    done = wait_until_ended(sdk, batch.id)
    queues = sent.queues(3)
    sent.close()
    assert len(queues) == 3 and all(queue.endswith(".low") for queue in queues.values())
    assert _usage(gateway)["tasks"] - usage_before["tasks"] == 3  # counted for the batch's key
    assert done.status == "completed"
    assert done.request_counts.total == 6
    assert done.request_counts.completed == 3
    assert done.request_counts.failed == 3
    assert done.in_progress_at and done.completed_at and done.finalizing_at
    output = {line["custom_id"]: line for line in read_lines(sdk, done.output_file_id)}
    assert set(output) == {"first", "second", "picture"}
    for line in output.values():
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["usage"]["completion_tokens"] > 0
    errors = read_lines(sdk, done.error_file_id)
    assert len(errors) == 3
    assert all(line["response"] is None and line["error"]["message"] for line in errors)
    assert {line["custom_id"] for line in errors} == {"bad-model", "first", None}
    # Each line ran as an ordinary task, on the low-priority list, under its own id.
    tasks = redis.Redis.from_url(module_redis.url)
    try:
        for position in range(3):
            assert tasks.exists(f"vq:submitted:{line_task_id(batch.id, position)}")
        assert not tasks.exists(f"vq:submitted:{line_task_id(batch.id, 3)}")
    finally:
        tasks.close()
    # A line's task is the batch key's: another key cannot read it.
    line_task = line_task_id(batch.id, 0)
    assert sdk.get(f"/tasks/{line_task}", cast_to=httpx.Response).status_code == 200
    with pytest.raises(openai.NotFoundError):
        other.get(f"/tasks/{line_task}", cast_to=httpx.Response)
    assert batch.id in [b.id for b in sdk.batches.list()]
    paged = [b.id for b in sdk.batches.list(limit=1)]  # the SDK follows the pages
    assert batch.id in paged and len(paged) == len(set(paged))
    files = [f.id for f in sdk.files.list(limit=1)]
    assert {file_id, done.output_file_id, done.error_file_id} <= set(files)
    assert len(files) == len(set(files))
    assert batch.id not in [b.id for b in other.batches.list()]


def test_a_batch_may_ask_for_another_priority(sdk: openai.OpenAI, module_redis: RedisServer):
    sent = SentEvents(module_redis.url)
    batch = sdk.batches.create(
        input_file_id=upload(sdk, [chat_line("urgent", "Quick.")]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"priority": "high"},
    )
    wait_until_ended(sdk, batch.id)
    queues = sent.queues(1)
    sent.close()
    assert [queue[-5:] for queue in queues.values()] == [".high"]


def test_the_responses_endpoint_runs_in_a_batch(sdk: openai.OpenAI):
    line = {
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/responses",
        "body": {"model": MODEL, "input": "Say hi.", "max_output_tokens": 4},
    }
    batch = sdk.batches.create(
        input_file_id=upload(sdk, [line]), endpoint="/v1/responses", completion_window="24h"
    )
    done = wait_until_ended(sdk, batch.id)
    [output] = read_lines(sdk, done.output_file_id)
    body = output["response"]["body"]
    assert body["object"] == "response"
    assert body["output"][0]["content"][0]["text"] == (
        sdk.responses.create(model=MODEL, input="Say hi.", max_output_tokens=4).output_text
    )


def test_cancel_stops_the_lines_not_yet_run(sdk: openai.OpenAI):
    count = IN_FLIGHT + 40
    lines = [chat_line(f"line-{i}", f"Line {i}.") for i in range(count)]
    batch = sdk.batches.create(
        input_file_id=upload(sdk, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelling = sdk.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_until_ended(sdk, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    outputs = read_lines(sdk, done.output_file_id)
    errors = read_lines(sdk, done.error_file_id)
    seen = Counter(line["custom_id"] for line in outputs + errors)
    assert seen == Counter(f"line-{i}" for i in range(count))  # each line once
    cancelled = [line for line in errors if line["error"]["code"] == "batch_cancelled"]
    assert len(cancelled) >= count - IN_FLIGHT
    assert done.request_counts.completed == len(outputs)
    assert done.request_counts.failed == len(errors)


def test_an_expired_window_keeps_the_finished_lines(sdk: openai.OpenAI, module_redis: RedisServer):
    # One short line, then lines that run until they are stopped: whatever the machine's
    # speed, the window ends with exactly one line finished.
    count = IN_FLIGHT + 20
    lines = [chat_line("short", "Line 0.", max_tokens=2)]
    lines += [chat_line(f"line-{i}", f"Line {i}.", max_tokens=ENDLESS) for i in range(1, count)]
    batch = sdk.batches.create(
        input_file_id=upload(sdk, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    # Let some lines finish, then move the window's end to the past.
    deadline = time.monotonic() + 120
    while sdk.batches.retrieve(batch.id).request_counts.completed < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    store = redis.Redis.from_url(module_redis.url)
    try:
        key = f"vq:gw:batch:{batch.id}"
        meta = json.loads(store.hget(key, "meta"))
        meta["expires_at"] = int(time.time()) - 1
        store.hset(key, "meta", json.dumps(meta))
    finally:
        store.close()
    done = wait_until_ended(sdk, batch.id)
    assert done.status == "expired" and done.expired_at
    outputs = read_lines(sdk, done.output_file_id)
    errors = read_lines(sdk, done.error_file_id)
    assert [line["custom_id"] for line in outputs] == ["short"]
    assert outputs[0]["response"]["status_code"] == 200
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert len(outputs) + len(errors) == count


def test_a_gateway_restart_mid_batch_loses_no_line_and_runs_none_twice(
    module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
):
    count = 2 * IN_FLIGHT + 10
    lines = [chat_line(f"line-{i}", f"Line {i}.") for i in range(count)]
    sent = _SentCounter(module_redis.url)
    logs = tmp_path_factory.mktemp("restart")
    first = GatewayProcess(module_redis.url, logs).start()
    try:
        with _client(first) as client:
            batch = client.batches.create(
                input_file_id=upload(client, lines),
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
            deadline = time.monotonic() + 120
            while client.batches.retrieve(batch.id).request_counts.completed < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert first.process is not None
        first.process.kill()  # no goodbye: as a crash or an OOM kill
        first.process.wait()
    finally:
        first.stop()
    with GatewayProcess(module_redis.url, logs) as second, _client(second) as client:
        done = wait_until_ended(client, batch.id)
        outputs = read_lines(client, done.output_file_id)
    assert done.status == "completed"
    assert Counter(line["custom_id"] for line in outputs) == Counter(
        f"line-{i}" for i in range(count)
    )
    ids = {line_task_id(batch.id, position) for position in range(count)}
    queued = sent.counts()
    assert {task_id: queued[task_id] for task_id in ids} == dict.fromkeys(ids, 1)


class _SentCounter:
    """How many times each task was queued (its `task-sent` events), from now on."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe("/0.celeryev/task.sent")
        self.pubsub.get_message(timeout=5)

    def counts(self) -> Counter[str]:
        found: Counter[str] = Counter()
        while (message := self.pubsub.get_message(timeout=0.5)) is not None:
            if message["type"] != "message":
                continue
            events = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
            for event in events if isinstance(events, list) else [events]:
                found[event["uuid"]] += 1
        self.pubsub.close()
        self.client.close()
        return found


def _usage(gateway: GatewayProcess) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return dict(httpx.get(gateway.url("/v1/usage"), headers=headers).json())


def _client(process: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=process.url("/v1"), api_key=API_KEY, max_retries=0, timeout=60)


def test_the_readmes_batch_example_runs_end_to_end(gateway: GatewayProcess):
    """The README's batch example, unchanged, as a user would run it from the clone."""
    root = Path(__file__).resolve().parents[2]
    text = (root / "README.md").read_text()
    section = text.split("### Batches, responses, idempotency keys and usage", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    env = {**os.environ, "GATEWAY": gateway.base_url, "VQ_API_KEY": API_KEY}
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("completed ")
    assert lines[1].startswith("page-0 ")
    assert any(line.startswith("page-1 ") for line in lines[2:])  # after page 0's text


def test_a_worker_killed_mid_batch_loses_no_line(
    sdk: openai.OpenAI, module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
):
    """A second worker takes lines, and is SIGKILLed while one of them generates: the
    line's task goes back to the queue (the broker's lease lapses), the module's worker
    runs it, and the batch still has each line once, each queued once."""
    count = IN_FLIGHT + 10
    lines = [chat_line(f"line-{i}", f"Line {i}.", max_tokens=48) for i in range(count)]
    sent = _SentCounter(module_redis.url)
    with (
        WorkerProcess(module_redis.url, tmp_path_factory.mktemp("doomed"), **STACK_ENV) as doomed,
        Client(redis_url=module_redis.url) as client,
    ):
        batch = sdk.batches.create(
            input_file_id=upload(sdk, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        ids = [line_task_id(batch.id, position) for position in range(IN_FLIGHT)]
        deadline = time.monotonic() + 120
        while not any(_generating_on(client, task_id, doomed.name) for task_id in ids):
            # A machine too fast to catch a line mid-generation: kill it all the same.
            if sdk.batches.retrieve(batch.id).request_counts.completed >= IN_FLIGHT // 2:
                break
            assert time.monotonic() < deadline, "the second worker never took a line"
            time.sleep(0.05)
        doomed.signal(signal.SIGKILL)
        doomed.wait()
    done = wait_until_ended(sdk, batch.id)
    outputs = read_lines(sdk, done.output_file_id)
    assert done.status == "completed" and done.request_counts.failed == 0
    assert Counter(line["custom_id"] for line in outputs) == Counter(
        f"line-{i}" for i in range(count)
    )
    queued = sent.counts()
    every = {line_task_id(batch.id, position) for position in range(count)}
    assert {task_id: queued[task_id] for task_id in every} == dict.fromkeys(every, 1)


def _generating_on(client: Client, task_id: str, worker: str) -> bool:
    try:
        status = client.status(task_id)
    except UnknownTaskId:  # not queued yet
        return False
    return status.state == "PROGRESS" and status.worker == worker
