"""Helpers of the gateway tests: real gateway processes, keys, images, SSE reading."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from support.http_server import HOOK_HOST, IMAGE_HOST
from support.redis_server import free_port
from support.workers import IMAGES, base_env, terminate

API_KEY = "vq-test-key-0123456789abcdef"
OTHER_KEY = "vq-other-key-0123456789abcd"
WEBHOOK_SECRET = "whsec-gateway-tests-0123456789"
MODEL = "phi-3-vision-test"
# Tokens an ask may generate: so many that a task only ends early when it is cancelled
# (or given a smaller max_tokens), whatever the machine's speed.
ENDLESS = 100_000
# Shared by the gateways and the worker (the same checks on both sides): webhooks and
# image URLs may reach the tests' loopback servers; an ask may run (almost) forever.
STACK_ENV = {
    "VQ_ALLOWED_PRIVATE_HOSTS": IMAGE_HOST,
    "VQ_WEBHOOK_ALLOWED_PRIVATE_HOSTS": HOOK_HOST,
    "VQ_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "VQ_WEBHOOK_BACKOFF_S": "0.2",
    "VQ_MAX_NEW_TOKENS_CAPS": f"describe=16,ocr=16,compare=16,ask={ENDLESS}",
    "VQ_TASK_TIME_LIMIT_S": "240",
    "VQ_VISIBILITY_TIMEOUT_S": "600",
}


class GatewayProcess:
    """`producer serve` on a free loopback port, as an operator would start it."""

    def __init__(self, redis_url: str, logdir: Path, **env: str) -> None:
        self.port = free_port()
        self.log_path = logdir / f"gateway-{self.port}.log"
        defaults = {
            "VQ_API_KEYS": f"{API_KEY},{OTHER_KEY}",
            "VQ_GATEWAY_MODEL_NAME": MODEL,
            # The suites send many wrong keys from one address on purpose; the budget of
            # failed attempts has tests of its own (test_edge_door.py).
            "VQ_GATEWAY_AUTH_FAILURES_PER_MINUTE": "0",
        }
        self.env = base_env(redis_url, **{**defaults, **STACK_ENV, **env})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def start(self, timeout_s: float = 60) -> GatewayProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "serve", "--host", "127.0.0.1",
             "--port", str(self.port)],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url("/healthz"), timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"gateway not up after {timeout_s}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, grace_s=15)
            self._log.close()
            self.process = None

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def image_bytes(name: str = "shapes_640x480.png") -> bytes:
    return (IMAGES / name).read_bytes()


def data_uri(name: str = "shapes_640x480.png") -> str:
    kind = "png" if name.endswith(".png") else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(image_bytes(name)).decode()


def submitted_count(redis_url: str) -> int:
    """Tasks ever queued on this Redis (each leaves its `submitted` marker)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(1 for _ in client.scan_iter("vq:submitted:*"))
    finally:
        client.close()


class SentEvents:
    """The `task-sent` events (what Flower counts) of tasks queued from now on: each names
    the Redis list its task was pushed onto."""

    def __init__(self, redis_url: str) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe("/0.celeryev/task.sent")
        self.pubsub.get_message(timeout=5)  # the subscribe confirmation

    def queues(self, count: int, timeout_s: float = 10) -> dict[str, str]:
        """Task id -> list, for the next `count` tasks sent."""
        found: dict[str, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.5)
            if message and message["type"] == "message":
                event = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
                found[event["uuid"]] = event["queue"]
        return found

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


def wait_for_result(api: httpx.Client, task_id: str, timeout_s: float = 120) -> dict[str, Any]:
    """GET the task until it has ended (the native API's polling form)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = api.get(f"/v1/tasks/{task_id}").json()
        if body["state"] in ("SUCCESS", "FAILURE"):
            return dict(body)
        time.sleep(0.05)
    raise TimeoutError(f"task {task_id} did not end")


@dataclass
class Event:
    name: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


def read_events(lines: Iterator[str]) -> Iterator[Event]:
    """Parse server-sent events from a response's lines (comments skipped)."""
    name, data, event_id = "message", [], None
    for line in lines:
        if line == "":
            if data:
                yield Event(name, "\n".join(data), event_id)
            name, data, event_id = "message", [], None
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "data":
                data.append(value)
            elif key == "event":
                name = value
            elif key == "id":
                event_id = value


