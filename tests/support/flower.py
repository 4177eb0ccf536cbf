"""A real Flower on loopback with basic auth, the shipped nginx proxy in front of it, and
headless Chromium to look at its pages (screenshots, and what the page offers a user)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from support.redis_server import free_port
from support.workers import base_env, terminate

FLOWER_USER, FLOWER_PASSWORD = "user", "pass"

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROXY_TEMPLATE = ROOT / "ops" / "flower-proxy" / "default.conf.template"


def shipped_flower_option(name: str) -> str:
    """The value docker-compose.yml gives Flower's `--NAME=` option, so tests run Flower as
    it ships (k8s is held to the same value by tests/ops/test_k8s.py)."""
    command = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["flower"]["command"]
    prefix = f"--{name}="
    (value,) = [arg.removeprefix(prefix) for arg in command if arg.startswith(prefix)]
    assert "${" not in value, f"{name} is not a fixed value in docker-compose.yml"
    return str(value)

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


def basic_auth_header(auth: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()


def http_get(url: str, auth: tuple[str, str] | None = None, timeout_s: float = 5) -> Response:
    """GET on loopback; HTTP errors come back as a Response, not an exception."""
    return http_request("GET", url, auth, timeout_s=timeout_s)


def http_request(
    method: str,
    url: str,
    auth: tuple[str, str] | None = None,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 5,
) -> Response:
    """Any method on loopback; HTTP errors come back as a Response, not an exception."""
    assert url.startswith("http://127.0.0.1:"), url
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    if auth is not None:
        request.add_header("Authorization", basic_auth_header(auth))
    try:
        with _OPENER.open(request, timeout=timeout_s) as reply:
            return Response(reply.status, _headers(reply.headers), reply.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, _headers(error.headers), error.read())


def _headers(message: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in message.items()}


class FlowerProcess:
    """`celery -A producer.flower_app:app flower` on 127.0.0.1 with --basic-auth."""

    def __init__(
        self,
        redis_url: str,
        logdir: Path,
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        self.extra_args = list(extra_args)
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
                *self.extra_args,
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


# The Flower proxy -------------------------------------------------------------------------


def render_template(text: str, env: Mapping[str, str]) -> str:
    """What the nginx image's envsubst step does: `${NAME}` and `$NAME` become the value of
    NAME for each NAME in `env`; every other `$...` (nginx's own variables) stays."""
    for name, value in env.items():
        text = re.sub(rf"\$(?:\{{{name}\}}|{name}\b)", lambda _m, v=value: v, text)
    return text


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )


