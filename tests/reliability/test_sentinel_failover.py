"""Redis behind Sentinel: the master dies, the replica takes over, nothing is restarted.

A real deployment on loopback (tests/support/sentinel.py): a master, its replica and three
sentinels, with short failure detection (down after 1 s). A real worker and real clients
reach Redis only through the sentinel URL. Figures printed here are recorded in
docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from gateway.gateway_support import API_KEY, GatewayProcess, wait_for_result
from support.redis_server import PASSWORD
from support.sentinel import MASTER_NAME, SENTINEL_PASSWORD, SentinelCluster
from support.workers import WorkerProcess, run_cli, wait_until_generating

from producer import Client
from producer.waiting import Notifier
from vision_queue.outages import async_client_options
from vision_queue.redis_connect import async_redis_client, redis_client
from vision_queue.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUNNING_TOKENS = 1500  # caught running when the master dies, on the tiny model
SHORT = {"max_new_tokens": 1}


@pytest.fixture
def cluster(sentinel_cluster: SentinelCluster) -> SentinelCluster:
    """The session's deployment with a replica in sync (one an earlier test killed is
    started again as a replica of the current master)."""
    sentinel_cluster.ensure_replica()
    return sentinel_cluster


@pytest.fixture(scope="module")
def worker(
    sentinel_cluster: SentinelCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One worker for the module, reaching Redis only through the sentinels."""
    env = {
        "VQ_REDIS_SENTINEL_MASTER": MASTER_NAME,
        "VQ_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
        "VQ_MAX_NEW_TOKENS_CAPS": "ask=4000,describe=16,ocr=16,compare=16",
    }
    with WorkerProcess(
        sentinel_cluster.url, tmp_path_factory.mktemp("sentinel-worker"), **env
    ) as process:
        yield process


def sentinel_settings(cluster: SentinelCluster) -> Settings:
    # A client keeps retrying for as long as a failover may take before reporting Redis down.
    return Settings.from_env(
        cluster.env(), connect_timeout_s=30.0, max_new_tokens_caps="ask=4000"
    )


def test_project_clients_talk_to_the_master_the_sentinels_name(cluster: SentinelCluster) -> None:
    # Given the project's settings holding only the sentinels' addresses
    settings = sentinel_settings(cluster)
    master = cluster.master_address()
    assert master is not None
    direct = cluster.server(master[1])
    # When its sync, pooled and asyncio clients write
    redis_client(settings).set("vq:test:sync", "1")
    pooled = redis_client(settings, max_connections=2)
    pooled.set("vq:test:pooled", "2")
    # a sized pool makes callers beyond its size wait for a connection, as without Sentinel
    assert isinstance(pooled.connection_pool, redis.BlockingConnectionPool)
    assert pooled.connection_pool.max_connections == 2

    async def write_async() -> None:
        client = async_redis_client(settings, max_connections=2)
        await client.set("vq:test:async", "3")
        await client.aclose()

    asyncio.run(write_async())
    # Then the writes are on the master itself
    assert direct.mget("vq:test:sync", "vq:test:pooled", "vq:test:async") == [b"1", b"2", b"3"]
    assert direct.execute_command("ROLE")[0] == b"master"


def test_a_server_named_as_master_that_is_a_replica_is_refused(cluster: SentinelCluster) -> None:
    # Right after a failover a sentinel may still name the old master, demoted but alive:
    # reads there would be stale, so a project connection refuses any server but the master.
    settings = sentinel_settings(cluster)
    replica = ("127.0.0.1", next(port for port in cluster.servers if port != cluster.master_port()))
    connection = redis_client(settings).connection_pool.make_connection()
    with pytest.raises(redis.ConnectionError, match="not the master"):
        connection.connect_to(replica)

    async def connect_async() -> None:
        pool = async_redis_client(settings).connection_pool
        with pytest.raises(redis.ConnectionError, match="not the master"):
            await pool.make_connection().connect_to(replica)

    asyncio.run(connect_async())


