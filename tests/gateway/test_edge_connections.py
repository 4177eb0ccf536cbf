"""Connection limits of a real gateway (uvicorn, Redis): idle, trickling and flooding
clients are closed, and health checks and real callers are still answered.

Issue #19, class 2. The gateway here has a 1 s header deadline, a 2 s body deadline and
room for 30 connections; every bound below is many times those, so a slow machine passes.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from gateway_support import API_KEY, GatewayProcess
from support.redis_server import RedisServer

MAX_CONNECTIONS = 30
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def gateway(
    module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    env = {
        "VQ_GATEWAY_HEADER_TIMEOUT_S": "1",
        "VQ_GATEWAY_BODY_TIMEOUT_S": "2",
        "VQ_GATEWAY_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "VQ_GATEWAY_REQUESTS_PER_MINUTE": "0",
    }
    with GatewayProcess(module_redis.url, tmp_path_factory.mktemp("conn"), **env) as process:
        yield process


def closed_within(sock: socket.socket, seconds: float, drip: bytes = b"") -> float | None:
    """Seconds until the server closed `sock` (sending one byte of `drip` every 0.2 s
    meanwhile), or None if it stayed open for `seconds`."""
    began = time.monotonic()
    sock.settimeout(0.2)
    position = 0
    while time.monotonic() - began < seconds:
        try:
            if not sock.recv(65536):
                return time.monotonic() - began
            continue  # an answer (e.g. 400): the close follows
        except TimeoutError:
            pass
        except OSError:
            return time.monotonic() - began
        if position < len(drip):
            try:
                sock.send(drip[position : position + 1])
            except OSError:
                return time.monotonic() - began
            position += 1
    return None


def open_fds(gateway: GatewayProcess) -> int:
    assert gateway.process is not None
    return len(os.listdir(f"/proc/{gateway.process.pid}/fd"))


def test_a_silent_connection_is_closed_at_the_header_deadline(gateway: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        elapsed = closed_within(sock, 30)
    assert elapsed is not None and 0.5 < elapsed < 30


def test_an_idle_keep_alive_connection_is_closed(gateway: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(30)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        began = time.monotonic()
        elapsed = closed_within(sock, 60)
    assert elapsed is not None and time.monotonic() - began < 60  # keep-alive: 5 s


def test_trickled_headers_are_closed_at_the_header_deadline(gateway: GatewayProcess) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: y\r\n" * 100 + b"\r\n"
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        elapsed = closed_within(sock, 30, drip=head)
    # The whole head would take 0.2 s x 1,200 bytes = 4 minutes.
    assert elapsed is not None and elapsed < 30


def test_a_trickled_body_is_closed_at_the_body_deadline(gateway: GatewayProcess) -> None:
    head = (
        b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(head)
        elapsed = closed_within(sock, 60, drip=b"{" + b" " * 999)
    # The body would take 200 s at this pace.
    assert elapsed is not None and elapsed < 60
    assert "Traceback" not in gateway.log()


def test_an_idle_flood_leaves_health_checks_and_callers_answered(
    gateway: GatewayProcess,
) -> None:
    before = open_fds(gateway)
    flood = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(150)]
    try:
        for _ in range(3):
            answer = httpx.get(gateway.url("/healthz"), timeout=20)
            assert answer.status_code == 200
            assert httpx.get(gateway.url("/v1/models"), headers=AUTH, timeout=20).status_code == 200
        time.sleep(0.5)
        # Never more than the cap held open, whatever the flood.
        assert open_fds(gateway) - before <= MAX_CONNECTIONS + 5
    finally:
        for sock in flood:
            sock.close()
    time.sleep(0.5)
    lines = [line for line in gateway.log().splitlines() if "connections open" in line]
    assert 1 <= len(lines) <= 10  # one line per interval, not one per closed connection


def test_connections_past_their_deadlines_do_not_pile_up(gateway: GatewayProcess) -> None:
    before = open_fds(gateway)
    held = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(20)]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and open_fds(gateway) > before + 2:
            time.sleep(0.2)
        assert open_fds(gateway) <= before + 2  # all closed by the header deadline
    finally:
        for sock in held:
            sock.close()
