"""Waiting without polling: one pub/sub connection per client, shared by all its waits.

Workers PUBLISH every state change of a task on its result key's channel, and every new
stream entry on the stream's channel. A wait subscribes first, reads the stored state
second (so nothing published in between is missed), then sleeps until a message arrives,
re-reading the state every `BACKUP_POLL_S` because pub/sub is at-most-once (a message
sent while the connection was being re-established is gone).

`Notifier` owns the connection and runs on an event loop: `AsyncClient` uses it on the
caller's loop; `Client` runs it on a private loop thread (`LoopThread`) and waits on
thread-safe queues, so a thousand waiting threads share one connection too. Channels are
reference-counted: a channel is subscribed once however many waits want it, and
unsubscribed when the last one leaves, so nothing accumulates on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import redis
import redis.asyncio

log = logging.getLogger("vision_queue.client")

T = TypeVar("T")

# Between two reads of the stored state while waiting (pub/sub may lose a message).
BACKUP_POLL_S = 2.0
# A quiet connection is pinged this often, so a dead one is noticed and replaced.
_IDLE_PING_S = 15.0
_READ_SLICE_S = 1.0


class Inbox(Protocol):
    """Where a channel's messages go: an asyncio.Queue or a queue.SimpleQueue.

    `None` means "the connection was replaced, messages may be lost: read the state"."""

    def put_nowait(self, item: bytes | None) -> None: ...


@dataclass
class _Channel:
    inboxes: set[Inbox] = field(default_factory=set)
    unconfirmed: int = 0  # SUBSCRIBEs sent, confirmation not read yet
    subscribed: bool = False
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class Notifier:
    """Subscriptions of one client, dispatched from a single reader task."""

    def __init__(self, connect: Callable[[], redis.asyncio.Redis]) -> None:
        self._connect = connect
        self._client: redis.asyncio.Redis | None = None
        self._pubsub: Any = None
        self._channels: dict[bytes, _Channel] = {}
        self._reader: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._closed = False

    async def subscribe(self, channel: str, inbox: Inbox) -> None:
        """Return once Redis has confirmed the subscription (later PUBLISHes will arrive)."""
        key = channel.encode()
        state = self._channels.setdefault(key, _Channel())
        state.inboxes.add(inbox)
        if state.subscribed:
            return
        waiter = asyncio.get_running_loop().create_future()
        state.waiters.append(waiter)
        try:
            if state.unconfirmed == 0:
                pubsub = await self._started()
                state.unconfirmed += 1
                try:
                    await pubsub.execute_command("SUBSCRIBE", key)
                except BaseException:
                    state.unconfirmed -= 1
                    raise
            await waiter
        except BaseException:
            self.unsubscribe(channel, inbox)
            raise

    def unsubscribe(self, channel: str, inbox: Inbox) -> None:
        key = channel.encode()
        state = self._channels.get(key)
        if state is None:
            return
        state.inboxes.discard(inbox)
        self._release_if_unused(key, state)

    def _release_if_unused(self, key: bytes, state: _Channel) -> None:
        if state.inboxes or state.unconfirmed:
            return  # an unconfirmed SUBSCRIBE is released when its confirmation arrives
        del self._channels[key]
        if state.subscribed and self._pubsub is not None:
            pubsub = self._pubsub
            task = asyncio.get_running_loop().create_task(_quietly(pubsub, "UNSUBSCRIBE", key))
            _background.add(task)
            task.add_done_callback(_background.discard)

    async def aclose(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self._drop_connection()

    # The reader --------------------------------------------------------------------------

    async def _started(self) -> Any:
        async with self._start_lock:
            if self._pubsub is None:
                self._client = self._connect()
                pubsub = self._client.pubsub()
                try:
                    await pubsub.connect()
                except BaseException:
                    await self._drop_connection(pubsub)
                    raise
                self._pubsub = pubsub
            if self._reader is None or self._reader.done():
                self._reader = asyncio.get_running_loop().create_task(self._read())
            return self._pubsub

    async def _read(self) -> None:
        idle = 0.0
        while not self._closed:
            pubsub = self._pubsub
            if pubsub is None:
                return
            try:
                message = await pubsub.get_message(timeout=_READ_SLICE_S)
                if message is None:
                    idle += _READ_SLICE_S
                    if idle >= _IDLE_PING_S:
                        idle = 0.0
                        await pubsub.execute_command("PING")
                    continue
                idle = 0.0
                self._dispatch(message)
            except (redis.RedisError, OSError) as exc:
                log.warning("result notifications interrupted (%s); reconnecting", exc)
                await self._reconnect()
                return

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, channel = message.get("type"), message.get("channel")
        if not isinstance(channel, bytes):
            return
        state = self._channels.get(channel)
        if state is None:
            return
        if kind == "message":
            for inbox in list(state.inboxes):
                inbox.put_nowait(message.get("data"))
        elif kind == "subscribe" and state.unconfirmed:
            state.unconfirmed -= 1
            if state.unconfirmed == 0:
                state.subscribed = True
                for waiter in state.waiters:
                    if not waiter.done():
                        waiter.set_result(None)
                state.waiters.clear()
                self._release_if_unused(channel, state)

    async def _reconnect(self) -> None:
        """Replace the connection; every wait re-reads its state (messages may be lost)."""
        await self._drop_connection()
        for key, state in list(self._channels.items()):
            state.subscribed = False
            state.unconfirmed = 0
            for inbox in state.inboxes:
                inbox.put_nowait(None)
            for waiter in state.waiters:
                if not waiter.done():
                    waiter.set_exception(redis.ConnectionError("notification connection lost"))
            state.waiters.clear()
            if not state.inboxes:
                del self._channels[key]
        keys = list(self._channels)
        while keys and not self._closed:
            try:
                pubsub = await self._started_without_reader()
                for key in keys:
                    self._channels[key].unconfirmed += 1
                await pubsub.execute_command("SUBSCRIBE", *keys)
                break
            except (redis.RedisError, OSError):
                for key in keys:
                    if key in self._channels:
                        self._channels[key].unconfirmed = 0
                await self._drop_connection()
                await asyncio.sleep(1.0)
                keys = [k for k in keys if k in self._channels]
        if not self._closed and self._pubsub is not None:
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _started_without_reader(self) -> Any:
        async with self._start_lock:
            if self._pubsub is None:
                self._client = self._connect()
                pubsub = self._client.pubsub()
                await pubsub.connect()
                self._pubsub = pubsub
            return self._pubsub

    async def _drop_connection(self, pubsub: Any = None) -> None:
        pubsub = pubsub or self._pubsub
        client = self._client
        self._pubsub, self._client = None, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()


_background: set[asyncio.Task[None]] = set()


async def _quietly(pubsub: Any, *command: Any) -> None:
    # A failed UNSUBSCRIBE is harmless: the connection it was on is being replaced.
    with contextlib.suppress(redis.RedisError, OSError):
        await pubsub.execute_command(*command)


class LoopThread:
    """A private event loop on a daemon thread, for the sync client's notifications."""

    def __init__(self, name: str = "vision-queue-notify") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(callback, *args)

    def close(self, cleanup: Coroutine[Any, Any, None] | None = None) -> None:
        if cleanup is not None:
            try:
                self.run(cleanup, timeout=5)
            except Exception as exc:  # closing must not raise; the thread is a daemon
                log.debug("notifier cleanup failed: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


async def subscribe_within(notifier: Notifier, channel: str, inbox: Inbox, timeout: float) -> None:
    """`Notifier.subscribe`, failing as a Redis timeout if Redis never confirms it."""
    try:
        await asyncio.wait_for(notifier.subscribe(channel, inbox), timeout)
    except asyncio.TimeoutError:
        message = f"Redis did not confirm a subscription within {timeout:g} s"
        raise redis.TimeoutError(message) from None
