"""The gateway when it cannot get work done: no worker, Redis down, a wrong Redis password.

Readiness says so, API calls answer 503 within the connect timeout instead of hanging,
and the gateway recovers by itself when Redis comes back. No worker runs in this module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_support import API_KEY, MODEL, GatewayProcess
from support.redis_server import PASSWORD, RedisServer

pytestmark = pytest.mark.timeout(300)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# base_env gives the gateway VQ_CONNECT_TIMEOUT_S=3; a call may take that plus a little.
BOUND_S = 3 + 7


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def lonely_gateway(own_redis: RedisServer, tmp_path: Path) -> Iterator[GatewayProcess]:
    with GatewayProcess(own_redis.url, tmp_path) as process:
        yield process


def calls(gateway: GatewayProcess) -> list[httpx.Response]:
    chat = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=gateway.base_url, headers=AUTH, timeout=60) as http:
        return [
            http.get("/v1/models"),
            http.post("/v1/tasks", json={"task": "ask", "prompt": "hi"}),
            http.post("/v1/chat/completions", json=chat),
            http.get("/v1/tasks/5b0e7f3c-2f7a-4d0c-9a51-7d1f3c1e8a10"),
        ]


def test_without_a_live_worker_the_gateway_is_alive_but_not_ready(
    lonely_gateway: GatewayProcess,
):
    assert httpx.get(lonely_gateway.url("/healthz")).status_code == 200
    ready = httpx.get(lonely_gateway.url("/readyz"))
    assert ready.status_code == 503
    assert ready.json() == {
        "queue": "gpu",
        "status": "unready",
        "reason": "no live worker on queue gpu",
        "workers": 0,
    }


def test_with_redis_down_every_call_answers_503_in_bounded_time_then_recovers(
    lonely_gateway: GatewayProcess, own_redis: RedisServer
):
    own_redis.stop()
    began = time.monotonic()
    answers = calls(lonely_gateway)
    took = time.monotonic() - began

    assert [a.status_code for a in answers] == [503] * 4
    assert {a.json()["error"]["code"] for a in answers} == {"unavailable"}
    assert took < BOUND_S * len(answers)
    assert PASSWORD not in " ".join(a.text for a in answers)
    ready = httpx.get(lonely_gateway.url("/readyz"), timeout=60)
    assert ready.status_code == 503 and ready.json()["reason"] == "Redis is unreachable"
    assert httpx.get(lonely_gateway.url("/healthz")).status_code == 200

    own_redis.start()  # same port: the gateway reconnects on its own
    assert httpx.get(lonely_gateway.url("/v1/models"), headers=AUTH).status_code == 200


def test_a_wrong_redis_password_is_reported_as_such_to_the_operator(
    own_redis: RedisServer, tmp_path: Path
):
    wrong = own_redis.url.replace(PASSWORD, "not-the-password")
    with GatewayProcess(wrong, tmp_path) as gateway:
        ready = httpx.get(gateway.url("/readyz"), timeout=60)
        assert ready.status_code == 503
        assert ready.json()["reason"] == "Redis refused the password"
        answer = httpx.get(gateway.url("/v1/models"), headers=AUTH, timeout=60)
        assert answer.status_code == 503
        assert "not-the-password" not in answer.text + gateway.log()


def test_a_callback_url_is_refused_where_webhooks_cannot_be_signed(
    own_redis: RedisServer, tmp_path: Path
):
    with GatewayProcess(own_redis.url, tmp_path, VQ_WEBHOOK_SECRET="") as gateway:
        answer = httpx.post(
            gateway.url("/v1/tasks"),
            headers=AUTH,
            json={"task": "ask", "prompt": "hi", "callback_url": "https://hooks.example.com/x"},
        )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "callback_url"
    assert "VQ_WEBHOOK_SECRET" in answer.json()["error"]["message"]
