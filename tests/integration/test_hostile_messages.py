"""Messages that did not come from our client: refused at the worker's door, never executed,
answered with a coded failure where they carry an id, and the worker lives on.

Every message is written to the queue the way kombu stores it (tests/support/messages.py),
so nothing here depends on a Celery client agreeing to produce it.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import messages
from support.messages import envelope, headers, push, valid_body, wait_for_dead_letters
from support.workers import WorkerProcess

from producer import Client
from vision_queue.protocol import DEAD_LETTER_KEY
from worker.broker.dead_letters import read_dead_letters

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def queue(client: Client):
    """The shared worker's Redis, with an empty dead-letter list."""
    client._redis.delete(DEAD_LETTER_KEY)
    return client._redis


def refused(queue, task_id: str | None = None) -> dict[str, Any]:
    """Wait for the one dead-letter entry this test caused and return it."""
    (entry,) = wait_for_dead_letters(queue, 1)
    assert entry["task_id"] == task_id
    return entry


def assert_never_ran(worker: WorkerProcess, task_id: str) -> None:
    assert f"task id={task_id}" not in worker.log()  # the per-task line of every run


def assert_still_serving(client: Client, worker: WorkerProcess, images: Path) -> None:
    handle = client.submit("describe", [(images / "small_400x300.jpg").read_bytes()])
    result = client.result(handle.id, wait=True, timeout=120)
    assert result is not None and result["state"] == "SUCCESS"
    assert worker.process is not None and worker.process.poll() is None


def coded_failure(client: Client, task_id: str) -> dict[str, Any]:
    result = client.result(task_id, wait=True, timeout=60)
    assert result is not None and result["state"] == "FAILURE", result
    assert result["error"]["code"] == "invalid_input"
    assert result["error"]["field"] == "message"
    return result


def _builtin(name: str, body: list[Any]) -> tuple[dict[str, Any], str]:
    task_id = str(uuid.uuid4())
    return envelope(body, headers(task_id, name)), task_id


def _case(mutate_headers=None, body: Any = None, **kwargs: Any) -> tuple[dict[str, Any], str]:
    task_id = str(uuid.uuid4())
    message_headers = headers(task_id)
    if mutate_headers:
        mutate_headers(message_headers)
    return envelope(valid_body() if body is None else body, message_headers, **kwargs), task_id


