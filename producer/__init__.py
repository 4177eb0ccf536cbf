"""Producer side of vision-queue: the light client that web backends import.

    from producer import Client, TaskName
    client = Client()                      # REDIS_URL etc. from the environment
    handle = client.submit(TaskName.OCR, [open("page.png", "rb").read()])
    result = client.result(handle.id, wait=True, timeout=120)

No torch or transformers here. Names are imported on first use (PEP 562), so the worker's
engine can use the contract modules (`producer.errors`, `producer.contract`...) without
pulling Celery and redis into processes that never touch the queue.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producer.client import Client, TaskHandle, TaskStatus
    from producer.contract import TaskName
    from producer.errors import (
        BrokerUnavailable,
        ClientError,
        ErrorCode,
        TaskFailed,
        UnknownTaskId,
        VisionQueueError,
        WaitTimeout,
    )
    from producer.schemas import ImageRef, ImageSource
    from producer.settings import Settings, SettingsError

# Public name -> the module that defines it.
_EXPORTS = {
    "BrokerUnavailable": "producer.errors",
    "Client": "producer.client",
    "ClientError": "producer.errors",
    "ErrorCode": "producer.errors",
    "ImageRef": "producer.schemas",
    "ImageSource": "producer.schemas",
    "Settings": "producer.settings",
    "SettingsError": "producer.settings",
    "TaskFailed": "producer.errors",
    "TaskHandle": "producer.client",
    "TaskName": "producer.contract",
    "TaskStatus": "producer.client",
    "UnknownTaskId": "producer.errors",
    "VisionQueueError": "producer.errors",
    "WaitTimeout": "producer.errors",
}

__all__ = [
    "BrokerUnavailable",
    "Client",
    "ClientError",
    "ErrorCode",
    "ImageRef",
    "ImageSource",
    "Settings",
    "SettingsError",
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
