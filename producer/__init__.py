"""Producer side of vision-queue: the light client that web backends import.

    from producer import Client, TaskName
    client = Client()                      # REDIS_URL etc. from the environment
    handle = client.submit(TaskName.OCR, [open("page.png", "rb").read()])
    result = client.result(handle.id, wait=True, timeout=120)

    async with AsyncClient() as client:     # the same operations, as coroutines
        async for text in client.stream((await client.submit("ask", [], "Hi")).id):
            print(text, end="")

No torch or transformers here. Names are imported on first use (PEP 562), so the worker's
engine can use the contract modules (`producer.errors`, `producer.contract`...) without
pulling Celery and redis into processes that never touch the queue.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producer.async_client import AsyncClient
    from producer.client import Client
    from producer.contract import Priority, TaskName
    from producer.errors import (
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
    from producer.results import Result, ResultError, TaskHandle, TaskStatus
    from producer.schemas import ImageRef, ImageSource
    from producer.settings import Settings, SettingsError
    from producer.streams import StreamEvent
    from producer.submission import SubmitRequest

# Public name -> the module that defines it.
_EXPORTS = {
    "AsyncClient": "producer.async_client",
    "BrokerAuthenticationFailed": "producer.errors",
    "BrokerOutOfMemory": "producer.errors",
    "BrokerUnavailable": "producer.errors",
    "Client": "producer.client",
    "ClientError": "producer.errors",
    "ErrorCode": "producer.errors",
    "ImageRef": "producer.schemas",
    "ImageSource": "producer.schemas",
    "Priority": "producer.contract",
    "Result": "producer.results",
    "ResultError": "producer.results",
    "Settings": "producer.settings",
    "SettingsError": "producer.settings",
    "StreamEvent": "producer.streams",
    "SubmitRequest": "producer.submission",
    "TaskFailed": "producer.errors",
    "TaskHandle": "producer.results",
    "TaskName": "producer.contract",
    "TaskStatus": "producer.results",
    "UnknownTaskId": "producer.errors",
    "VisionQueueError": "producer.errors",
    "WaitTimeout": "producer.errors",
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
