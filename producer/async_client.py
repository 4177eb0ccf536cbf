"""`AsyncClient`: the asyncio twin of `producer.Client`, on `redis.asyncio`.

    async with AsyncClient() as client:
        handle = await client.submit("describe", [image_bytes])
        async for text in client.stream(handle.id):
            print(text, end="", flush=True)
        result = await client.result(handle.id, wait=True, timeout=120)

Same operations, arguments, results and errors as `Client`; set-up and result waits
(`producer.client_core`), validation, image checks, staging and message building
(`producer.submission`, `producer.envelope`) are the same code, so only the I/O differs.
Reading and checking image files runs in a worker thread, so a large image never stalls
the event loop; all waits share one pub/sub connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Literal, TypeVar, cast, overload

import redis.asyncio

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
from producer.waiting import BACKUP_POLL_S, AsyncInbox, Notifier
from vision_queue import tracing
from vision_queue.outages import acall, async_client_options
from vision_queue.presence import live_workers_async
from vision_queue.protocol import SUBMITTED_KEY, Priority, TaskName
from vision_queue.redis_connect import async_redis_client
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

T = TypeVar("T")

# Reads per pipeline when many are coalesced.
_READ_SLICE = 64


class AsyncClient(ClientCore[redis.asyncio.Redis]):
    """Submit and follow vision jobs from asyncio code. One per event loop; reuse it.

    Settings as for `Client`: the environment (only what a client reads is validated),
    a `Settings`, or field overrides."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        pool_size: int = POOL_SIZE,
        local_files: bool = True,
        **overrides: Any,
    ) -> None:
        """`pool_size`: connections per Redis (more concurrent calls wait for one);
        `local_files=False` for a server: paths are refused, never opened."""
        super().__init__(settings, overrides, lambda s, url: _connect(s, url, pool_size))
        self.local_files = local_files
        self._notifier = Notifier(self._notification_connection)
        self._reads = _Coalescer(self._results)
        self._loop: asyncio.AbstractEventLoop | None = None

    # Submitting ------------------------------------------------------------------------

    async def submit(
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
        """Validate, stage image bytes, enqueue (see `Client.submit`, `idempotency_key` and
        `document` too)."""
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
            given = await asyncio.to_thread(
                document_for_key, document, self.settings, self.local_files
            )
            mark = document_fingerprint(request, given, max_failed_pages)

            async def create(once: SubmitRequest) -> TaskHandle:
                return await self._submit_document(once, given, max_failed_pages)

            return await self._submit_once(request, idempotency_key, mark, create)
        if document is not None:
            return await self._submit_document(request, document, max_failed_pages)
        if idempotency_key is not None:
            return await self._submit_once(request, idempotency_key)
        return (await self.submit_many([request]))[0]

    async def _submit_document(
        self, request: SubmitRequest, document: Any, max_failed: int
    ) -> TaskHandle:
        self._check_loop()

        def build() -> Outgoing:
            # Reading and opening the PDF is disk and CPU work: off the loop.
            draft, data, pages = prepare_document(
                request, document, max_failed, self.settings, self._limits, self.local_files
            )
            return document_outgoing(self._envelope, draft, data, pages, max_failed)

        with tracing.span("vq.submit", self._submit_attributes(1), kind="producer"):
            item = await asyncio.to_thread(build)
            await self._call(self._broker_url, _bound(self._send, [item]))
        return item.handle

    async def submit_many(self, requests: Iterable[SubmitRequest]) -> list[TaskHandle]:
        """Queue many tasks in a few round trips; one bad request queues none of them."""
        self._check_loop()
        pending = list(requests)
        # The messages are built inside the span (a thread started here inherits it):
        # their headers carry it to the worker.
        with tracing.span("vq.submit", self._submit_attributes(len(pending)), kind="producer"):
            if any(request.images for request in pending) or len(pending) > 50:
                # File reads, image header checks and building many messages are CPU and
                # disk work: done in a thread, the loop keeps serving other coroutines.
                items = await asyncio.to_thread(self._build, pending)
            else:
                items = self._build(pending)
            for batch in batches(items):
                await self._call(self._broker_url, _bound(self._send, batch))
        return [item.handle for item in items]

    async def _submit_once(
        self,
        request: SubmitRequest,
        key: str,
        mark: str | None = None,
        create: Callable[[SubmitRequest], Awaitable[TaskHandle]] | None = None,
    ) -> TaskHandle:
        """`submit` under an idempotency key (producer.idempotency); `create` queues the
        request under the id the key claimed (a document: `_submit_document`)."""
        claim = idempotency.ClientClaim(key, mark or idempotency.request_fingerprint(request))
        while True:
            reply = await self._call(
                self._broker_url, lambda: self._redis.eval(*claim.claim(new_id()))
            )
            if (found := claim.decide(reply)) is not None:
                break
            await asyncio.sleep(idempotency.POLL_S)
        if found.kind == "done":
            return TaskHandle(found.id, task_name(request.task))
        try:
            claimed = replace(request, task_id=found.id)
            handle = await create(claimed) if create else (await self.submit_many([claimed]))[0]
        except BaseException:
            await self._redis.eval(*claim.release(found.id))
            raise
        await self._redis.eval(*claim.finish(found.id))
        return handle

    def _build(self, requests: list[SubmitRequest]) -> list[Outgoing]:
        return [self._envelope.outgoing(draft) for draft in self._drafts(requests)]

    async def _send(self, batch: Sequence[Outgoing]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        queue_commands(pipe, batch, self._envelope)
        await pipe.execute()

    # Following ------------------------------------------------------------------------

    async def status(self, task_id: str) -> TaskStatus:
        return status_of(task_id, await self._meta(task_id))

    @overload
    async def result(
        self,
        task_id: str,
        wait: Literal[False] = False,
        timeout: float | None = None,
        on_status: Callable[[TaskStatus], None] | None = None,
    ) -> Result | None: ...

    @overload
    async def result(
        self,
        task_id: str,
        wait: Literal[True],
        timeout: float | None = None,
        on_status: Callable[[TaskStatus], None] | None = None,
    ) -> Result: ...

    @overload
    async def result(
        self,
        task_id: str,
        wait: bool,
        timeout: float | None = None,
        on_status: Callable[[TaskStatus], None] | None = None,
    ) -> Result | None: ...

    async def result(
        self,
        task_id: str,
        wait: bool = False,
        timeout: float | None = None,
        on_status: Callable[[TaskStatus], None] | None = None,
    ) -> Result | None:
        """The result object plus `state`; None if not finished and `wait` is false.

        With `wait`, return the moment the result is stored; WaitTimeout after `timeout`.
        """
        if not wait:
            return finished(task_id, await self._meta(task_id), on_status)
        waiting = ResultWait(task_id, timeout, on_status)
        channel = result_key(task_id)
        inbox = AsyncInbox()
        await self._subscribe(channel, inbox)
        try:
            meta = await self._meta(task_id)
            while (result := waiting.outcome(meta)) is None:
                pushed = waiting.pushed(await inbox.get(waiting.pause))
                meta = pushed if pushed is not None else await self._meta(task_id)
            return result
        finally:
            self._notifier.unsubscribe(channel, inbox)

    async def cancel(self, task_id: str) -> bool:
        """Cancel a task (see `Client.cancel`); False if it had already finished."""
        if is_final(await self._meta(task_id)):
            return False

        async def send() -> None:
            pipe = self._redis.pipeline(transaction=False)
            cancel_commands(pipe, task_id, self._envelope)
            await pipe.execute()

        await self._call(self._broker_url, send)
        return True

    async def live_workers(self, queue: str | None = None) -> list[str]:
        """Names of the workers alive on `queue` (default: this client's VQ_QUEUE)."""
        name = queue or self.settings.queue
        return await self._call(self._broker_url, lambda: live_workers_async(self._redis, name))

    async def stream(self, task_id: str) -> AsyncIterator[str]:
        """The task's text deltas as generated; ends with the task (TaskFailed if it failed).
        With `n` above 1, the first choice's (see `Client.stream`)."""
        async for event in self.stream_events(task_id):
            if event.kind == "delta":
                if not event.choice:
                    yield event.text
            else:
                raise_if_failed(event)

    async def stream_events(
        self, task_id: str, after: str | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Stream entries after cursor `after` (None: from the start), ending with "end"
        (a document's deltas carry `page`, a task's choices `choice`: `Client.stream_events`)."""
        check_task_id(task_id)
        follower = StreamFollower(task_id, after)
        key = stream_key(task_id)
        inbox = AsyncInbox()
        await self._subscribe(key, inbox)
        try:
            check_state = True
            while True:
                entries = await self._entries(key, follower.range_start(), FETCH_COUNT)
                for event in follower.accept(entries):
                    yield event
                if follower.done:
                    return
                if len(entries) == FETCH_COUNT:
                    continue
                if not entries and check_state:
                    ended = await self._ended_without_stream(follower, key)
                    if ended is not None:
                        yield ended
                        return
                check_state = await inbox.get(BACKUP_POLL_S) is None
                inbox.clear()
        finally:
            self._notifier.unsubscribe(key, inbox)

    async def _ended_without_stream(self, follower: StreamFollower, key: str) -> StreamEvent | None:
        meta = await self._meta(follower.task_id)
        if not is_final(meta):
            return None
        more = await self._entries(key, follower.range_start(), 1)
        return None if more else follower.ended_without_stream(meta)

    # Lifecycle ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        await self._notifier.aclose()
        if self._results is not self._redis:
            await self._results.aclose()
        await self._redis.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # Internals --------------------------------------------------------------------------

    async def _meta(self, task_id: str) -> dict[str, Any]:
        check_task_id(task_id)
        if self._results is self._redis:

            def read() -> Awaitable[list[Any]]:
                return self._reads.run(lambda pipe: read_commands(pipe, task_id), 2)

            return meta_from_replies(task_id, await self._call(self._backend_url, read))
        raw = await self._call(self._backend_url, lambda: self._results.get(result_key(task_id)))
        known: Any = raw is not None or await self._call(
            self._broker_url, lambda: self._redis.exists(SUBMITTED_KEY.format(task_id=task_id))
        )
        return meta_from_replies(task_id, [raw, known])

    async def _entries(self, key: str, start: str, count: int) -> list[tuple[Any, dict[Any, Any]]]:
        async def fetch() -> list[tuple[Any, dict[Any, Any]]]:
            [found] = await self._reads.run(lambda pipe: pipe.xrange(key, start, "+", count), 1)
            return cast("list[tuple[Any, dict[Any, Any]]]", found or [])

        return await self._call(self._backend_url, fetch)

    async def _call(self, url: str, operation: Callable[[], Awaitable[T]]) -> T:
        self._check_loop()
        return await acall(self.settings, url, operation)

    def _check_loop(self) -> None:
        """Its connections belong to the loop that first used it: another loop fails now,
        with the fix, instead of hanging or failing deep inside redis-py."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(
                "this AsyncClient was first used on another event loop; its connections "
                "belong to that loop: create one AsyncClient per event loop"
            )

    async def _subscribe(self, channel: str, inbox: AsyncInbox) -> None:
        budget = self.settings.connect_timeout_s
        await self._call(
            self._backend_url, lambda: self._notifier.subscribe(channel, inbox, budget)
        )

    def _notification_connection(self) -> redis.asyncio.Redis:
        return async_redis_client(
            self.settings,
            self._backend_url,
            health_check_interval=0,
            **async_client_options(self.settings),
        )


class _Coalescer:
    """Reads issued during one turn of the event loop go to Redis as one pipeline.

    A thousand waits starting together then cost one round trip instead of a thousand
    connections taking turns on the pool (whose lock hands over once per loop turn)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self._queued: list[tuple[Callable[[Any], object], int, asyncio.Future[list[Any]]]] = []
        self._running: set[asyncio.Task[None]] = set()

    async def run(self, add: Callable[[Any], object], replies: int) -> list[Any]:
        """Queue commands (`add(pipeline)`, `replies` of them); return their replies."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((add, replies, future))
        return await future

    def _flush(self) -> None:
        batch, self._queued = self._queued, []
        task = asyncio.get_running_loop().create_task(self._execute(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _execute(
        self, batch: list[tuple[Callable[[Any], object], int, asyncio.Future[list[Any]]]]
    ) -> None:
        # In slices, each one round trip: replies are parsed without yielding to the loop,
        # and every caller served wakes on the next turn, so a slice bounds that turn.
        for start in range(0, len(batch), _READ_SLICE):
            if start:
                await asyncio.sleep(0)
            await self._execute_slice(batch[start : start + _READ_SLICE])

    async def _execute_slice(
        self, batch: list[tuple[Callable[[Any], object], int, asyncio.Future[list[Any]]]]
    ) -> None:
        pipe = self.client.pipeline(transaction=False)
        for add, _, _ in batch:
            add(pipe)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        start = 0
        for _, count, future in batch:
            mine = list(replies[start : start + count])
            start += count
            if future.done():
                continue
            error = next((reply for reply in mine if isinstance(reply, Exception)), None)
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(mine)


def _bound(
    function: Callable[[Sequence[Outgoing]], Awaitable[None]], batch: Sequence[Outgoing]
) -> Callable[[], Awaitable[None]]:
    return lambda: function(batch)


def _connect(settings: Settings, url: str, pool_size: int) -> redis.asyncio.Redis:
    return async_redis_client(
        settings, url, max_connections=pool_size, **async_client_options(settings)
    )
