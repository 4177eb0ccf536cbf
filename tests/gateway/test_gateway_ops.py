"""Running the gateway: several processes, limits, the body cap, CORS, probes, metrics,
callers that disconnect, and Redis going away. Real processes throughout."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from gateway_support import (
    API_KEY,
    ENDLESS,
    MODEL,
    OTHER_KEY,
    GatewayProcess,
    data_uri,
    submitted_count,
    wait_for_result,
)
from support.redis_server import RedisServer
from support.workers import WorkerProcess

pytestmark = pytest.mark.timeout(300)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Limits live in Redis per key: the limit tests use keys of their own.
RATE_KEY = "vq-rate-limited-key-0123456789"
TASKS_KEY = "vq-task-limited-key-0123456789"


@pytest.fixture
def second_gateway(
    module_redis: RedisServer, shared_worker: WorkerProcess, tmp_path: Path
) -> Iterator[GatewayProcess]:
    with GatewayProcess(module_redis.url, tmp_path) as process:
        yield process


def ask(prompt: str, budget: int) -> dict:
    return {"task": "ask", "prompt": prompt, "options": {"max_new_tokens": budget}}


def test_two_gateways_share_only_redis(gateway: GatewayProcess, second_gateway: GatewayProcess):
    # A task queued through one process is followed and cancelled through the other.
    accepted = httpx.post(gateway.url("/v1/tasks"), json=ask("Hi.", 4), headers=AUTH)
    assert accepted.status_code == 202
    task_id = accepted.json()["id"]
    with httpx.Client(base_url=second_gateway.base_url, headers=AUTH, timeout=60) as other:
        result = wait_for_result(other, task_id)
        assert result["state"] == "SUCCESS"
        long = gateway_post(gateway, ask("Go on forever.", ENDLESS))
        assert other.delete(f"/v1/tasks/{long}").status_code == 202
        assert wait_for_result(other, long)["error"]["code"] == "cancelled"


def gateway_post(gateway: GatewayProcess, body: dict, headers: dict = AUTH) -> str:
    answer = httpx.post(gateway.url("/v1/tasks"), json=body, headers=headers, timeout=60)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def test_the_request_rate_of_a_key_holds_across_gateways(
    module_redis: RedisServer, shared_worker: WorkerProcess, tmp_path: Path
):
    limits = {
        "VQ_API_KEYS": f"{RATE_KEY},{API_KEY}",
        "VQ_GATEWAY_REQUESTS_PER_MINUTE": "30",
        "VQ_GATEWAY_REQUEST_BURST": "4",
    }
    limited = {"Authorization": f"Bearer {RATE_KEY}"}
    with GatewayProcess(module_redis.url, tmp_path, **limits) as one, GatewayProcess(
        module_redis.url, tmp_path, **limits
    ) as two:
        # Given a burst of 4 spent through two gateways in turn,
        statuses = [
            httpx.get(gw.url("/v1/models"), headers=limited).status_code
            for gw in (one, two, one, two)
        ]
        assert statuses == [200] * 4
        # the next request is refused by either, while another key is unaffected.
        refused = httpx.get(two.url("/v1/models"), headers=limited)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["Retry-After"]) <= 2  # one request every 2 s
        assert httpx.get(one.url("/v1/models"), headers=AUTH).status_code == 200


def test_unfinished_tasks_per_key_are_limited_across_gateways(
    module_redis: RedisServer, shared_worker: WorkerProcess, tmp_path: Path
):
    limit = {"VQ_API_KEYS": TASKS_KEY, "VQ_GATEWAY_MAX_TASKS_PER_KEY": "1"}
    auth = {"Authorization": f"Bearer {TASKS_KEY}"}
    with GatewayProcess(module_redis.url, tmp_path, **limit) as one, GatewayProcess(
        module_redis.url, tmp_path, **limit
    ) as two, httpx.Client(headers=auth, timeout=60) as http:
        # Given a key's one task running, queued through the first gateway,
        running = gateway_post(one, ask("Go on forever.", ENDLESS), auth)
        # a second, through the other gateway, is refused until that one ends;
        refused = http.post(two.url("/v1/tasks"), json=ask("Me too.", 2))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_tasks"
        assert int(refused.headers["Retry-After"]) >= 1
        http.delete(two.url(f"/v1/tasks/{running}"))
        # then it is accepted; and once a task ends on the worker, its slot is free again.
        short = gateway_post(two, ask("Short.", 2), auth)
        with httpx.Client(base_url=one.base_url, headers=auth, timeout=60) as api:
            assert wait_for_result(api, short)["state"] == "SUCCESS"
        assert http.post(one.url("/v1/tasks"), json=ask("Next.", 2)).status_code == 202


def test_a_body_over_the_cap_is_refused_whether_or_not_it_says_its_size(
    module_redis: RedisServer, shared_worker: WorkerProcess, tmp_path: Path
):
    with GatewayProcess(module_redis.url, tmp_path, VQ_GATEWAY_MAX_BODY_BYTES="50000") as gw:
        body = json.dumps({"task": "describe", "images": [{"data": data_uri()}]}).encode()
        assert len(body) > 50_000
        headers = {**AUTH, "Content-Type": "application/json"}
        declared = httpx.post(gw.url("/v1/tasks"), content=body, headers=headers)
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # chunked: no Content-Length at all
            for start in range(0, len(body), 8192):
                yield body[start : start + 8192]

        streamed = httpx.post(gw.url("/v1/tasks"), content=chunks(), headers=headers)
        assert streamed.status_code == 413
        assert streamed.json()["error"]["code"] == "request_too_large"


def test_cors_is_off_unless_origins_are_configured(
    gateway: GatewayProcess, module_redis: RedisServer, tmp_path: Path
):
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    closed = httpx.options(gateway.url("/v1/chat/completions"), headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    plain = httpx.get(gateway.url("/v1/models"), headers={**AUTH, "Origin": preflight["Origin"]})
    assert "access-control-allow-origin" not in plain.headers

    env = {"VQ_GATEWAY_CORS_ORIGINS": "https://app.example.com"}
    with GatewayProcess(module_redis.url, tmp_path, **env) as gw:
        opened = httpx.options(gw.url("/v1/chat/completions"), headers=preflight)
        assert opened.headers["access-control-allow-origin"] == "https://app.example.com"
        stranger = httpx.options(
            gw.url("/v1/chat/completions"), headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in stranger.headers


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/tasks"),
        ("GET", "/v1/tasks/5b0e7f3c-2f7a-4d0c-9a51-7d1f3c1e8a10"),
        ("GET", "/v1/tasks/5b0e7f3c-2f7a-4d0c-9a51-7d1f3c1e8a10/events"),
        ("DELETE", "/v1/tasks/5b0e7f3c-2f7a-4d0c-9a51-7d1f3c1e8a10"),
    ],
)
def test_every_api_route_needs_a_valid_key(gateway: GatewayProcess, method: str, path: str):
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"X-API-Key": "x"}):
        answer = httpx.request(method, gateway.url(path), headers=headers, json={})
        assert answer.status_code == 401
        assert answer.json()["error"] == {
            "message": answer.json()["error"]["message"],
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
        assert answer.headers["www-authenticate"] == "Bearer"
    assert httpx.get(gateway.url("/v1/models"), headers={"X-API-Key": API_KEY}).status_code == 200


def test_unknown_routes_and_methods_answer_in_the_error_shape(gateway: GatewayProcess):
    missing = httpx.get(gateway.url("/v1/nothing-here"), headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.put(gateway.url("/v1/models"), headers=AUTH)
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_the_probes_say_whether_the_gateway_can_get_work_done(
    gateway: GatewayProcess, shared_worker: WorkerProcess
):
    assert httpx.get(gateway.url("/healthz")).json() == {"status": "ok"}
    ready = httpx.get(gateway.url("/readyz"))
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready" and ready.json()["workers"] >= 1


def test_metrics_count_requests_by_route_template_and_status(gateway: GatewayProcess):
    httpx.get(gateway.url("/v1/models"), headers=AUTH)
    httpx.get(gateway.url("/v1/tasks/5b0e7f3c-2f7a-4d0c-9a51-7d1f3c1e8a10"), headers=AUTH)
    httpx.get(gateway.url("/v1/models"))  # no key

    text = httpx.get(gateway.url("/metrics")).text

    def count(route: str, method: str, status: int) -> float:
        prefix = f'vq_gateway_requests_total{{method="{method}",route="{route}",status="{status}"}}'
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(lines[0].split()[-1]) if lines else 0.0

    assert count("/v1/models", "GET", 200) >= 1
    assert count("/v1/models", "GET", 401) >= 1
    assert count("/v1/tasks/{task_id}", "GET", 404) >= 1  # the template, not the id
    assert "5b0e7f3c" not in text
    assert API_KEY not in text


def test_a_caller_that_disconnects_cancels_its_completion(
    gateway: GatewayProcess, module_redis: RedisServer, api: httpx.Client
):
    before = owned_tasks(module_redis)
    body = json.dumps(
        {"model": MODEL, "max_tokens": ENDLESS,
         "messages": [{"role": "user", "content": "Tell an endless story."}]}
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        task_id = running_task(api, module_redis, before)
    # The socket is closed: nobody will read the answer, so the task is cancelled.
    result = wait_for_result(api, task_id)
    assert result["state"] == "FAILURE" and result["error"]["code"] == "cancelled"


def test_a_streaming_caller_that_disconnects_cancels_its_completion(
    gateway: GatewayProcess, api: httpx.Client
):
    request = {"model": MODEL, "max_tokens": ENDLESS, "stream": True,
               "messages": [{"role": "user", "content": "Tell an endless story."}]}
    with api.stream("POST", "/v1/chat/completions", json=request) as response:
        task_id = response.headers["x-task-id"]
        for line in response.iter_lines():
            if '"content"' in line:
                break  # text is flowing; now hang up
    result = wait_for_result(api, task_id)
    assert result["state"] == "FAILURE" and result["error"]["code"] == "cancelled"


def test_a_wait_past_its_timeout_answers_504_and_cancels_the_task(
    module_redis: RedisServer, shared_worker: WorkerProcess, tmp_path: Path, api: httpx.Client
):
    with GatewayProcess(module_redis.url, tmp_path, VQ_GATEWAY_WAIT_TIMEOUT_S="1") as gw:
        answer = httpx.post(
            gw.url("/v1/chat/completions"),
            headers=AUTH,
            timeout=60,
            json={"model": MODEL, "max_tokens": ENDLESS,
                  "messages": [{"role": "user", "content": "Tell an endless story."}]},
        )
    assert answer.status_code == 504
    assert answer.json()["error"]["code"] == "timeout"
    result = wait_for_result(api, answer.headers["x-task-id"])
    assert result["error"]["code"] == "cancelled"


def test_keys_never_reach_the_log(gateway: GatewayProcess):
    log = gateway.log()
    assert "GET /v1/models" in log  # the access log is there,
    assert API_KEY not in log and OTHER_KEY not in log  # the keys are not


def owned_tasks(server: RedisServer) -> set[str]:
    client = redis.Redis.from_url(server.url)
    try:
        return {key.decode().rsplit(":", 1)[-1] for key in client.scan_iter("vq:gw:owner:*")}
    finally:
        client.close()


def running_task(api: httpx.Client, server: RedisServer, before: set[str]) -> str:
    """The one task queued since `before`, once it is generating."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = owned_tasks(server) - before
        if new:
            (task_id,) = new
            status = api.get(f"/v1/tasks/{task_id}").json()
            if status["state"] == "PROGRESS" and status["tokens"] > 0:
                return task_id
        time.sleep(0.05)
    raise TimeoutError("the completion's task never started generating")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_answers_the_request_in_flight_then_exits_0(
    module_redis: RedisServer, tmp_path: Path, signum: int
):
    # Given a gateway with a completion in flight: its task waits on a queue no worker reads
    env = {"VQ_QUEUE": "nobody-reads-this", "VQ_GATEWAY_WAIT_TIMEOUT_S": "3"}
    with GatewayProcess(module_redis.url, tmp_path, **env) as process:
        assert process.process is not None
        before = submitted_count(module_redis.url)
        answers: list[httpx.Response] = []
        caller = threading.Thread(
            target=lambda: answers.append(
                httpx.post(
                    process.url("/v1/chat/completions"),
                    headers=AUTH,
                    json={"model": MODEL, "messages": [{"role": "user", "content": "Hi."}]},
                    timeout=60,
                )
            )
        )
        caller.start()
        deadline = time.monotonic() + 30
        while submitted_count(module_redis.url) == before:
            assert time.monotonic() < deadline, process.log()[-2000:]
            time.sleep(0.05)
        # When it is told to stop, as a supervisor does
        process.process.send_signal(signum)
        # Then the caller still gets its answer (the wait's own timeout), and the process
        # exits 0 after that, not killed by the signal (143 for SIGTERM)
        caller.join(timeout=60)
        assert answers and answers[0].status_code == 504, answers
        assert process.process.wait(timeout=60) == 0, process.log()[-2000:]
