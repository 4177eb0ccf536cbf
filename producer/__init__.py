"""Producer side of vision-queue: the light client that web backends import.

    from producer import Client, TaskName
    client = Client()                      # REDIS_URL etc. from the environment
    handle = client.submit(TaskName.OCR, [open("page.png", "rb").read()])
    result = client.result(handle.id, wait=True, timeout=120)

    async with AsyncClient() as client:     # the same operations, as coroutines
        async for text in client.stream((await client.submit("ask", [], "Hi")).id):
            print(text, end="")

No torch or transformers here. The shapes and codes both sides share live in the contract
package, `vision_queue`; the names below re-export them for clients. Names are imported on
first use (PEP 562): `import producer` alone costs about a millisecond, and the redis
client (about 0.1 s to import) is loaded only by what talks to Redis.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producer.async_client import AsyncClient
    from producer.client import Client
    from producer.submission import SubmitRequest
    from vision_queue.errors import (
        BrokerAuthenticationFailed,
        BrokerOutOfMemory,
        BrokerUnavailable,
        ClientError,
        ErrorCode,
        TaskFailed,
        UnknownTaskId,
        VisionQueueError,
        WaitTimeout,
    )
    from vision_queue.protocol import Priority, TaskName
    from vision_queue.results import Result, ResultError, TaskHandle, TaskStatus
    from vision_queue.schemas import ImageRef, ImageSource
    from vision_queue.settings import Settings, SettingsError
    from vision_queue.streams import StreamEvent

# Public name -> the module that defines it.
_EXPORTS = {
    "AsyncClient": "producer.async_client",
    "BrokerAuthenticationFailed": "vision_queue.errors",
    "BrokerOutOfMemory": "vision_queue.errors",
    "BrokerUnavailable": "vision_queue.errors",
    "Client": "producer.client",
    "ClientError": "vision_queue.errors",
    "ErrorCode": "vision_queue.errors",
    "ImageRef": "vision_queue.schemas",
    "ImageSource": "vision_queue.schemas",
    "Priority": "vision_queue.protocol",
    "Result": "vision_queue.results",
    "ResultError": "vision_queue.results",
    "Settings": "vision_queue.settings",
    "SettingsError": "vision_queue.settings",
    "StreamEvent": "vision_queue.streams",
    "SubmitRequest": "producer.submission",
    "TaskFailed": "vision_queue.errors",
    "TaskHandle": "vision_queue.results",
    "TaskName": "vision_queue.protocol",
    "TaskStatus": "vision_queue.results",
    "UnknownTaskId": "vision_queue.errors",
    "VisionQueueError": "vision_queue.errors",
    "WaitTimeout": "vision_queue.errors",
}

__all__ = [
    "AsyncClient",
    "BrokerAuthenticationFailed",
    "BrokerOutOfMemory",
    "BrokerUnavailable",
    "Client",
    "ClientError",
    "ErrorCode",
    "ImageRef",
    "ImageSource",
    "Priority",
    "Result",
    "ResultError",
    "Settings",
    "SettingsError",
    "StreamEvent",
    "SubmitRequest",
    "TaskFailed",
    "TaskHandle",
    "TaskName",
    "TaskStatus",
    "UnknownTaskId",
    "VisionQueueError",
    "WaitTimeout",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'producer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
