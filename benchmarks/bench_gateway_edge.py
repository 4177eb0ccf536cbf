"""The gateway's HTTP edge under hostile traffic: the figures of docs/security.md (issue #19).

Starts redis-server and one `producer serve` (the tests' helpers, loopback only, no
worker), then probes: a large body without a key, 2,000 idle connections, odd methods
and paths against the metrics, 1,000 concurrent valid submissions, a body of 400,000
small JSON objects while a health check polls, and a flood of bad requests against the
log. Prints JSON. Run from the root of the checkout to measure:

    PYTHONPATH=. .venv/bin/python benchmarks/bench_gateway_edge.py

For "before" figures, run it with PYTHONPATH pointing at an older checkout's root (the
helpers are imported from ./tests). Not a timed test: the figures go to docs/security.md
by hand.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path[:0] = ["tests", "tests/gateway"]
from gateway_support import API_KEY, GatewayProcess  # noqa: E402
from support.redis_server import RedisServer  # noqa: E402

AUTH = {"authorization": f"Bearer {API_KEY}"}
JSON = {"content-type": "application/json"}
ENV = {
    "VQ_GATEWAY_REQUESTS_PER_MINUTE": "0",
    "VQ_GATEWAY_MAX_TASKS_PER_KEY": "0",
    "VQ_QUEUE": "edge-bench",
}


def rss_mb(gateway: GatewayProcess) -> int:
    assert gateway.process is not None
    status = Path(f"/proc/{gateway.process.pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+)", status)
    return int(found.group(1)) // 1024 if found else 0


def fds(gateway: GatewayProcess) -> int:
    assert gateway.process is not None
    return sum(1 for _ in Path(f"/proc/{gateway.process.pid}/fd").iterdir())


def many_messages(count: int) -> bytes:
    one = b'{"role":"user","content":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},'
    return (b'{"model":"x","messages":[' + one * count)[:-1] + b"]}"


def no_key_body(gateway: GatewayProcess) -> dict[str, Any]:
    body = many_messages(800_000)
    before, began = rss_mb(gateway), time.monotonic()
    url = gateway.url("/v1/chat/completions")
    answer = httpx.post(url, content=body, headers=JSON, timeout=120)
    return {
        "size_mb": round(len(body) / 1e6, 1),
        "status": answer.status_code,
        "seconds": round(time.monotonic() - began, 2),
        "rss_growth_mb": rss_mb(gateway) - before,
    }


def idle_connections(gateway: GatewayProcess, count: int = 2000) -> dict[str, Any]:
    before = fds(gateway)
    held: list[socket.socket] = []
    for _ in range(count):
        try:
            held.append(socket.create_connection(("127.0.0.1", gateway.port), timeout=5))
        except OSError:
            break
    time.sleep(1)
    began = time.monotonic()
    health = httpx.get(gateway.url("/healthz"), timeout=30).status_code
    result = {
        "opened": len(held),
        "descriptors_added": fds(gateway) - before,
        "healthz": health,
        "healthz_s": round(time.monotonic() - began, 2),
    }
    time.sleep(12)
    result["descriptors_added_after_12s"] = fds(gateway) - before
    for sock in held:
        sock.close()
    return result


def metric_series(gateway: GatewayProcess) -> dict[str, Any]:
    for index in range(300):
        httpx.request(f"X{index}", gateway.url(f"/p/{index}"))
    text = httpx.get(gateway.url("/metrics")).text
    lines = [line for line in text.splitlines() if line.startswith("vq_gateway_requests_total")]
    return {"series": len(lines)}


def burst(gateway: GatewayProcess, count: int = 1000) -> dict[str, Any]:
    async def run() -> collections.Counter[int | str]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(
            base_url=gateway.base_url, headers=AUTH, limits=limits, timeout=120
        ) as client:

            async def one(index: int) -> int | str:
                try:
                    body = {"task": "ask", "prompt": f"question {index}"}
                    return (await client.post("/v1/tasks", json=body)).status_code
                except httpx.HTTPError as exc:
                    return type(exc).__name__

            return collections.Counter(await asyncio.gather(*(one(i) for i in range(count))))

    began = time.monotonic()
    codes = asyncio.run(run())
    seconds = round(time.monotonic() - began, 1)
    return {"codes": {str(k): v for k, v in codes.items()}, "seconds": seconds}


def countless_values(gateway: GatewayProcess) -> dict[str, Any]:
    body = many_messages(400_000)
    slowest = 0.0
    done = threading.Event()

    def probe() -> None:
        nonlocal slowest
        while not done.is_set():
            began = time.monotonic()
            httpx.get(gateway.url("/healthz"), timeout=60)
            slowest = max(slowest, time.monotonic() - began)
            time.sleep(0.02)

    thread = threading.Thread(target=probe)
    thread.start()
    began = time.monotonic()
    answer = httpx.post(
        gateway.url("/v1/chat/completions"), content=body, headers={**AUTH, **JSON}, timeout=120
    )
    done.set()
    thread.join()
    return {
        "size_mb": round(len(body) / 1e6, 1),
        "status": answer.status_code,
        "seconds": round(time.monotonic() - began, 2),
        "slowest_healthz_s": round(slowest, 3),
    }


def log_flood(gateway: GatewayProcess) -> dict[str, Any]:
    before = gateway.log().count("\n")
    for _ in range(1000):
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(b"BAD\r\n\r\n")
            with contextlib.suppress(OSError):
                sock.recv(100)
    for _ in range(1000):
        httpx.get(gateway.url("/v1/models"), headers={"x-forwarded-for": "10.3.3.3"})
    time.sleep(0.5)
    return {"requests": 2000, "log_lines": gateway.log().count("\n") - before}


def main() -> None:
    with (
        tempfile.TemporaryDirectory() as work,
        RedisServer(Path(work)) as redis_server,
        GatewayProcess(redis_server.url, Path(work), **ENV) as gateway,
    ):
        figures = {
            "no_key_body": no_key_body(gateway),
            "idle_connections": idle_connections(gateway),
            "metric_series_after_300_odd_requests": metric_series(gateway),
            "burst_of_valid_submissions": burst(gateway),
            "countless_json_values_with_key": countless_values(gateway),
            "flood_of_bad_requests": log_flood(gateway),
        }
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
