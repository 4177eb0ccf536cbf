"""Producer side of vision-queue: the light client that web backends import.

    from producer import Client, TaskName
    client = Client()                      # REDIS_URL etc. from the environment
    handle = client.submit(TaskName.OCR, [open("page.png", "rb").read()])
    result = client.result(handle.id, wait=True, timeout=120)

No torch or transformers here: importing this package is cheap.
"""

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