def test_sigkill_of_the_master_while_tasks_flow_loses_no_task_and_restarts_nothing(
    cluster: SentinelCluster, worker: WorkerProcess
) -> None:
    settings = sentinel_settings(cluster)
    with Client(settings) as client:
        assert worker.process is not None
        pid = worker.process.pid
        # Given a long task running and short ones queued behind it, all replicated
        running = client.submit("ask", [], "Tell a story.", max_new_tokens=RUNNING_TOKENS)
        queued = [client.submit("ask", [], f"Say {i}.", **SHORT) for i in range(4)]
        wait_until_generating(client, running.id)
        before = [running.id] + [handle.id for handle in queued]
        # and callers already waiting for every result (pushed waits, one pub/sub connection)
        results: dict[str, Any] = {}
        waits = [
            threading.Thread(target=_wait_into, args=(client, task_id, results))
            for task_id in before
        ]
        for wait in waits:
            wait.start()
        # and a pub/sub subscription of the project's notifier, confirmed by the master
        subscriber = _Subscriber(settings, "vq:test:failover-channel")
        subscriber.start()
        assert subscriber.subscribed.wait(60)
        assert cluster.wait_replicated() >= 1

        # When the master is SIGKILLed mid-generation
        old_master = cluster.kill_master()
        killed_at = time.monotonic()
        during: list[str] = []
        accepted_at: list[float] = []
        submitter = threading.Thread(
            target=_submit_into, args=(client, during, accepted_at, 2)
        )
        submitter.start()  # submitted while there is no master: the client keeps retrying
        cluster.wait_for_new_master(old_master)
        failover_s = time.monotonic() - killed_at
        after = [client.submit("ask", [], f"Count to {i}.", **SHORT).id for i in range(3)]
        submitter.join(timeout=120)
        # the subscription made before is renewed on the new master by itself
        publisher = redis_client(settings)
        deadline = time.monotonic() + 60
        while not subscriber.got.wait(0.2):
            assert time.monotonic() < deadline, subscriber.received
            publisher.publish("vq:test:failover-channel", b"after")
        assert subscriber.received[0] is None  # "connection replaced: re-read the state"
        assert subscriber.received[-1] == b"after"

        # Then every task, before, during and after, ends in exactly one success
        for task_id in during + after:
            _wait_into(client, task_id, results)
        for wait in waits:
            wait.join(timeout=300)
        all_done_s = time.monotonic() - killed_at
        everything = before + during + after
        assert len(during) == 2
        assert {task_id: results[task_id]["state"] for task_id in everything} == {
            task_id: "SUCCESS" for task_id in everything
        }
        # each ran once, but for at most one delivered when the master died: kombu may hand
        # its message back when the consumer's channel closes, and the lease the worker
        # then loses ends that run (abandoned, nothing stored) before it runs again
        # (docs/reliability.md)
        runs = _runs(worker, everything)
        assert all(
            runs.get(task_id) in (["success"], ["abandoned", "success"]) for task_id in everything
        ), runs
        reruns = sum(len(runs[task_id]) - 1 for task_id in everything)
        assert reruns <= 1, runs
        # by the same worker process, never restarted, still consuming
        assert worker.process.poll() is None and worker.process.pid == pid
        assert worker._health().get("consuming") is True
        ready = run_cli("worker", ["health", "--ready", "--name", worker.name], worker.env)
        assert ready.returncode == 0, ready.stdout + ready.stderr
        log = worker.log()
        assert PASSWORD not in log and SENTINEL_PASSWORD not in log
        print(
            f"\nreliability: sentinel failover (SIGKILL master, down-after 1 s) "
            f"new master after {failover_s:.1f}s, first submit accepted after "
            f"{accepted_at[0] - killed_at:.1f}s, every result {all_done_s:.1f}s; "
            f"tasks before={len(before)} "
            f"during={len(during)} after={len(after)} lost=0 run-again={reruns}"
        )