class FlowerProxy:
    """The shipped ops/flower-proxy template, rendered as the image renders it, served by a
    real nginx on loopback in front of a real Flower."""

    def __init__(
        self, nginx: str, flower: FlowerProcess, workdir: Path, allow_control: str = "0"
    ) -> None:
        self.nginx = nginx
        self.flower = flower
        self.workdir = workdir
        self.port = free_port()
        self.metrics_port = free_port()
        self.env = {
            "FLOWER_UPSTREAM": f"127.0.0.1:{flower.port}",
            "FLOWER_PROXY_LISTEN": f"127.0.0.1:{self.port}",
            "FLOWER_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
            "FLOWER_ALLOW_CONTROL": allow_control,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def metrics_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def request(
        self,
        method: str,
        path: str,
        auth: bool = True,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 15,
    ) -> Response:
        return http_request(
            method, self.url(path), self.flower.auth if auth else None, body, headers, timeout_s
        )

    def get(self, path: str, auth: bool = True, timeout_s: float = 15) -> Response:
        return self.request("GET", path, auth, timeout_s=timeout_s)

    def post(self, path: str, body: bytes = b"", auth: bool = True) -> Response:
        """A POST as Flower's own pages send it (same-origin XHR, form body)."""
        headers = {
            "Content-Type": "application/x-www-form-urlencoded; charset=UTF-8",
            "X-Requested-With": "XMLHttpRequest",
            "Origin": f"http://127.0.0.1:{self.port}",
        }
        return self.request("POST", path, auth, body, headers)

    def start(self, timeout_s: float = 30) -> FlowerProxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        rendered = render_template(PROXY_TEMPLATE.read_text(), self.env)
        assert "${" not in rendered, "a template variable was left unset"
        (self.workdir / "default.conf").write_text(rendered)
        temp_paths = "\n".join(
            f"    {kind}_temp_path {self.workdir / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        # The http block of the nginx image's own nginx.conf, reduced to what matters here.
        user = "user root;\n" if os.geteuid() == 0 else ""
        (self.workdir / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {self.workdir / 'nginx.pid'};\n"
            "events { worker_connections 64; }\n"
            "http {\n"
            f"    access_log {self.workdir / 'access.log'};\n{temp_paths}\n"
            "    keepalive_timeout 65;\n"
            f"    include {self.workdir / 'default.conf'};\n}}\n"
        )
        self._log = (self.workdir / "nginx.out").open("ab")
        self.process = subprocess.Popen(
            [self.nginx, "-p", str(self.workdir), "-e", str(self.workdir / "error.log"),
             "-c", str(self.workdir / "nginx.conf"), "-g", "daemon off;"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.log()}")
            try:
                if http_get(self.metrics_url("/healthcheck"), timeout_s=2).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the proxy is not answering after {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        parts = []
        for name in ("nginx.out", "error.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def stop(self) -> None:
        if self.process is None:
            return
        terminate(self.process, grace_s=10)
        self._log.close()
        self.process = None

    def __enter__(self) -> FlowerProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# What a page offers: headless Chromium driven over the DevTools protocol ------------------


class DevToolsError(RuntimeError):
    pass


def _above(fd: int, floor: int) -> int:
    """`fd` moved to a descriptor number >= floor (close-on-exec, like os.pipe's)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
    os.close(fd)
    return moved


class HeadlessChromium:
    """Chromium with `--remote-debugging-pipe`: DevTools commands as NUL-terminated JSON on
    file descriptors 3 (to Chromium) and 4 (from it). Enough to open a page with basic
    auth on every request and evaluate JavaScript in it."""

    def __init__(self, chromium: str, profile: Path) -> None:
        self.chromium = chromium
        self.profile = profile
        self._next_id = 0
        self._buffer = b""

    def __enter__(self) -> HeadlessChromium:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium's ends move to 3 and 4 in the child: keep them clear of those numbers.
        to_chrome_r, from_chrome_w = (_above(fd, 10) for fd in (to_chrome_r, from_chrome_w))
        args = [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", "--no-default-browser-check", "--no-proxy-server",
            "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
            "--window-size=1400,900", "about:blank",
        ]
        # bash moves the pipe ends onto the descriptors Chromium reads and writes (dash
        # cannot name descriptors above 9).
        script = (
            f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} '
            f"{to_chrome_r}<&- {from_chrome_w}>&-"
        )
        self.process = subprocess.Popen(
            ["bash", "-c", script, self.chromium, *args],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in (self._to_chrome, self._from_chrome):
            os.close(fd)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def call(
        self, method: str, params: Mapping[str, Any] | None = None,
        session: str | None = None, timeout_s: float = 30,
    ) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise DevToolsError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_chrome], [], [], max(left, 0))
            if not ready:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise DevToolsError("Chromium closed the pipe")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        parsed: dict[str, Any] = json.loads(raw)
        return parsed

    def open(self, url: str, auth: tuple[str, str]) -> str:
        """A new tab on `url`, sending basic auth on every request; returns its session."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = str(
            self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        )
        self.call("Network.enable", session=session)
        headers = {"Authorization": basic_auth_header(auth)}
        self.call("Network.setExtraHTTPHeaders", {"headers": headers}, session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        return session

    def evaluate_until(self, session: str, expression: str, timeout_s: float = 30) -> Any:
        """Evaluate `expression` in the page until it returns something other than null."""
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self.call(
                "Runtime.evaluate",
                {"expression": expression, "returnByValue": True},
                session=session,
            )
            value = reply.get("result", {}).get("value")
            if value is not None:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"page never satisfied: {expression[:200]}")
            time.sleep(0.2)


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
