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
from collections import deque
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
_BUSY_SLICE_S = 0.005
_WAKE_SLICE = 64


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
    """Subscriptions of one client, dispatched from a single reader task.

    SUBSCRIBE and UNSUBSCRIBE requests made during one turn of the event loop go out as
    one command each, and the reader yields to the loop every few messages, so a burst
    of a thousand waits costs the loop a few milliseconds at a time, never a long stall.
    """

    def __init__(self, connect: Callable[[], redis.asyncio.Redis]) -> None:
        self._connect = connect
        self._client: redis.asyncio.Redis | None = None
        self._pubsub: Any = None
        self._channels: dict[bytes, _Channel] = {}
        self._reader: asyncio.Task[None] | None = None
        self._reading: Any = None  # the pub/sub connection `_reader` reads
        self._connecting: asyncio.Task[None] | None = None
        self._outbox: list[tuple[str, bytes]] = []
        self._closed = False

    async def subscribe(self, channel: str, inbox: Inbox, timeout: float) -> None:
        """Return once Redis has confirmed the subscription (later PUBLISHes will arrive);
        raise redis.TimeoutError if that takes longer than `timeout` seconds."""
        key = channel.encode()
        state = self._channels.setdefault(key, _Channel())
        state.inboxes.add(inbox)
        if state.subscribed:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        state.waiters.append(waiter)
        # A timer rather than asyncio.wait_for: no extra task per wait, which matters when a
        # thousand waits start in the same turn of the loop.
        expiry = loop.call_later(timeout, _expire, waiter, timeout)
        try:
            await self._started()
            if state.unconfirmed == 0 and not state.subscribed:
                state.unconfirmed += 1
                self._send_soon("SUBSCRIBE", key)
            await waiter
        except BaseException:
            self.unsubscribe(channel, inbox)
            raise
        finally:
            expiry.cancel()

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
        if state.subscribed:
            self._send_soon("UNSUBSCRIBE", key)

    def _send_soon(self, command: str, key: bytes) -> None:
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append((command, key))

    def _flush(self) -> None:
        batch, self._outbox = self._outbox, []
        if batch and self._pubsub is not None:
            task = asyncio.get_running_loop().create_task(self._send(self._pubsub, batch))
            _background.add(task)
            task.add_done_callback(_background.discard)

    async def _send(self, pubsub: Any, batch: list[tuple[str, bytes]]) -> None:
        # Runs of the same command in request order: an UNSUBSCRIBE then SUBSCRIBE of one
        # channel in the same turn must reach Redis in that order.
        runs: list[tuple[str, list[bytes]]] = []
        for command, key in batch:
            if runs and runs[-1][0] == command:
                runs[-1][1].append(key)
            else:
                runs.append((command, [key]))
        try:
            for command, keys in runs:
                await pubsub.execute_command(command, *keys)
        except Exception as exc:  # the reader sees the broken connection and reconnects
            log.debug("pub/sub command failed: %s", exc)
            if pubsub is self._pubsub:
                await self._reconnect()

    async def aclose(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self._drop_connection()

    # The reader --------------------------------------------------------------------------

    async def _started(self) -> Any:
        """The connected pub/sub object, its reader running. Callers arriving while it
        connects all wait for the same attempt (and wake together)."""
        if self._pubsub is None:
            if self._connecting is None or self._connecting.done():
                self._connecting = asyncio.get_running_loop().create_task(self._open())
            await asyncio.shield(self._connecting)
        if self._reader is None or self._reader.done() or self._reading is not self._pubsub:
            # A reader reads one connection and ends when it is replaced (also when it is
            # the reader that replaces it): the new connection gets its own reader, or
            # nothing would read the renewed subscriptions until the next subscribe.
            self._reading = self._pubsub
            self._reader = asyncio.get_running_loop().create_task(self._read(self._pubsub))
        return self._pubsub

    async def _open(self) -> None:
        client = self._connect()
        pubsub = client.pubsub()
        try:
            await pubsub.connect()
        except BaseException:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
                await client.aclose()
            raise
        self._client, self._pubsub = client, pubsub

    async def _read(self, pubsub: Any) -> None:
        idle = 0.0
        loop = asyncio.get_running_loop()
        busy_since, woken = loop.time(), 0
        while not self._closed and pubsub is self._pubsub:
            try:
                message = await pubsub.get_message(timeout=_READ_SLICE_S)
                if message is None:
                    idle += _READ_SLICE_S
                    if idle >= _IDLE_PING_S:
                        idle = 0.0
                        await pubsub.execute_command("PING")
                    continue
            except (redis.RedisError, OSError) as exc:
                log.warning("result notifications interrupted (%s); reconnecting", exc)
                if pubsub is self._pubsub:
                    await self._reconnect()
                return
            idle = 0.0
            woken += self._dispatch(message)
            if woken >= _WAKE_SLICE or loop.time() - busy_since > _BUSY_SLICE_S:
                # A burst is handed out in slices: every waiter woken runs on the next turn
                # of the loop, so a slice bounds how long that turn takes.
                await asyncio.sleep(0)
                busy_since, woken = loop.time(), 0

    def _dispatch(self, message: dict[str, Any]) -> int:
        """Hand a message to its waiters; return how many may wake."""
        kind, channel = message.get("type"), message.get("channel")
        if not isinstance(channel, bytes):
            return 0
        state = self._channels.get(channel)
        if state is None:
            return 0
        if kind == "message":
            for inbox in list(state.inboxes):
                inbox.put_nowait(message.get("data"))
            return len(state.inboxes)
        woken = len(state.waiters)
        if kind == "subscribe" and state.unconfirmed:
            state.unconfirmed -= 1
            if state.unconfirmed == 0:
                state.subscribed = True
                for waiter in state.waiters:
                    if not waiter.done():
                        waiter.set_result(None)
                state.waiters.clear()
                self._release_if_unused(channel, state)
        return woken

    async def _reconnect(self) -> None:
        """Replace the connection. Waits in progress re-read their state (messages may have
        been lost); subscriptions not yet confirmed fail, and their callers retry."""
        await self._drop_connection()
        self._outbox.clear()
        for state in list(self._channels.values()):
            state.subscribed = False
            state.unconfirmed = 0
            for waiter in state.waiters:
                if not waiter.done():
                    waiter.set_exception(redis.ConnectionError("notification connection lost"))
            state.waiters.clear()
            for inbox in state.inboxes:
                inbox.put_nowait(None)
        while self._channels and not self._closed:
            try:
                await self._started()
                break
            except (redis.RedisError, OSError):
                await asyncio.sleep(1.0)
        for key, state in list(self._channels.items()):
            if state.inboxes and not state.unconfirmed and not state.subscribed:
                state.unconfirmed += 1
                self._send_soon("SUBSCRIBE", key)
            elif not state.inboxes and not state.unconfirmed:
                del self._channels[key]

    async def _drop_connection(self) -> None:
        pubsub, client = self._pubsub, self._client
        self._pubsub, self._client = None, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()


_background: set[asyncio.Task[None]] = set()


class AsyncInbox:
    """An asyncio inbox lighter than asyncio.Queue + wait_for: no task per wait, one timer."""

    def __init__(self) -> None:
        self._items: deque[bytes | None] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: bytes | None) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, timeout: float) -> bytes | None:
        """The next message; None after `timeout`, or when the connection was replaced."""
        if not self._items:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiter = waiter
            timer = loop.call_later(max(0.0, timeout), _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self._items.popleft() if self._items else None

    def clear(self) -> None:
        self._items.clear()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


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


def _expire(waiter: asyncio.Future[None], timeout: float) -> None:
    if not waiter.done():
        message = f"Redis did not confirm a subscription within {timeout:g} s"
        waiter.set_exception(redis.TimeoutError(message))