def test_a_planned_failover_loses_no_task_and_restarts_nothing_but_may_run_some_twice(
    cluster: SentinelCluster, worker: WorkerProcess, tmp_path: Path
) -> None:
    settings = sentinel_settings(cluster)
    gateway_env = {
        "VQ_REDIS_SENTINEL_MASTER": MASTER_NAME,
        "VQ_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
        "VQ_GATEWAY_REQUESTS_PER_MINUTE": "0",  # the test polls the task's state
    }
    with (
        Client(settings) as client,
        GatewayProcess(cluster.url, tmp_path, **gateway_env) as gateway,
        httpx.Client(
            base_url=gateway.base_url,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=60,
        ) as api,
    ):
        assert worker.process is not None
        pid = worker.process.pid
        # Given a long task running and short ones queued behind it, all replicated
        running = client.submit("ask", [], "Tell a story.", max_new_tokens=RUNNING_TOKENS)
        queued = [client.submit("ask", [], f"Say {i}.", **SHORT) for i in range(3)]
        wait_until_generating(client, running.id)
        assert cluster.wait_replicated() >= 1
        # When the sentinels are told to fail over: the replica is promoted, the old master
        # is demoted alive and the sentinels drop its clients' connections
        started = time.monotonic()
        old_master = cluster.planned_failover()
        cluster.wait_for_new_master(old_master)
        switched_s = time.monotonic() - started
        # Until the old master is demoted it still accepts writes, which the demotion then
        # discards (docs/reliability.md): the tasks "after" are submitted once it is.
        cluster.wait_demoted(old_master)
        demoted_s = time.monotonic() - started
        after = [client.submit("ask", [], f"Count to {i}.", **SHORT).id for i in range(3)]
        # Then every task ends in success, on the same worker process
        everything = [running.id] + [handle.id for handle in queued] + after
        results = {task_id: client.result(task_id, True, 300) for task_id in everything}
        assert {task_id: (r or {}).get("state") for task_id, r in results.items()} == {
            task_id: "SUCCESS" for task_id in everything
        }
        # The worker leaves the old master as soon as the sentinels name the new one
        # (vision_queue/master_fence.py), seconds before they demote it; a task it ran
        # there in the second between the promotion and that switch had its result
        # discarded by the demotion and ran again: at most twice, never lost. Every take
        # counts as a run: one abandoned at its start (its lease on the other master) too.
        runs = _runs(worker, everything)
        assert all(runs.get(task_id) for task_id in everything), runs
        assert all(len(runs[task_id]) <= 2 for task_id in everything), runs
        assert all(runs[task_id][-1] == "success" for task_id in everything), runs
        reruns = sum(len(runs[task_id]) - 1 for task_id in everything)
        assert worker.process.poll() is None and worker.process.pid == pid
        # and the gateway, started before, serves on the new master: ready, and a task
        # submitted over HTTP runs to its result
        deadline = time.monotonic() + 60
        while api.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, api.get("/readyz").text
            time.sleep(0.2)
        response = api.post("/v1/tasks", json={"task": "ask", "prompt": "Say hi."})
        assert response.status_code == 202, response.text
        assert wait_for_result(api, response.json()["id"])["state"] == "SUCCESS"
        assert gateway.process is not None and gateway.process.poll() is None
        print(
            f"\nreliability: sentinel planned failover (SENTINEL FAILOVER) new master after "
            f"{switched_s:.1f}s, old master demoted after {demoted_s:.1f}s; "
            f"tasks before={len(everything) - len(after)} "
            f"after={len(after)} lost=0 run-again={reruns}"
        )


class _Subscriber(threading.Thread):
    """A pushed wait's connection (`producer.waiting.Notifier`) on its own event loop."""

    def __init__(self, settings: Settings, channel: str) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.channel = channel
        self.subscribed = threading.Event()
        self.got = threading.Event()
        self.received: list[bytes | None] = []

    def run(self) -> None:
        asyncio.run(self._follow())

    async def _follow(self) -> None:
        settings = self.settings
        notifier = Notifier(
            lambda: async_redis_client(
                settings, health_check_interval=0, **async_client_options(settings)
            )
        )
        inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        await notifier.subscribe(self.channel, inbox, timeout=30)
        self.subscribed.set()
        try:
            while True:
                item = await asyncio.wait_for(inbox.get(), timeout=300)
                self.received.append(item)
                if item is not None:
                    self.got.set()
                    return
        finally:
            await notifier.aclose()


def _wait_into(client: Client, task_id: str, into: dict[str, Any]) -> None:
    into[task_id] = client.result(task_id, wait=True, timeout=300)


def _submit_into(client: Client, ids: list[str], accepted_at: list[float], count: int) -> None:
    for i in range(count):
        ids.append(client.submit("ask", [], f"Name {i} colours.", **SHORT).id)
        accepted_at.append(time.monotonic())


def _runs(worker: WorkerProcess, expected: list[str]) -> dict[str, list[str]]:
    """Outcomes per task id from the worker's one line per task, leaving out `duplicate`
    (a redelivered message whose result was already stored: skipped, not run). Every take
    of a message counts, one abandoned before its task started included: right after a
    planned failover a take must hold its lease (vision_queue/master_fence.py). Each line
    is logged just after the result is stored, so wait (bounded) for every expected id's."""
    deadline = time.monotonic() + 30
    while True:
        runs: dict[str, list[str]] = {}
        for task_id, outcome in re.findall(r"task id=(\S+) task=\S+ outcome=(\S+)", worker.log()):
            if outcome != "duplicate":
                runs.setdefault(task_id, []).append(outcome)
        if all(task_id in runs for task_id in expected) or time.monotonic() > deadline:
            return runs
        time.sleep(0.1)
