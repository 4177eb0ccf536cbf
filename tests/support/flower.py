"""A real Flower process on loopback with basic auth, and a way to screenshot its pages."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from support.redis_server import free_port
from support.workers import base_env

USER, PASSWORD = "user", "pass"

# Only loopback, and never through a proxy named in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
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
            return Response(reply.status, dict(reply.headers), reply.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, dict(error.headers), error.read())


class FlowerProcess:
    """`celery -A producer.flower_app:app flower` on 127.0.0.1 with --basic-auth."""

    def __init__(self, redis_url: str, logdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = logdir / "flower.log"
        self.env = base_env(redis_url)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def auth(self) -> tuple[str, str]:
        return USER, PASSWORD

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
                f"--basic-auth={USER}:{PASSWORD}",
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
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
        self.process = None

    def __enter__(self) -> FlowerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Screenshots ---------------------------------------------------------------------------


@contextmanager
def auth_proxy(upstream_port: int, auth: tuple[str, str]) -> Iterator[int]:
    """A loopback reverse proxy that adds the Authorization header to every GET.

    Chromium drops credentials embedded in a URL for subresource requests (the tasks page
    loads its rows with XHR), so the browser talks to this proxy instead.
    """
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            request = urllib.request.Request(f"http://127.0.0.1:{upstream_port}{self.path}")
            request.add_header("Authorization", f"Basic {token}")
            for name in ("Accept", "X-Requested-With", "Cookie"):
                if self.headers.get(name):
                    request.add_header(name, self.headers[name])
            try:
                with _OPENER.open(request, timeout=10) as reply:
                    status, headers, body = reply.status, reply.headers, reply.read()
            except urllib.error.HTTPError as error:
                status, headers, body = error.code, error.headers, error.read()
            self.send_response(status)
            for name in ("Content-Type", "Set-Cookie", "Location"):
                for value in headers.get_all(name) or ():
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(
    chromium: str,
    url: str,
    out: Path,
    profile: Path,
    size: tuple[int, int] = (1400, 900),
    wait_ms: int = 4000,
    timeout_s: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Headless Chromium renders `url` (loopback only) into the PNG `out`."""
    assert url.split("@", 1)[-1].removeprefix("http://").startswith("127.0.0.1:"), url
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
        # Give the page's XHR (the tasks table) time to fill in before the capture.
        f"--virtual-time-budget={wait_ms}",
        f"--screenshot={out}",
        url,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)
