"""The messages both clients write are the ones Celery writes, and a batch is pipelined.

Against a real redis-server: Celery's own `send_task` and `control.revoke` write into it
side by side with ours, and the two are compared field by field.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from producer import AsyncClient, Client, Priority, SubmitRequest
from producer.envelope import new_delivery_tag, new_id
from vision_queue.celery_config import make_celery_app
from vision_queue.errors import InvalidInput
from vision_queue.schemas import ImageRef, ImageSource
from vision_queue.settings import Settings


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings.from_env({}, redis_url=redis_url, queue="nobody")


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


def queued(redis_url: str, queue: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in redis.Redis.from_url(redis_url).lrange(queue, 0, -1)]


def body(message: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(message["body"]))


class Published:
    """Everything PUBLISHed on the server while the block runs (a real subscriber)."""

    def __init__(self, redis_url: str) -> None:
        self.pubsub = redis.Redis.from_url(redis_url).pubsub()
        self.pubsub.psubscribe("*")
        self.pubsub.get_message(timeout=5)  # the psubscribe confirmation
        self.messages: list[tuple[str, dict[str, Any]]] = []

    def collect(self, count: int) -> list[tuple[str, dict[str, Any]]]:
        deadline = time.monotonic() + 10
        while len(self.messages) < count and time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.5)
            if message and message["type"] == "pmessage":
                self.messages.append((message["channel"].decode(), json.loads(message["data"])))
        return self.messages


def test_a_task_message_is_the_one_celery_writes(redis_url: str, settings: Settings, client):
    # Given Celery's own message for the same request, on another queue
    app = make_celery_app(settings)
    handle = client.submit("ask", [], "Où est le chat ? 猫", max_new_tokens=5, stop=["\n"])
    [ours] = queued(redis_url, "nobody")
    request = body(ours)[0][0]
    app.send_task(
        "vision_queue.ask",
        args=(request,),
        task_id=handle.id,
        queue="celery-made",
        argsrepr=ours["headers"]["argsrepr"],
        kwargsrepr="{}",
    )
    [celerys] = queued(redis_url, "celery-made")
    # Then the envelope is the same: JSON, utf-8, no compression, the same headers
    assert ours["content-type"] == celerys["content-type"] == "application/json"
    assert ours["content-encoding"] == celerys["content-encoding"] == "utf-8"
    assert "compression" not in ours["headers"]
    assert set(ours) == set(celerys)
    assert set(ours["headers"]) == set(celerys["headers"])
    for name, value in celerys["headers"].items():
        if name != "origin":
            assert ours["headers"][name] == value, name
    assert ours["headers"]["origin"].startswith("gen")
    assert set(ours["properties"]) == set(celerys["properties"])
    for name in ("correlation_id", "delivery_mode", "priority", "body_encoding", "argsrepr"):
        assert ours["properties"][name] == celerys["properties"][name], name
    assert ours["properties"]["delivery_info"] == {"exchange": "", "routing_key": "nobody"}
    # and the body is the same [args, kwargs, embed] (compact UTF-8 JSON, the text as is)
    assert body(ours) == body(celerys)
    assert "Où est le chat ? 猫".encode() in base64.b64decode(ours["body"])


def test_a_worker_side_path_that_is_not_utf8_is_queued_as_it_is(redis_url: str, client):
    # A file name with undecodable bytes, as os.listdir gives it (surrogateescape).
    path = os.fsdecode(b"/data/caf\xe9.jpg")
    client.submit("describe", [ImageRef(ImageSource.PATH, path)])
    [message] = queued(redis_url, "nobody")
    assert body(message)[0][0]["images"] == [{"source": "path", "ref": path}]


def test_the_task_sent_event_and_the_revoke_broadcast_are_celerys(
    redis_url: str, settings: Settings, client
):
    app = make_celery_app(settings)
    published = Published(redis_url)
    handle = client.submit("ask", [], "Hello")
    app.send_task("vision_queue.ask", args=({},), task_id=handle.id, queue="nobody")
    client.cancel(handle.id)
    app.control.revoke(handle.id)
    messages = published.collect(4)
    channels = [channel for channel, _ in messages]
    assert channels == ["/0.celeryev/task.sent"] * 2 + ["/0.celery.pidbox"] * 2
    (_, our_event), (_, celery_event), (_, our_revoke), (_, celery_revoke) = messages
    assert set(body(our_event)) == set(body(celery_event))
    assert body(our_event)["type"] == "task-sent"
    assert body(our_event)["uuid"] == handle.id
    assert our_event["properties"]["delivery_info"] == celery_event["properties"]["delivery_info"]
    assert body(our_revoke) == body(celery_revoke)
    assert set(our_revoke["headers"]) == set(celery_revoke["headers"]) == {"clock", "expires"}


def test_sampling_without_a_seed_gets_one_so_a_rerun_repeats_the_text(redis_url, client):
    client.submit("ask", [], "Tell me", temperature=0.7)
    client.submit("ask", [], "Tell me")
    sampled, greedy = (body(m)[0][0]["options"] for m in reversed(queued(redis_url, "nobody")))
    assert isinstance(sampled["seed"], int)
    assert greedy["seed"] is None


class CountingPool:
    """Counts connections taken from a client's pool: one per round trip."""

    def __init__(self, client: Client) -> None:
        self.pool = client._redis.connection_pool
        self.taken = 0
        self._get = self.pool.get_connection
        self._lock = threading.Lock()

    def __enter__(self) -> CountingPool:
        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.taken += 1
            return self._get(*args, **kwargs)

        self.pool.get_connection = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.get_connection = self._get  # type: ignore[method-assign]


