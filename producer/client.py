"""The client a web backend uses: submit jobs, follow their status, text and results, cancel.

`Client` is the blocking twin of `producer.AsyncClient`; both share their set-up and the
rules of a result wait (`producer.client_core`), validation, image checks and staging
(`producer.submission`), message building (`producer.envelope`), state decoding
(`vision_queue.results`) and stream following (`vision_queue.streams`), and differ only in I/O.
Waits are pushed, not polled (`producer.waiting`). Every operation gives up within about
VQ_CONNECT_TIMEOUT_S when Redis is down or refuses the password (`vision_queue.outages`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Literal, TypeVar, cast, overload

import redis

from producer import idempotency
from producer.client_core import POOL_SIZE, ClientCore, ResultWait, finished
from producer.documents import (
    DocumentInput,
    document_fingerprint,
    document_for_key,
    document_outgoing,
    prepare_document,
)
from producer.envelope import Outgoing, batches, cancel_commands, new_id, queue_commands
from producer.submission import ImageInput, SubmitRequest, image_list, task_name
from producer.waiting import BACKUP_POLL_S, LoopThread, Notifier
from vision_queue import tracing
from vision_queue.outages import async_client_options, call, client_options
from vision_queue.presence import live_workers
from vision_queue.protocol import SUBMITTED_KEY, Priority, TaskName
from vision_queue.redis_connect import async_redis_client, redis_client
from vision_queue.results import (
    Result,
    TaskHandle,
    TaskStatus,
    check_task_id,
    is_final,
    meta_from_replies,
    read_commands,
    result_key,
    status_of,
)
from vision_queue.schemas import ChatMessage
from vision_queue.settings import Settings
from vision_queue.streams import (
    FETCH_COUNT,
    StreamEvent,
    StreamFollower,
    raise_if_failed,
    stream_key,
)

__all__ = ["Client", "ImageInput", "SubmitRequest", "TaskHandle", "TaskStatus"]

T = TypeVar("T")


class Client(ClientCore[redis.Redis]):
    """Submit and follow vision jobs. Thread-safe; create one per process and reuse it.

    Settings come from the environment (only what a client reads is validated), or pass a
    `Settings` or field overrides (`Client(queue="gpu-a100")`)."""

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        super().__init__(settings, overrides, _connect)
        self._envelope_lock = threading.Lock()
        self._loop: LoopThread | None = None
        self._notifier: Notifier | None = None
        self._loop_lock = threading.Lock()

    # Submitting ------------------------------------------------------------------------

    def submit(
        self,
        task: TaskName | str,
        images: Iterable[ImageInput] = (),
        prompt: str | None = None,
        *,
        max_new_tokens: int | None = None,
        num_crops: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        messages: Sequence[ChatMessage] | None = None,
        callback_url: str | None = None,
        priority: Priority | str = Priority.NORMAL,
        idempotency_key: str | None = None,
        task_id: str | None = None,
        response_format: Any = None,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        n: int | None = None,
        document: DocumentInput | None = None,
        max_failed_pages: int = 0,
    ) -> TaskHandle:
        """Validate, stage image bytes, enqueue. Bad input raises before anything is queued.

        `document` (a PDF: bytes, a path or a binary file; `ocr`, `describe`, `ask`)
        instead of `images` queues one document job whose pages run as tasks of their own
        (producer/documents.py); it succeeds when at most `max_failed_pages` pages fail.

        `temperature` 0 (the default) decodes greedily; above 0 samples, with `top_p` and,
        for repeatable text, a `seed`. The text ends before the first of up to 4 `stop`
        strings. `ask` takes a conversation (`messages`: system message, earlier turns,
        images numbered in order) instead of a `prompt`; with a `callback_url` the worker
        POSTs the signed result there when the task ends. `priority` (high, normal, low)
        picks the list it waits on: a worker takes a waiting high task first.

        With an `idempotency_key`, the same key with the same request returns the task
        the first call queued (for `producer.idempotency.WINDOW_S`) rather than queuing
        another; with a different request it raises `IdempotencyConflict`. `task_id`
        queues under a UUID of the caller's choosing (never one used before).

        `response_format` (OpenAI's `json_schema` or `json_object` shape, or a pydantic
        model class) constrains decoding: a text that ends by `stop` is JSON that
        validates (vision_queue/structured.py); a schema outside the supported subset
        raises InvalidInput before anything is queued.

        `logprobs` puts each generated token's log probability in the result (its
        `logprobs` list, OpenAI's shape), with `top_logprobs` (0..20) alternatives each.
        `n` (1..8) asks for that many choices from one prefill (the result's `choices`).
        """
        request = SubmitRequest(
            task,
            image_list(images),
            prompt,
            max_new_tokens,
            num_crops,
            temperature,
            top_p,
            seed,
            stop,
            None if messages is None else tuple(messages),
            callback_url,
            priority,
            task_id,
            response_format,
            logprobs,
            top_logprobs,
            n,
        )
        if document is not None and idempotency_key is not None:
            given = document_for_key(document, self.settings, self.local_files)
            mark = document_fingerprint(request, given, max_failed_pages)
            return self._submit_once(
                request,
                idempotency_key,
                mark,
                lambda once: self._submit_document(once, given, max_failed_pages),
            )
        if document is not None:
            return self._submit_document(request, document, max_failed_pages)
        if idempotency_key is not None:
            return self._submit_once(request, idempotency_key)
        return self.submit_many([request])[0]

    def _submit_document(
        self, request: SubmitRequest, document: Any, max_failed: int
    ) -> TaskHandle:
        draft, data, pages = prepare_document(
            request, document, max_failed, self.settings, self._limits, self.local_files
        )
        with tracing.span("vq.submit", self._submit_attributes(1), kind="producer"):
            with self._envelope_lock:
                item = document_outgoing(self._envelope, draft, data, pages, max_failed)
            self._call(self._broker_url, _bound(self._send, [item]))
        return item.handle

    def submit_many(self, requests: Iterable[SubmitRequest]) -> list[TaskHandle]:
        """Queue many tasks in a few round trips (pipelined staging and sends).

        Every request is validated first: one bad request raises and queues none of them.
        """
        drafts = self._drafts(requests)
        # The messages are built inside the span: their headers carry it to the worker.
        with tracing.span("vq.submit", self._submit_attributes(len(drafts)), kind="producer"):
            with self._envelope_lock:
                items = [self._envelope.outgoing(draft) for draft in drafts]
            for batch in batches(items):
                self._call(self._broker_url, _bound(self._send, batch))
        return [item.handle for item in items]

    def _submit_once(
        self,
        request: SubmitRequest,
        key: str,
        mark: str | None = None,
        create: Callable[[SubmitRequest], TaskHandle] | None = None,
    ) -> TaskHandle:
        """`submit` under an idempotency key (producer.idempotency); `create` queues the
        request under the id the key claimed (a document: `_submit_document`)."""
        claim = idempotency.ClientClaim(key, mark or idempotency.request_fingerprint(request))
        while True:
            reply = self._call(self._broker_url, lambda: self._redis.eval(*claim.claim(new_id())))
            if (found := claim.decide(reply)) is not None:
                break
            time.sleep(idempotency.POLL_S)
        if found.kind == "done":
            return TaskHandle(found.id, task_name(request.task))
        try:
            claimed = replace(request, task_id=found.id)
            handle = create(claimed) if create else self.submit_many([claimed])[0]
        except BaseException:
            self._redis.eval(*claim.release(found.id))
            raise
        self._redis.eval(*claim.finish(found.id))
        return handle

    def _send(self, batch: Sequence[Outgoing]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        queue_commands(pipe, batch, self._envelope)
        pipe.execute()

    # Following ------------------------------------------------------------------------

    def status(self, task_id: str) -> TaskStatus:
        return status_of(task_id, self._meta(task_id))

    @overload
    def result(
        self,
        task_id: str,
        wait: Literal[False] = False,
        timeout: float | None = None,
        on_status: Callable[[TaskStatus], None] | None = None,
    ) -> Result | None: ...

    @overload
    def result(
        self,
        task_id: str,
        wait: Literal[True],
        timeout: float | None = None,
        on_status: Callable[[TaskStatus], None] | None = None,
    ) -> Result: ...

    @overload
    def result(
        self,
        task_id: str,
        wait: bool,
        timeout: float | None = None,
        on_status: Callable[[TaskStatus], None] | None = None,
    ) -> Result | None: ...

    def result(
        self,
        task_id: str,
        wait: bool = False,
        timeout: float | None = None,
        on_status: Callable[[TaskStatus], None] | None = None,
    ) -> Result | None:
        """The result object plus `state`; None if not finished and `wait` is false.

        With `wait`, block until the task finishes (woken by Redis the moment its result
        is stored); raise WaitTimeout after `timeout` seconds.
        """
        if not wait:
            return finished(task_id, self._meta(task_id), on_status)
        waiting = ResultWait(task_id, timeout, on_status)
        with self._subscription(result_key(task_id)) as inbox:
            meta = self._meta(task_id)
            while (result := waiting.outcome(meta)) is None:
                pushed = waiting.pushed(_next(inbox, waiting.pause))
                meta = pushed if pushed is not None else self._meta(task_id)
            return result

    def cancel(self, task_id: str) -> bool:
        """Cancel a task: a queued one never runs, a running one stops at its next token
        and keeps the text generated so far (state FAILURE, code `cancelled`).

        False if the task had already finished (nothing to cancel; its result stands).
        """
        if is_final(self._meta(task_id)):  # raises UnknownTaskId
            return False

        def send() -> None:
            pipe = self._redis.pipeline(transaction=False)
            with self._envelope_lock:
                cancel_commands(pipe, task_id, self._envelope)
            pipe.execute()

        self._call(self._broker_url, send)
        return True

    def live_workers(self, queue: str | None = None) -> list[str]:
        """Names of the workers alive on `queue` (default: this client's VQ_QUEUE)."""
        name = queue or self.settings.queue
        return self._call(self._broker_url, lambda: live_workers(self._redis, name))

    def stream(self, task_id: str) -> Iterator[str]:
        """The task's text as it is generated, delta by delta, from the start; ends when
        the task ends, raising TaskFailed (with the failure result) if it failed. With
        `n` above 1, the first choice's (the result's `text`); `stream_events` has all."""
        for event in self.stream_events(task_id):
            if event.kind == "delta":
                if not event.choice:
                    yield event.text
            else:
                raise_if_failed(event)

    def stream_events(self, task_id: str, after: str | None = None) -> Iterator[StreamEvent]:
        """Every stream entry after cursor `after` (None: from the start), ending with the
        "end" event that carries the final result. Reconnect by passing the last cursor.
        A document's deltas carry `page`: its pages generate side by side, so their texts
        interleave here; so do a task's choices (`n` above 1), each delta's `choice` its
        index (0-based), with its own tokens' `logprobs` when they were asked for."""
        check_task_id(task_id)
        follower = StreamFollower(task_id, after)
        key = stream_key(task_id)
        with self._subscription(key) as inbox:
            check_state = True  # at the start, and whenever no notification came
            while True:
                entries = self._entries(key, follower.range_start(), FETCH_COUNT)
                yield from follower.accept(entries)
                if follower.done:
                    return
                if len(entries) == FETCH_COUNT:
                    continue
                if not entries and check_state:
                    ended = self._ended_without_stream(follower, key)
                    if ended is not None:
                        yield ended
                        return
                check_state = _next(inbox, BACKUP_POLL_S) is None
                _drain(inbox)

    def _ended_without_stream(self, follower: StreamFollower, key: str) -> StreamEvent | None:
        meta = self._meta(follower.task_id)  # raises UnknownTaskId
        if not is_final(meta):
            return None
        # The end entry is written with the result: if it is not there either, the task
        # ended without a stream (refused before any worker ran it).
        if self._entries(key, follower.range_start(), 1):
            return None
        return follower.ended_without_stream(meta)

    # Lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._loop_lock:
            if self._loop is not None and self._notifier is not None:
                self._loop.close(self._notifier.aclose())
            self._loop, self._notifier = None, None
        if self._results is not self._redis:
            self._results.close()
        self._redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Internals --------------------------------------------------------------------------

    def _meta(self, task_id: str) -> dict[str, Any]:
        check_task_id(task_id)
        if self._results is self._redis:

            def read() -> list[Any]:
                pipe = self._results.pipeline(transaction=False)
                read_commands(pipe, task_id)
                return list(pipe.execute())

            return meta_from_replies(task_id, self._call(self._backend_url, read))
        raw = self._call(self._backend_url, lambda: self._results.get(result_key(task_id)))
        known = raw is not None or self._call(
            self._broker_url, lambda: self._redis.exists(SUBMITTED_KEY.format(task_id=task_id))
        )
        return meta_from_replies(task_id, [raw, known])

    def _entries(self, key: str, start: str, count: int) -> list[tuple[Any, dict[Any, Any]]]:
        def fetch() -> list[tuple[Any, dict[Any, Any]]]:
            return cast(
                "list[tuple[Any, dict[Any, Any]]]",
                self._results.xrange(key, start, "+", count) or [],
            )

        return self._call(self._backend_url, fetch)

    def _call(self, url: str, operation: Callable[[], T]) -> T:
        return call(self.settings, url, operation)

    def _subscription(self, channel: str) -> _Subscription:
        loop, notifier = self._notification_loop()
        inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        budget = self.settings.connect_timeout_s
        self._call(
            self._backend_url,
            lambda: loop.run(notifier.subscribe(channel, inbox, budget), budget + 1),
        )
        return _Subscription(loop, notifier, channel, inbox)

    def _notification_loop(self) -> tuple[LoopThread, Notifier]:
        with self._loop_lock:
            if self._loop is None or self._notifier is None:
                settings, url = self.settings, self._backend_url

                def connect() -> redis.asyncio.Redis:
                    return async_redis_client(
                        settings, url, health_check_interval=0, **async_client_options(settings)
                    )

                self._loop = LoopThread()
                self._notifier = Notifier(connect)
            return self._loop, self._notifier


class _Subscription:
    """A channel subscribed on the client's notifier while a `with` block runs."""

    def __init__(
        self,
        loop: LoopThread,
        notifier: Notifier,
        channel: str,
        inbox: queue.SimpleQueue[bytes | None],
    ) -> None:
        self.loop, self.notifier, self.channel, self.inbox = loop, notifier, channel, inbox

    def __enter__(self) -> queue.SimpleQueue[bytes | None]:
        return self.inbox

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon(self.notifier.unsubscribe, self.channel, self.inbox)


def _next(inbox: queue.SimpleQueue[bytes | None], timeout: float) -> bytes | None:
    """The next pushed message, or None after `timeout` (or when the connection was replaced)."""
    try:
        return inbox.get(timeout=max(0.0, timeout))
    except queue.Empty:
        return None


def _bound(
    function: Callable[[Sequence[Outgoing]], None], batch: Sequence[Outgoing]
) -> Callable[[], None]:
    return lambda: function(batch)


def _drain(inbox: queue.SimpleQueue[bytes | None]) -> None:
    """Several entries may have been announced while fetching: one fetch reads them all."""
    while True:
        try:
            inbox.get_nowait()
        except queue.Empty:
            return


def _connect(settings: Settings, url: str) -> redis.Redis:
    return redis_client(settings, url, max_connections=POOL_SIZE, **client_options(settings))