CASES = {
    # case -> (raw item, task id the failure is stored under, refusal code)
    "body is a JSON object": (*_case(body={"args": [], "kwargs": {}}), "body"),
    "body is a JSON string": (*_case(body="just a string"), "body"),
    "binary content type": (*_case(content_type="application/x-binary"), "content_type"),
    "empty content type": (*_case(content_type=""), "content_type"),
    "timelimit is not numbers": (*_case(lambda h: h.update(timelimit=["a", "b"])), "headers"),
    "args are not a list": (*_case(body=["not-a-list", {}, messages.NO_EMBED]), "body"),
    "junk chain in the embed": (
        *_case(body=[[messages.request()], {}, {**messages.NO_EMBED, "chain": [{"x": 1}]}]),
        "body",
    ),
    "celery.accumulate": (
        *_builtin("celery.accumulate", [[1, 2], {}, messages.NO_EMBED]),
        "builtin_task",
    ),
    "celery.backend_cleanup": (
        *_builtin("celery.backend_cleanup", [[], {}, messages.NO_EMBED]),
        "builtin_task",
    ),
    "celery.starmap": (
        *_builtin(
            "celery.starmap",
            [
                [{"task": "vision_queue.ask", "args": [], "kwargs": {}}, [[messages.request()]]],
                {},
                messages.NO_EMBED,
            ],
        ),
        "builtin_task",
    ),
    "unregistered task": (
        *_builtin("os.system", [["rm -rf /"], {}, messages.NO_EMBED]),
        "task_name",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_message_is_refused_answered_and_never_run(
    case: str, client: Client, queue, shared_worker: WorkerProcess, images: Path
):
    item, task_id, code = CASES[case]
    push(queue, item)
    entry = refused(queue, task_id)
    assert entry["code"] == code
    assert coded_failure(client, task_id)["id"] == task_id
    assert_never_ran(shared_worker, task_id)
    assert_still_serving(client, shared_worker, images)


def test_a_message_without_an_id_is_dropped_and_the_consumer_keeps_serving(
    client: Client, queue, shared_worker: WorkerProcess, images: Path
):
    message_headers = headers(str(uuid.uuid4()))
    del message_headers["id"]
    push(queue, envelope(valid_body(), message_headers))
    entry = refused(queue, None)
    assert entry["code"] == "headers" and "id" in entry["reason"]
    assert_still_serving(client, shared_worker, images)
    assert "Frequent restarts" not in shared_worker.log()


def test_a_queue_item_that_is_not_kombus_envelope_is_refused(
    client: Client, queue, shared_worker: WorkerProcess, images: Path
):
    # Not JSON at all: kombu's transport used to raise in the event loop ("Unrecoverable").
    push(queue, b"\x00\xffnot json")
    entry = refused(queue, None)
    assert entry["code"] == "envelope"
    assert base64.b64decode(entry["message"]["body_base64"]) == b"\x00\xffnot json"
    assert_still_serving(client, shared_worker, images)


def test_a_compression_header_is_refused_without_inflating_the_body(
    client: Client, queue, shared_worker: WorkerProcess, images: Path
):
    # 256 MiB of zeros in about 250 KB: kombu inflated this whatever accept_content said.
    bomb = zlib.compress(b"\0" * (256 << 20), 9)
    task_id = str(uuid.uuid4())
    message_headers = {**headers(task_id), "compression": "application/x-gzip"}
    before = _peak_rss_kb(shared_worker)
    push(queue, envelope(bomb, message_headers))
    entry = refused(queue, task_id)
    assert entry["code"] == "envelope" and "compressed" in entry["reason"]
    assert _peak_rss_kb(shared_worker) - before < 64 * 1024  # never held the 256 MiB
    coded_failure(client, task_id)
    assert_still_serving(client, shared_worker, images)


def test_a_pickle_message_is_refused_unread(
    client: Client, queue, shared_worker: WorkerProcess, images: Path, tmp_path: Path
):
    marker = tmp_path / "pwned"
    task_id = str(uuid.uuid4())
    body = pickle.dumps(((_Exploit(marker),), {}, messages.NO_EMBED))
    push(queue, envelope(body, headers(task_id), content_type="application/x-python-serialize"))
    assert refused(queue, task_id)["code"] == "content_type"
    assert_still_serving(client, shared_worker, images)
    assert not marker.exists()


def test_a_message_reusing_a_finished_tasks_id_leaves_its_result_alone(
    client: Client, queue, shared_worker: WorkerProcess, images: Path
):
    handle = client.submit("describe", [(images / "small_400x300.jpg").read_bytes()])
    first = client.result(handle.id, wait=True, timeout=120)
    assert first is not None and first["state"] == "SUCCESS"
    push(queue, envelope({"not": "protocol 2"}, headers(handle.id, "vision_queue.describe")))
    refused(queue, handle.id)
    assert client.result(handle.id) == first


def test_operators_can_list_dead_letters_without_their_bytes(
    client: Client, queue, shared_worker: WorkerProcess
):
    task_id = str(uuid.uuid4())
    secret = "https://bucket.example/cat.jpg?X-Signature=SECRET"
    push(queue, envelope([[{"images": [secret]}], {"kw": 1}, messages.NO_EMBED], headers(task_id)))
    refused(queue, task_id)
    (entry,) = read_dead_letters(queue)
    assert entry["task_id"] == task_id and entry["code"] == "body"
    assert entry["worker"] == shared_worker.name and entry["queue"] == "gpu"
    assert "SECRET" not in json.dumps(entry)  # metadata only: the message stays in Redis
    done = _run_worker_cli(shared_worker, ["dead-letters"])
    assert done.returncode == 0, done.stderr
    assert task_id in done.stdout and "message has keyword arguments" in done.stdout
    assert "SECRET" not in done.stdout


def _run_worker_cli(worker: WorkerProcess, args: list[str]):
    from support.workers import run_cli

    return run_cli("worker", args, worker.env, timeout_s=60)


def _peak_rss_kb(worker: WorkerProcess) -> int:
    assert worker.process is not None
    status = Path(f"/proc/{worker.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1])


class _Exploit:
    """Unpickling this would create a file: proof that a pickle payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# Property: whatever envelope arrives, the worker refuses it, stays up and keeps serving. ---

FUZZ_EXAMPLES = int(os.environ.get("HOSTILE_FUZZ_EXAMPLES", "12"))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
NOT_A_STRING = JSON.filter(lambda value: not isinstance(value, str))
NOT_TIME_LIMITS = JSON.filter(
    lambda value: (
        not (
            isinstance(value, list)
            and len(value) == 2
            and all(
                v is None or (type(v) in (int, float) and v == v and abs(v) != float("inf"))
                for v in value
            )
        )
    )
)
KNOWN_HEADERS = {*headers("x"), "redelivered"}


@st.composite
def hostile_item(draw: st.DrawFn) -> tuple[dict[str, Any] | bytes, str | None]:
    """One queue item that breaks at least one rule, and the id a failure belongs to."""
    task_id = str(uuid.uuid4())
    message_headers = headers(task_id)
    body: Any = valid_body()
    content_type, content_encoding = "application/json", "utf-8"
    kind = draw(
        st.sampled_from(
            [
                "raw bytes",
                "raw json",
                "content type",
                "encoding",
                "compression",
                "no id",
                "bad id",
                "task name",
                "unknown header",
                "timelimit",
                "retries",
                "eta",
                "body json",
                "body bytes",
                "args",
                "kwargs",
                "embed",
            ]
        )
    )
    readable_id: str | None = task_id
    if kind == "raw bytes":
        return draw(st.binary(max_size=200)), None
    if kind == "raw json":
        return json.dumps(draw(JSON.filter(lambda v: not isinstance(v, dict)))).encode(), None
    if kind == "content type":
        content_type = draw(st.text(max_size=30).filter(lambda t: t != "application/json"))
    elif kind == "encoding":
        content_encoding = draw(st.text(max_size=12).filter(lambda t: t != "utf-8"))
    elif kind == "compression":
        message_headers["compression"] = draw(st.sampled_from(["application/x-gzip", "zlib", "x"]))
    elif kind == "no id":
        del message_headers["id"]
        readable_id = None
    elif kind == "bad id":
        message_headers["id"] = draw(NOT_A_STRING | st.text(max_size=40))
        readable_id = None
    elif kind == "task name":
        message_headers["task"] = draw(
            st.text(max_size=40).filter(lambda t: not t.startswith("vision_queue.")) | NOT_A_STRING
        )
    elif kind == "unknown header":
        name = draw(st.text(min_size=1, max_size=12).filter(lambda n: n not in KNOWN_HEADERS))
        message_headers[name] = draw(JSON)
    elif kind == "timelimit":
        message_headers["timelimit"] = draw(NOT_TIME_LIMITS.filter(lambda v: v is not None))
    elif kind == "retries":
        message_headers["retries"] = draw(
            NOT_A_STRING.filter(lambda v: not (type(v) is int and 0 <= v <= 10_000))
        )
    elif kind == "eta":
        message_headers["eta"] = draw(NOT_A_STRING.filter(lambda v: v is not None))
    elif kind == "body json":
        body = draw(JSON.filter(lambda v: not (isinstance(v, list) and len(v) == 3)))
    elif kind == "body bytes":
        body = b"\xff" + draw(st.binary(max_size=100))  # never valid UTF-8
    elif kind == "args":
        body = [
            draw(
                JSON.filter(
                    lambda v: not (isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict))
                )
            ),
            {},
            messages.NO_EMBED,
        ]
    elif kind == "kwargs":
        body = [
            [messages.request()],
            draw(st.dictionaries(st.text(max_size=8), JSON, min_size=1, max_size=3)),
            messages.NO_EMBED,
        ]
    else:  # embed
        key = draw(st.sampled_from(["chain", "callbacks", "errbacks", "chord"]))
        junk = draw(JSON.filter(lambda v: v is not None))
        body = [[messages.request()], {}, {**messages.NO_EMBED, key: junk}]
    item = envelope(
        body, message_headers, content_type=content_type, content_encoding=content_encoding
    )
    return item, readable_id


@settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,  # the same envelopes on every CI run
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(hostile_item(), min_size=1, max_size=6))
def test_fuzzed_envelopes_are_all_refused_and_the_worker_keeps_serving(
    batch: list[tuple[dict[str, Any] | bytes, str | None]],
    client: Client,
    shared_worker: WorkerProcess,
    images: Path,
):
    queue = client._redis
    queue.delete(DEAD_LETTER_KEY)
    for item, _ in batch:
        push(queue, item)
    entries = wait_for_dead_letters(queue, len(batch))
    assert len(entries) == len(batch)  # each one refused, once
    for _, task_id in batch:
        if task_id is not None:
            assert_never_ran(shared_worker, task_id)
    assert_still_serving(client, shared_worker, images)
    # Nothing left behind: the queue is empty and, once the last task's late ack lands,
    # nothing is held unacknowledged (a refused message is acknowledged at once).
    assert queue.llen("gpu") == 0
    deadline = time.monotonic() + 30
    while queue.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not queue.hlen("unacked")
