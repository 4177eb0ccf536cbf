"""A real webhook receiver: loopback HTTP on the allow-listed port, answering as scripted;
and the signature check exactly as docs/security.md shows it to receivers."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from support.http_server import HOOK_PORT

SECURITY_DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"


@dataclass
class Hook:
    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    """Records every POST; answers `statuses` in order (the last one repeats). With `hold`
    set up, each request waits for it before answering (a receiver that is slow or hangs)."""

    def __init__(self, statuses: tuple[int, ...] = (200,)) -> None:
        self.statuses = list(statuses)
        self.hold: threading.Event | None = None
        self.hooks: list[Hook] = []
        self._arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._arrived:
                    receiver.hooks.append(Hook(dict(self.headers.items()), body))
                    count = len(receiver.hooks)
                    status = receiver.statuses[min(count, len(receiver.statuses)) - 1]
                    receiver._arrived.notify_all()
                if receiver.hold is not None:
                    receiver.hold.wait(60)
                try:
                    self.send_response(status)
                    if 300 <= status < 400:
                        self.send_header("Location", "/elsewhere")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sender is gone (killed mid-delivery)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", HOOK_PORT), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hooks/vq") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_for(self, count: int, timeout_s: float = 120) -> list[Hook]:
        with self._arrived:
            assert self._arrived.wait_for(lambda: len(self.hooks) >= count, timeout_s), (
                f"{len(self.hooks)} of {count} webhooks arrived within {timeout_s:g} s"
            )
            return list(self.hooks)

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def documented_verifier() -> Callable[..., Any]:
    """`verify_webhook` exactly as docs/security.md prints it."""
    doc = SECURITY_DOC.read_text()
    snippet = re.search(r"<!-- webhook-verify -->\n```python\n(.*?)```", doc, re.DOTALL)
    assert snippet is not None
    namespace: dict[str, Any] = {}
    exec(compile(snippet.group(1), "docs/security.md", "exec"), namespace)  # noqa: S102
    verify: Callable[..., Any] = namespace["verify_webhook"]
    return verify