def test_submit_many_queues_a_thousand_tasks_in_two_round_trips(redis_url: str, client, images):
    image = (images / "small_400x300.jpg").read_bytes()
    requests = [
        SubmitRequest("describe", [image]) if i % 2 else SubmitRequest("ask", [], f"Say {i}.")
        for i in range(1000)
    ]
    with CountingPool(client) as pool:
        handles = client.submit_many(requests)
    assert pool.taken == 2  # 500 tasks per pipeline
    messages = queued(redis_url, "nobody")
    assert len(messages) == 1000
    # Queued in order (LPUSH: the first submitted is at the right end, taken first).
    assert [m["headers"]["id"] for m in reversed(messages)] == [h.id for h in handles]
    # The shared image is staged once.
    assert len(redis.Redis.from_url(redis_url).keys("vq:img:*")) == 1
    with CountingPool(client) as pool:
        for request in requests[:10]:
            client.submit_many([request])
    assert pool.taken == 10


def test_a_batch_sends_every_event_in_one_group_as_celerys_dispatcher_does(
    redis_url: str, settings: Settings, client
):
    published = Published(redis_url)
    handles = client.submit_many([SubmitRequest("ask", [], f"Say {i}.") for i in range(3)])
    [(_, message)] = published.collect(1)
    events = body(message)
    assert [event["uuid"] for event in events] == [h.id for h in handles]
    clocks = [event["clock"] for event in events]
    assert clocks == sorted(set(clocks))  # one Lamport clock, ticking per event
    # (Flower reads the group as one event per task: tests/integration/test_flower.py)
    # and the markers say each one was submitted, kept as long as its result
    admin = redis.Redis.from_url(redis_url)
    for handle in handles:
        key = f"vq:submitted:{handle.id}"
        assert admin.get(key) == b"ask"
        assert 0 < admin.ttl(key) <= settings.result_expires_s


def test_ids_are_random_version_4_uuids():
    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    for text in list(ids)[:100]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)


def test_delivery_tags_are_unique_and_a_forked_child_draws_its_own():
    # kombu keys unacked messages, and workers their leases, by the tag.
    tags = {new_delivery_tag() for _ in range(10_000)}
    assert len(tags) == 10_000
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: one tag back to the parent, then out at once
        os.write(write_end, new_delivery_tag().encode())
        os._exit(0)
    os.close(write_end)
    childs = os.read(read_end, 100).decode()
    os.waitpid(child, 0)
    os.close(read_end)
    ours = new_delivery_tag()
    assert childs[:24] != ours[:24]  # another random prefix, so no counter value repeats
    assert childs not in tags


def test_one_bad_request_in_a_batch_queues_none(redis_url: str, client):
    requests = [SubmitRequest("ask", [], "fine"), SubmitRequest("ask", [], "")]
    with pytest.raises(InvalidInput) as error:
        client.submit_many(requests)
    assert error.value.field == "prompt"
    assert queued(redis_url, "nobody") == []


# --- Common mistakes (issue 13, item 4): a clear InvalidInput naming the field -----------


@pytest.fixture
def photo(images) -> bytes:
    data: bytes = (images / "small_400x300.jpg").read_bytes()
    return data


def refused(client: Client, redis_url: str, *args: Any, **kwargs: Any) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        client.submit(*args, **kwargs)
    assert queued(redis_url, "nobody") == []  # nothing was queued
    assert len(caught.value.message) <= 300, "a message echoes only a short prefix"
    return caught.value


def test_one_image_passed_instead_of_a_list_says_how_to_pass_it(
    redis_url: str, client, images, photo: bytes
):
    for single in (photo, str(images / "small_400x300.jpg"), images / "small_400x300.jpg"):
        error = refused(client, redis_url, "describe", single)
        assert error.field == "images"
        assert "pass [image] for a single image" in error.message
    error = refused(client, redis_url, "describe", 42)
    assert error.field == "images" and "must be a list of images" in error.message


def test_pil_images_and_binary_files_are_accepted(redis_url: str, client, images):
    from PIL import Image

    with (
        Image.open(images / "small_400x300.jpg") as picture,
        (images / "small_400x300.jpg").open("rb") as file,
    ):
        handles = [client.submit("describe", [picture]), client.submit("describe", [file])]
    messages = queued(redis_url, "nobody")
    assert len(messages) == len(handles) == 2
    staged = [body(m)[0][0]["images"][0] for m in messages]
    assert all(ref["source"] == "staged" for ref in staged)


