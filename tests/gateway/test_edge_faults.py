"""Truthful errors under load and faults (issue #19, class 5), on a real gateway, a real
worker and redis-server: a burst gets answers or 429, never a false "unreachable"; a full
Redis is named as such while stored results stay readable; a bad stream cursor is the
caller's mistake; an AsyncClient on a second event loop says so at once.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator

import httpx
import pytest
from gateway_support import API_KEY, MODEL, GatewayProcess, data_uri, wait_for_result
from support.redis_server import RedisServer

from producer import AsyncClient, Client
from vision_queue.errors import InvalidInput
from vision_queue.settings import Settings

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def narrow(
    module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """A gateway with two Redis connections per pool and no per-key limits: a burst of
    hundreds must wait for connections, not fail."""
    env = {
        "VQ_GATEWAY_REDIS_CONNECTIONS": "2",
        "VQ_GATEWAY_REQUESTS_PER_MINUTE": "0",
        "VQ_GATEWAY_MAX_TASKS_PER_KEY": "0",
        "VQ_QUEUE": "burst",  # no worker takes these: the module's worker stays free
    }
    with GatewayProcess(module_redis.url, tmp_path_factory.mktemp("narrow"), **env) as gw:
        yield gw


def test_a_burst_of_valid_requests_gets_answers_or_429_never_503(narrow: GatewayProcess) -> None:
    async def burst() -> list[httpx.Response]:
        # A connection per request, none kept alive: reusing one the server is closing as
        # idle (HTTP/1.1's keep-alive race, which a slow client loop makes likely) is not
        # what this test is about.
        limits = httpx.Limits(max_connections=320, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=narrow.base_url, headers=AUTH, limits=limits, timeout=120
        ) as client:
            calls = [
                client.post("/v1/tasks", json={"task": "ask", "prompt": f"question {n}"})
                for n in range(300)
            ]
            calls += [client.get("/readyz/redis") for _ in range(20)]
            return list(await asyncio.gather(*calls))

    answers = asyncio.run(burst())
    codes = collections.Counter(answer.status_code for answer in answers)
    assert set(codes) <= {200, 202, 429}, codes
    assert codes[202] >= 1
    for answer in answers:
        if answer.status_code == 429:
            assert int(answer.headers["retry-after"]) >= 1
    assert "unreachable" not in narrow.log()


def test_a_full_redis_is_named_and_stored_results_stay_readable(
    gateway: GatewayProcess, module_redis: RedisServer, api: httpx.Client
) -> None:
    accepted = api.post("/v1/tasks", json={"task": "describe", "images": [{"data": data_uri()}]})
    assert accepted.status_code == 202
    task_id = accepted.json()["id"]
    finished = wait_for_result(api, task_id, timeout_s=300)
    assert finished["state"] == "SUCCESS"

    admin = module_redis.client()
    policy = admin.config_get("maxmemory-policy")["maxmemory-policy"]
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", str(max(1, used // 2)))  # below what it holds: full
    try:
        refused = api.post("/v1/tasks", json={"task": "ask", "prompt": "more?"})
        assert refused.status_code == 507, refused.text
        assert refused.json()["error"]["code"] == "queue_out_of_memory"
        assert "out of memory" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1

        chat = api.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert chat.status_code == 507

        ready = httpx.get(gateway.url("/readyz"))
        assert ready.status_code == 503
        assert "out of memory" in ready.json()["reason"]

        # Reading what is stored keeps working: status, result, events.
        read = api.get(f"/v1/tasks/{task_id}")
        assert read.status_code == 200
        assert read.json()["state"] == "SUCCESS"
        with api.stream("GET", f"/v1/tasks/{task_id}/events") as events:
            assert events.status_code == 200
            assert "event: end" in "".join(events.iter_text())
    finally:
        admin.config_set("maxmemory", "0")
        admin.config_set("maxmemory-policy", policy)
        admin.close()
    time.sleep(1.5)  # past the probe's one-second cache
    assert httpx.get(gateway.url("/readyz")).status_code == 200


@pytest.mark.parametrize(
    ("header", "query", "param"),
    [("garbage", None, "Last-Event-ID"), (None, "(1-0", "after"), (None, "1-0-0", "after")],
)
def test_a_cursor_that_does_not_parse_is_400_naming_it(
    narrow: GatewayProcess, header: str | None, query: str | None, param: str
) -> None:
    body = {"task": "ask", "prompt": "x"}
    accepted = httpx.post(narrow.url("/v1/tasks"), headers=AUTH, json=body)
    task_id = accepted.json()["id"]
    headers = {**AUTH, **({"last-event-id": header} if header else {})}
    params = {"after": query} if query else {}
    answer = httpx.get(narrow.url(f"/v1/tasks/{task_id}/events"), headers=headers, params=params)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param
    assert "unreachable" not in narrow.log()


def test_clients_refuse_a_bad_cursor_as_the_callers_error(module_redis: RedisServer) -> None:
    settings = Settings.from_env({}, redis_url=module_redis.url, connect_timeout_s=3.0)
    with Client(settings) as client, pytest.raises(InvalidInput) as caught:
        next(iter(client.stream_events("5b0e7f3c-2f7a-4d0c-9a51-7d1f3c1e8a10", after="garbage")))
    assert caught.value.field == "after"

    async def follow() -> None:
        async with AsyncClient(settings) as client:
            async for _ in client.stream_events("5b0e7f3c-2f7a-4d0c-9a51-7d1f3c1e8a10", "x"):
                break

    with pytest.raises(InvalidInput):
        asyncio.run(follow())


def test_an_async_client_on_a_second_event_loop_fails_at_once(module_redis: RedisServer) -> None:
    settings = Settings.from_env({}, redis_url=module_redis.url, connect_timeout_s=3.0)
    client = AsyncClient(settings)
    asyncio.run(client.live_workers())  # first loop: fine
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="another event loop"):
        asyncio.run(client.live_workers())
    with pytest.raises(RuntimeError, match="another event loop"):
        asyncio.run(client.status("5b0e7f3c-2f7a-4d0c-9a51-7d1f3c1e8a10"))
    with pytest.raises(RuntimeError, match="another event loop"):
        asyncio.run(client.submit("ask", [], "hi"))
    assert time.monotonic() - began < 5  # at once, not after a connection timeout
