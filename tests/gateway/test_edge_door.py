"""The door of a real gateway (uvicorn, Redis): what a caller without a key, or with a
hostile body, costs; what reaches metrics and logs; the headers every answer carries.

Issue #19, classes 1 (order of work at the door), 3 (metrics and logs) and 6 (request
ids, no redirect from the Host header). No worker: nothing here needs a task to run.
Bounds are counts and generous times, never a machine's speed.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from gateway_support import API_KEY, GatewayProcess
from support.redis_server import RedisServer

MAX_BODY = 1024 * 1024  # this gateway's VQ_GATEWAY_MAX_BODY_BYTES
FAILURES = 5  # its VQ_GATEWAY_AUTH_FAILURES_PER_MINUTE
AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = {"content-type": "application/json"}
_addresses = iter(range(1, 60000))


def fresh() -> dict[str, str]:
    """A client address of its own (X-Forwarded-For, trusted from loopback), so one test's
    wrong keys never spend another's failed-key budget."""
    n = next(_addresses)
    return {"x-forwarded-for": f"10.200.{n // 250}.{n % 250 + 1}"}


@pytest.fixture(scope="module")
def door(
    module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    env = {
        "VQ_GATEWAY_MAX_BODY_BYTES": str(MAX_BODY),
        "VQ_GATEWAY_AUTH_FAILURES_PER_MINUTE": str(FAILURES),
        "VQ_GATEWAY_REQUESTS_PER_MINUTE": "0",
    }
    with GatewayProcess(module_redis.url, tmp_path_factory.mktemp("door"), **env) as process:
        yield process


def rss_kib(gateway: GatewayProcess) -> int:
    assert gateway.process is not None
    status = open(f"/proc/{gateway.process.pid}/status").read()  # noqa: SIM115
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def raw_request(gateway: GatewayProcess, head: bytes, body_chunks: int = 0) -> tuple[bytes, int]:
    """Send `head`, then up to `body_chunks` chunks of 64 KiB while the server reads; the
    answer's first bytes and how many chunks went out before it answered or hung up."""
    sent = 0
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        answer = b""
        chunk = b"x" * 65536
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                answer += sock.recv(65536)
                if answer:
                    break
            except BlockingIOError:
                pass
            except OSError:
                break
            if sent < body_chunks:
                try:
                    sock.send(chunk)
                    sent += 1
                except (BlockingIOError, OSError):
                    time.sleep(0.01)
            else:
                time.sleep(0.01)
        return answer, sent


# 1. Order of work at the door ------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789abcdef"])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/tasks"),
        ("GET", "/v1/models"),
        ("DELETE", "/v1/tasks/x"),
        ("POST", "/v1/nowhere"),
    ],
)
def test_a_malformed_body_without_a_valid_key_is_401_on_every_route(
    door: GatewayProcess, key: str | None, method: str, path: str
) -> None:
    headers = {"content-type": "application/json", "x-forwarded-for": f"10.9.{len(path)}.1"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    answer = httpx.request(method, door.url(path), content=b'{"bad', headers=headers)
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"


def test_a_huge_body_without_a_key_is_refused_after_the_headers_unread(
    door: GatewayProcess,
) -> None:
    before = rss_kib(door)
    size = 64 * 1024 * 1024
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Forwarded-For: 10.1.1.1\r\nContent-Length: " + str(size).encode() + b"\r\n\r\n"
    )
    answer, sent = raw_request(door, head, body_chunks=size // 65536)
    assert answer.startswith(b"HTTP/1.1 401")
    assert b"connection: close" in answer.lower()
    # The answer came long before the 64 MiB: at most what socket buffers hold went out.
    assert sent < 512
    assert rss_kib(door) - before < 32 * 1024


def test_a_body_over_the_routes_cap_is_refused_while_it_streams_in(
    door: GatewayProcess,
) -> None:
    # Chunked, so no Content-Length announces it: counted as it arrives.
    head = (
        b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"
    with socket.create_connection(("127.0.0.1", door.port), timeout=30) as sock:
        sock.sendall(head)
        sent = 0
        answer = b""
        sock.settimeout(0.05)
        while sent < 1024 and not answer:  # up to 64 MiB offered
            try:
                sock.sendall(chunk)
                sent += 1
            except OSError:
                pass
            with contextlib.suppress(TimeoutError, OSError):
                answer = sock.recv(65536)
        sock.settimeout(30)
        answer += sock.recv(65536) if b"\r\n\r\n" not in answer else b""
    assert answer.startswith(b"HTTP/1.1 413")
    assert sent * 65536 < MAX_BODY + 8 * 1024 * 1024  # stopped near the cap, not at the end


def test_a_route_without_a_body_refuses_a_declared_one(door: GatewayProcess) -> None:
    answer = httpx.request(
        "GET", door.url("/v1/models"), content=b"x" * 5000, headers=AUTH
    )
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "request_too_large"


def test_failed_keys_from_one_address_are_limited_and_others_are_not(
    door: GatewayProcess,
) -> None:
    attacker = {"x-forwarded-for": "10.77.0.1", "authorization": "Bearer nope-0123456789abcdefgh"}
    codes = [
        httpx.get(door.url("/v1/models"), headers=attacker).status_code for _ in range(FAILURES)
    ]
    assert codes == [401] * FAILURES
    refused = httpx.get(door.url("/v1/models"), headers=attacker)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # Past the budget even a valid key from that address waits (no oracle for guesses),
    both = {**AUTH, "x-forwarded-for": "10.77.0.1"}
    assert httpx.get(door.url("/v1/models"), headers=both).status_code == 429
    # while callers at other addresses are served as before.
    other = {**AUTH, "x-forwarded-for": "10.77.0.2"}
    assert httpx.get(door.url("/v1/models"), headers=other).status_code == 200


def test_a_body_of_countless_json_values_is_refused_before_parsing(door: GatewayProcess) -> None:
    # Validation holds the GIL however it is threaded: 400,000 small objects took 2 s.
    many = b'{"model": "x", "messages": [' + b"{}," * 300_000 + b"{}]}"
    assert len(many) < MAX_BODY
    for path in ("/v1/chat/completions", "/v1/tasks"):
        answer = httpx.post(door.url(path), content=many, headers={**AUTH, **JSON})
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == "body"


def test_large_json_is_parsed_while_health_checks_keep_answering(door: GatewayProcess) -> None:
    import threading

    text = "a" * 900_000  # one large string: parsed at C speed, off the loop
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": text}]}).encode()
    assert len(body) < MAX_BODY
    slowest = 0.0
    done = threading.Event()

    def probe() -> None:
        nonlocal slowest
        while not done.is_set():
            began = time.monotonic()
            assert httpx.get(door.url("/healthz"), timeout=30).status_code == 200
            slowest = max(slowest, time.monotonic() - began)

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        for _ in range(5):
            answer = httpx.post(door.url("/v1/chat/completions"), content=body, headers=AUTH)
            assert answer.status_code == 404  # parsed, then: unknown model
    finally:
        done.set()
        thread.join()
    assert slowest < 10  # generous: the point is that it never waits for a parse to end


def test_a_flood_of_readiness_probes_costs_redis_one_probe_a_second(
    door: GatewayProcess, module_redis: RedisServer
) -> None:
    admin = module_redis.client()

    def probes() -> int:  # the readiness probe's write, counted by Redis itself
        stats = admin.info("commandstats")
        return int(stats.get("cmdstat_set", {}).get("calls", 0))

    try:
        before = probes()
        began = time.monotonic()
        with httpx.Client(base_url=door.base_url) as client:
            codes = {client.get("/readyz/redis").status_code for _ in range(300)}
        elapsed = time.monotonic() - began
        assert codes == {200}
        assert probes() - before <= elapsed + 2  # not 300
    finally:
        admin.close()


# 3. Metrics and logs ---------------------------------------------------------------------


def test_metric_labels_stay_a_bounded_set(door: GatewayProcess) -> None:
    for index in range(40):
        httpx.request(f"M{index}X", door.url(f"/random/{index}"))
        httpx.get(door.url(f"/v1/tasks/{index}/nothing"), headers=AUTH)
        httpx.get(door.url(f"/v1/x{index}"), headers=fresh())  # refused before routing
    text = httpx.get(door.url("/metrics")).text
    lines = [line for line in text.splitlines() if line.startswith("vq_gateway_requests_total")]
    methods = set(re.findall(r'method="([^"]*)"', "\n".join(lines)))
    routes = set(re.findall(r'route="([^"]*)"', "\n".join(lines)))
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER"}
    assert "OTHER" in methods
    assert not any(re.search(r"random|nothing|/x[0-9]", route) for route in routes)
    assert len(routes) < 20 and len(lines) < 100  # 120 distinct requests, a few series
    assert "unmatched" in routes


def test_keys_never_reach_the_log_and_caller_text_is_clipped(door: GatewayProcess) -> None:
    secret = "sk-query-secret-0123456789"
    httpx.get(door.url(f"/v1/models?api_key={secret}&key={secret}"), headers=fresh())
    httpx.get(door.url("/v1/models"), headers={"X-Odd-Key": secret, "api-key": secret, **fresh()})
    httpx.get(door.url("/v1/models"), headers={"Authorization": f"Bearer {secret}", **fresh()})
    httpx.get(door.url("/v1/models"), headers={"X-API-Key": secret, **fresh()})
    long_path = "/v1/" + "a" * 5000
    httpx.get(door.url(long_path), headers=AUTH)
    time.sleep(0.5)
    log = door.log()
    assert secret not in log
    assert "a" * 300 not in log
    assert max(len(line) for line in log.splitlines()) < 1000


def test_a_flood_of_bad_requests_writes_a_few_lines_not_one_each(door: GatewayProcess) -> None:
    before = door.log().count("Invalid HTTP request")
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", door.port), timeout=10) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            sock.recv(1024)
    for _ in range(200):
        httpx.get(door.url("/v1/models"), headers={"x-forwarded-for": "10.55.0.9"})
    time.sleep(0.5)
    log = door.log()
    assert log.count("Invalid HTTP request") - before <= 5
    assert "Traceback" not in log
    refusals = [line for line in log.splitlines() if "10.55.0.9" in line]
    assert len(refusals) <= 5


# 6. Headers of every answer ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/healthz", {}, 200),
        ("GET", "/v1/models", AUTH, 200),
        ("GET", "/v1/models", {"x-forwarded-for": "10.201.0.1"}, 401),
        ("GET", "/nowhere", {}, 404),
        ("GET", "/v1/models", {**AUTH, "content-length": "99999"}, 413),
    ],
)
def test_every_answer_carries_a_request_id(
    door: GatewayProcess, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as sock:
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
        answer = sock.recv(65536).decode()
    assert answer.startswith(f"HTTP/1.1 {status}")
    assert re.search(r"(?im)^x-request-id: [0-9a-f]{32}\r$", answer)


def test_a_callers_request_id_is_echoed_only_when_it_is_a_plain_token(
    door: GatewayProcess,
) -> None:
    echoed = httpx.get(door.url("/healthz"), headers={"x-request-id": "trace-42.a:b"})
    assert echoed.headers["x-request-id"] == "trace-42.a:b"
    replaced = httpx.get(door.url("/healthz"), headers={"x-request-id": "a b<script>" * 10})
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", '{"model":"m","messages":[{"role":"user",'
         '"content":"a\\ud800b"}]}'),
        ("/v1/chat/completions", '{"model":"m","user":"\\udc00","messages":[{"role":"user",'
         '"content":"hi"}]}'),
        ("/v1/chat/completions", '{"model":"m","stop":["\\ud800"],"messages":[{"role":"user",'
         '"content":"hi"}]}'),
        ("/v1/tasks", '{"task":"ask","prompt":"x\\ud800"}'),
        ("/v1/tasks", '{"task":"ask","prompt":"x","callback_url":"https://a.example/\\udfff"}'),
    ],
)
def test_text_with_a_lone_surrogate_is_refused_in_every_field(
    door: GatewayProcess, path: str, body: str
) -> None:
    answer = httpx.post(door.url(path), content=body.encode(), headers={**AUTH, **JSON})
    assert answer.status_code == 400
    assert "UTF-8" in answer.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/tasks/", "/v1/models/", "/healthz/"])
def test_no_redirect_is_built_from_the_host_header(door: GatewayProcess, path: str) -> None:
    answer = httpx.get(
        door.url(path), headers={**AUTH, "host": "evil.example"}, follow_redirects=False
    )
    assert answer.status_code == 404
    assert "location" not in answer.headers
