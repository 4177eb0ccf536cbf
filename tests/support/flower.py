"""A real Flower process on loopback with basic auth, and a way to screenshot its pages."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.redis_server import free_port
from support.workers import base_env, terminate

FLOWER_USER, FLOWER_PASSWORD = "user", "pass"

# Only loopback, and never through a proxy named in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def http_get(url: str, auth: tuple[str, str] | None = None, timeout_s: float = 5) -> Response:
    """GET on loopback; HTTP errors come back as a Response, not an exception."""
    assert url.startswith("http://127.0.0.1:"), url
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with _OPENER.open(request, timeout=timeout_s) as reply:
            return Response(reply.status, _headers(reply.headers), reply.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, _headers(error.headers), error.read())


def _headers(message: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in message.items()}


class FlowerProcess:
    """`celery -A producer.flower_app:app flower` on 127.0.0.1 with --basic-auth."""

    def __init__(self, redis_url: str, logdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = logdir / "flower.log"
        self.env = base_env(redis_url)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def auth(self) -> tuple[str, str]:
        return FLOWER_USER, FLOWER_PASSWORD

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, auth: bool = True, timeout_s: float = 5) -> Response:
        return http_get(self.url(path), self.auth if auth else None, timeout_s)

    def start(self, timeout_s: float = 30) -> FlowerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "producer.flower_app:app",
                "flower",
                "--address=127.0.0.1",
                f"--port={self.port}",
                f"--basic-auth={FLOWER_USER}:{FLOWER_PASSWORD}",
                "--persistent=False",
                "--logging=info",
            ],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"flower exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.get("/api/workers", timeout_s=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"flower not answering after {timeout_s}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        terminate(self.process, grace_s=10)
        self._log.close()
        self.process = None

    def __enter__(self) -> FlowerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Screenshots ---------------------------------------------------------------------------


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(
    chromium: str,
    url: str,
    out: Path,
    profile: Path,
    size: tuple[int, int] = (1400, 900),
    wait_ms: int = 3000,
    timeout_s: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Headless Chromium renders `url` (a loopback address) into the PNG `out`.

    Basic auth travels as credentials in the URL (http://user:pass@127.0.0.1:port/...):
    Chromium sends them for the page and keeps them in its auth cache for the page's
    same-origin XHR (the tasks table is loaded by one), so no proxy or DevTools session
    is needed. Chromium runs in its own session so a hung one is killed with its children.
    """
    host = url.removeprefix("http://").split("/", 1)[0].rsplit("@", 1)[-1]
    assert url.startswith("http://") and host.startswith("127.0.0.1:"), url
    args = [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--no-default-browser-check",
        "--hide-scrollbars",
        "--no-proxy-server",
        f"--user-data-dir={profile}",
        f"--window-size={size[0]},{size[1]}",
        # Lets the page's XHR (the tasks table) fill in before the capture.
        f"--virtual-time-budget={wait_ms}",
        f"--screenshot={out}",
        url,
    ]
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += f"\n(killed after {timeout_s:g} s)"
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
