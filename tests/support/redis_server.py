"""A real redis-server owned by the tests, so they can stop, kill and restart it.

The process itself is the development one (scripts/devstack.py, also used by the demo);
the tests fix its password and add the controls fault tests need.
"""

from __future__ import annotations

import os
from pathlib import Path

import redis

from scripts import devstack
from scripts.devstack import find_redis_server, free_port

PASSWORD = "test-pass-7f3a"  # the shipped configuration requires one; so do the tests

__all__ = ["PASSWORD", "RedisServer", "find_redis_server", "free_port", "redis_env"]


class RedisServer(devstack.RedisServer):
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir, port, password=PASSWORD)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def restart(self) -> None:
        """Stop (AOF flushed on a clean shutdown) and start again on the same port."""
        self.stop()
        self.start()

    def flush(self) -> None:
        self.client().flushall()


def redis_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VQ_")}
    env["REDIS_URL"] = url
    return env