def test_a_text_mode_file_is_refused_with_the_fix(redis_url: str, client, images):
    with (images / "small_400x300.jpg").open("r", errors="replace") as text_file:
        error = refused(client, redis_url, "describe", [text_file])
    assert error.field == "images[0]" and "open(path, 'rb')" in error.message


def test_base64_text_is_refused_with_a_short_message(redis_url: str, client, photo: bytes):
    # A raw base64 string (not a data: URI) once produced a 48,257-character message
    text = base64.b64encode(photo * 3).decode()
    error = refused(client, redis_url, "describe", [text])
    assert error.field == "images[0]"
    assert "base64.b64decode" in error.message and "data:" in error.message
    assert text[:100] not in str(error)


@pytest.mark.parametrize("value", [True, 5.0, "5"], ids=["bool", "float", "str"])
def test_max_new_tokens_must_be_an_integer(redis_url: str, client, photo: bytes, value):
    error = refused(client, redis_url, "describe", [photo], max_new_tokens=value)
    assert error.field == "max_new_tokens" and "must be an integer" in error.message


@pytest.mark.parametrize("value", [5, b"hello"], ids=["int", "bytes"])
def test_a_prompt_must_be_a_string(redis_url: str, client, value):
    error = refused(client, redis_url, "ask", [], prompt=value)
    assert error.field == "prompt" and "prompt must be a string" in error.message


# --- Priorities ----------------------------------------------------------------------------

LISTS = {"high": "nobody.high", "normal": "nobody", "low": "nobody.low"}


def test_each_priority_is_pushed_onto_its_own_list(redis_url: str, client):
    # Given one task of each priority (and one left at the default)
    handles = {
        priority: client.submit("ask", [], f"{priority} task", priority=priority)
        for priority in ("low", "normal", "high")
    }
    default = client.submit("ask", [], "default task")
    # Then each list holds its own, and the message's routing key names that list (a
    # message handed back by a worker returns there: kombu restores by routing key)
    for priority, queue in LISTS.items():
        ids = [m["headers"]["id"] for m in queued(redis_url, queue)]
        expected = (
            [default.id, handles[priority].id] if priority == "normal" else [handles[priority].id]
        )
        assert ids == expected, priority
        for message in queued(redis_url, queue):
            assert message["properties"]["delivery_info"]["routing_key"] == queue
            assert message["properties"]["priority"] == 0  # kombu's own priorities unused


def test_submit_many_routes_each_request_by_its_priority(redis_url: str, client):
    published = Published(redis_url)
    requests = [
        SubmitRequest("ask", [], f"Say {i}.", priority=p)
        for i, p in enumerate(["low", "high", None, Priority.LOW])
    ]
    handles = client.submit_many(requests)
    assert [m["headers"]["id"] for m in reversed(queued(redis_url, "nobody.low"))] == [
        handles[0].id,
        handles[3].id,
    ]
    assert [m["headers"]["id"] for m in queued(redis_url, "nobody.high")] == [handles[1].id]
    assert [m["headers"]["id"] for m in queued(redis_url, "nobody")] == [handles[2].id]
    # and the task-sent events (Flower's), one publish for the batch, name the list too
    [(channel, message)] = published.collect(1)
    assert channel == "/0.celeryev/task.sent"
    events = {event["uuid"]: event["queue"] for event in body(message)}
    assert events == {
        handles[0].id: "nobody.low",
        handles[1].id: "nobody.high",
        handles[2].id: "nobody",
        handles[3].id: "nobody.low",
    }


@pytest.mark.parametrize("priority", ["urgent", "HIGH", "", 1, ["high"]])
def test_an_unknown_priority_is_refused_naming_the_field_and_nothing_is_queued(
    redis_url: str, client, priority: Any
):
    with pytest.raises(InvalidInput) as error:
        client.submit("ask", [], "Hello", priority=priority)
    assert error.value.field == "priority"
    assert "high, normal, low" in error.value.message
    admin = redis.Redis.from_url(redis_url)
    assert [admin.llen(queue) for queue in LISTS.values()] == [0, 0, 0]
    assert admin.keys("vq:submitted:*") == []


def test_celery_routes_to_the_same_lists(redis_url: str, settings: Settings, client):
    # Celery's own send_task (and a task's retry, which keeps its routing key) finds the
    # priority lists declared: a retried high task stays high.
    app = make_celery_app(settings)
    ours = client.submit("ask", [], "Hello", priority="high")
    app.send_task("vision_queue.ask", args=({},), queue="nobody.high")
    celerys, mine = queued(redis_url, "nobody.high")
    assert mine["headers"]["id"] == ours.id
    assert celerys["properties"]["delivery_info"] == mine["properties"]["delivery_info"]


def test_the_async_client_routes_by_priority_too(redis_url: str, settings: Settings):
    async def submit() -> str:
        async with AsyncClient(settings) as client:
            return (await client.submit("ask", [], "Hello", priority="low")).id

    task_id = asyncio.run(submit())
    assert [m["headers"]["id"] for m in queued(redis_url, "nobody.low")] == [task_id]
