"""A local HTTP server on loopback that serves fixed routes and records what it saw."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The one loopback port a long-lived test worker is allowed to fetch from
# (VQ_ALLOWED_PRIVATE_HOSTS takes host:port): chosen once per test session.
IMAGE_PORT = _free_port()
IMAGE_HOST = f"127.0.0.1:{IMAGE_PORT}"
# Likewise the one loopback port webhook receivers listen on (VQ_WEBHOOK_ALLOWED_PRIVATE_HOSTS).
HOOK_PORT = _free_port()
HOOK_HOST = f"127.0.0.1:{HOOK_PORT}"


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/octet-stream"


@dataclass
class LocalServer:
    port: int
    routes: dict[str, Route]
    requests: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextmanager
def serve(routes: dict[str, Route], port: int = IMAGE_PORT) -> Iterator[LocalServer]:
    """Serve `routes` on 127.0.0.1:`port` (IMAGE_PORT unless told; 0 picks a free one)."""
    state = LocalServer(port, routes)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            route = state.routes.get(self.path.split("?", 1)[0], Route(404, b"not found"))
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            self.wfile.write(route.body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
