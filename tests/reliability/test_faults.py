"""Faults of workers and Redis: an accepted job ends with exactly one result.

Every worker here runs with the shipped delivery settings (visibility timeout 3,600 s,
task limit 600 s, lease 10 s, heartbeat 2 s): a dead worker's task comes back through its
lapsed lease, not through a short visibility timeout, so the tests hold on a loaded
machine. Figures printed here (rounds, recovery and run times) are recorded in
docs/reliability.md.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import redis
from support.http_server import HOOK_HOST
from support.redis_server import RedisServer
from support.webhook_receiver import WebhookReceiver
from support.workers import WorkerProcess, base_env, wait_until_generating

from producer import Client, TaskHandle
from vision_queue.celery_config import make_celery_app
from vision_queue.errors import WaitTimeout
from vision_queue.presence import live_workers
from vision_queue.protocol import LEASE_KEY, LEASED_KEY
from vision_queue.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# The shipped defaults for everything about delivery; only the token caps are the tests'.
SHIPPED_DELIVERY = {
    "VQ_HEARTBEAT_INTERVAL_S": "2.0",
    "VQ_MAX_NEW_TOKENS_CAPS": "ask=4000,describe=16,ocr=16,compare=16",
}
# The most a dead worker's task may take to be running again with those defaults.
RECOVERY_LIMIT_S = 30
# Long enough on the tiny model to be caught running, short enough to finish in time.
RUNNING_TOKENS = 1500


def successes(workers: Iterable[WorkerProcess], expected: Iterable[str] = ()) -> Counter[str]:
    """Success lines per task id in the workers' logs.

    A worker logs its line just after storing the result, which may wake the client first:
    wait (bounded) until every id in `expected` has its line before counting.
    """
    wanted = set(expected)
    deadline = time.monotonic() + 30
    while True:
        found: Counter[str] = Counter()
        for worker in workers:
            found.update(re.findall(r"task id=(\S+) task=\S+ outcome=success", worker.log()))
        if all(found[task_id] for task_id in wanted) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.fixture
def fast_client(redis_url: str) -> Iterator[Client]:
    settings = Settings.from_env({}, redis_url=redis_url, max_new_tokens_caps="ask=4000")
    with Client(settings) as client:
        yield client


def running_elsewhere(client: Client, task_id: str, dead: str, timeout_s: float) -> str:
    """Wait until a worker other than `dead` generates the task; return its name."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.status(task_id)
        if status.state == "PROGRESS" and status.worker and status.worker != dead:
            return status.worker
        assert not status.done, status
        time.sleep(0.05)
    raise AssertionError(f"{task_id} was not running again within {timeout_s}s")


def test_sigkill_mid_generation_runs_again_within_30_s_and_ends_with_exactly_one_success(
    redis_url: str, fast_client: Client, tmp_path: Path
) -> None:
    rounds = 3
    workers = {
        w.name: w
        for w in (WorkerProcess(redis_url, tmp_path, **SHIPPED_DELIVERY).start() for _ in range(2))
    }
    everyone = list(workers.values())
    recoveries: list[float] = []
    try:
        ids = []
        for round_ in range(rounds):
            handle = fast_client.submit("ask", [], "Tell a story.", max_new_tokens=RUNNING_TOKENS)
            victim = workers[wait_until_generating(fast_client, handle.id).worker]
            reader = None
            if round_ == 0:
                # A reader following the text across the worker's death: the rerun continues
                # the stream where the dead worker left it, without a gap or a repeat.
                deltas: list[str] = []
                reader = threading.Thread(
                    target=deltas.extend, args=(fast_client.stream(handle.id),)
                )
                reader.start()
                time.sleep(0.5)
            victim.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            victim.wait()
            del workers[victim.name]
            # The survivor takes the task over through the lapsed lease: no supervisor needed.
            running_elsewhere(fast_client, handle.id, victim.name, RECOVERY_LIMIT_S)
            recoveries.append(time.monotonic() - killed_at)
            replacement = WorkerProcess(redis_url, tmp_path, **SHIPPED_DELIVERY).start(
                wait_ready=False
            )
            workers[replacement.name] = replacement
            everyone.append(replacement)
            result = fast_client.result(handle.id, wait=True, timeout=300)
            assert result is not None and result["state"] == "SUCCESS", result
            if reader is not None:
                reader.join(timeout=120)
                assert "".join(deltas) == result["text"]
            ids.append(handle.id)
        counts = successes(everyone, ids)
        assert all(counts[task_id] == 1 for task_id in ids), counts
        print(
            f"\nreliability: sigkill rounds={rounds} lost=0 duplicated=0 "
            f"running again after {min(recoveries):.1f}-{max(recoveries):.1f}s "
            f"(median {sorted(recoveries)[len(recoveries) // 2]:.1f}s)"
        )
    finally:
        for worker in workers.values():
            worker.stop()


def test_a_frozen_worker_that_resumes_stores_nothing_and_the_task_succeeds_once(
    redis_url: str, fast_client: Client, tmp_path: Path
) -> None:
    frozen = WorkerProcess(redis_url, tmp_path, **SHIPPED_DELIVERY).start()
    live = WorkerProcess(redis_url, tmp_path, **SHIPPED_DELIVERY).start()
    try:
        handle = fast_client.submit("ask", [], "Tell a story.", max_new_tokens=RUNNING_TOKENS)
        first = wait_until_generating(fast_client, handle.id).worker
        if first != frozen.name:
            frozen, live = live, frozen
        frozen.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            running_elsewhere(fast_client, handle.id, frozen.name, RECOVERY_LIMIT_S)
            result = fast_client.result(handle.id, wait=True, timeout=300)
            time.sleep(max(0.0, 60 - (time.monotonic() - stopped_at)))
        finally:
            frozen.signal(signal.SIGCONT)
        # It resumes mid-generation, finds its lease gone, and gives the task up.
        deadline = time.monotonic() + 60
        while f"task id={handle.id} task=ask outcome=abandoned" not in frozen.log():
            assert time.monotonic() < deadline, frozen.log()[-3000:]
            time.sleep(0.2)
        assert result is not None and result["state"] == "SUCCESS", result
        assert result["worker"] == live.name
        assert fast_client.result(handle.id) == result  # never replaced
        assert successes([frozen, live], [handle.id])[handle.id] == 1
        # The resumed worker serves again.
        again = [fast_client.submit("ask", [], f"Say {i}.", max_new_tokens=1) for i in range(4)]
        assert all(
            (fast_client.result(h.id, wait=True, timeout=120) or {}).get("state") == "SUCCESS"
            for h in again
        )
        print("\nreliability: SIGSTOP 60 s then SIGCONT: 1 stored result, 1 success line")
    finally:
        frozen.stop()
        live.stop()


def test_redis_out_of_memory_while_storing_hands_the_task_back_and_it_succeeds_once(
    redis_server: RedisServer, redis_url: str, fast_client: Client, tmp_path: Path
) -> None:
    admin = redis_server.client()
    with WorkerProcess(redis_url, tmp_path, **SHIPPED_DELIVERY) as worker:
        handle = fast_client.submit("ask", [], "Tell a story.", max_new_tokens=RUNNING_TOKENS)
        wait_until_generating(fast_client, handle.id)
        admin.config_set("maxmemory", "1")  # every write that needs memory is refused now
        try:
            deadline = time.monotonic() + 180
            while f"task id={handle.id} task=ask outcome=requeued" not in worker.log():
                assert time.monotonic() < deadline, worker.log()[-3000:]
                time.sleep(0.2)
            assert fast_client.result(handle.id) is None  # nothing stored, nothing lost
        finally:
            admin.config_set("maxmemory", "0")
        result = fast_client.result(handle.id, wait=True, timeout=300)
        assert result is not None and result["state"] == "SUCCESS", result
        assert successes([worker], [handle.id])[handle.id] == 1
        after = fast_client.submit("ask", [], "Say hi.", max_new_tokens=1)
        assert (fast_client.result(after.id, wait=True, timeout=120) or {})["state"] == "SUCCESS"
    log = worker.log()
    assert "Traceback" not in log, log[-3000:]
    print("\nreliability: maxmemory lowered while storing: handed back, 1 success once raised")


def test_sigterm_lets_the_running_task_finish(redis_url, fast_client: Client, tmp_path: Path):
    with WorkerProcess(redis_url, tmp_path, **SHIPPED_DELIVERY) as worker:
        handle = fast_client.submit("ask", [], "Tell a story.", max_new_tokens=RUNNING_TOKENS)
        wait_until_generating(fast_client, handle.id)
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout_s=60) == 0
    # A clean exit leaves the queue's live workers at once (no waiting for expiry).
    assert worker.name not in live_workers(fast_client._redis, "gpu")
    result = fast_client.result(handle.id)
    assert result is not None and result["state"] == "SUCCESS"
    assert successes([worker], [handle.id])[handle.id] == 1


def test_a_second_signal_stops_at_once_and_the_task_is_redelivered(
    redis_url, fast_client: Client, tmp_path: Path
):
    first = WorkerProcess(redis_url, tmp_path, **SHIPPED_DELIVERY).start()
    handle = fast_client.submit("ask", [], "Tell a story.", max_new_tokens=RUNNING_TOKENS)
    wait_until_generating(fast_client, handle.id)
    first.signal(signal.SIGTERM)
    time.sleep(0.2)
    first.signal(signal.SIGQUIT)  # cold shutdown: do not wait for the task
    first.wait(timeout_s=30)
    assert successes([first])[handle.id] == 0
    with WorkerProcess(redis_url, tmp_path, **SHIPPED_DELIVERY) as second:
        result = fast_client.result(handle.id, wait=True, timeout=120)
    assert result is not None and result["state"] == "SUCCESS"
    assert successes([first, second], [handle.id])[handle.id] == 1


def test_a_webhook_in_flight_when_its_worker_dies_is_delivered_by_another_worker(
    redis_url: str, tmp_path: Path
) -> None:
    hooks = {
        "VQ_WEBHOOK_SECRET": "whsec-faults",
        "VQ_WEBHOOK_ALLOWED_PRIVATE_HOSTS": HOOK_HOST,
        "VQ_WEBHOOK_TIMEOUT_S": "5",
        "VQ_WEBHOOK_BACKOFF_S": "1",
    }
    settings = Settings.from_env({}, redis_url=redis_url, webhook_allowed_private_hosts=HOOK_HOST)
    with WebhookReceiver() as receiver, Client(settings) as client:
        # Given a receiver that holds the first delivery open, and the worker that sent it
        receiver.hold = held = threading.Event()
        first = WorkerProcess(redis_url, tmp_path, **SHIPPED_DELIVERY, **hooks).start()
        handle = client.submit("ask", [], "Say hi.", max_new_tokens=1, callback_url=receiver.url())
        receiver.wait_for(1)
        # When that worker is killed mid-delivery
        first.signal(signal.SIGKILL)
        first.wait()
        receiver.hold = None
        held.set()
        # Then another worker takes the delivery over once its hold lapses, as attempt 2
        with WorkerProcess(redis_url, tmp_path, **SHIPPED_DELIVERY, **hooks) as second:
            seen = receiver.wait_for(2, timeout_s=120)
            deadline = time.monotonic() + 30
            while f"webhook task={handle.id} url=" not in second.log():
                assert time.monotonic() < deadline, second.log()[-3000:]
                time.sleep(0.1)
    assert [hook.headers["X-VQ-Attempt"] for hook in seen] == ["1", "2"]
    assert seen[1].body == seen[0].body and json.loads(seen[1].body)["id"] == handle.id
    assert "outcome=delivered attempts=2" in second.log()
    assert successes([first, second], [handle.id])[handle.id] == 1
    print("\nreliability: webhook in flight at SIGKILL: delivered by another worker, attempt 2")


def test_redis_restart_with_100_queued_tasks_loses_none(
    redis_server: RedisServer, redis_url: str, fast_client: Client, tmp_path: Path, images: Path
):
    image = (images / "small_400x300.jpg").read_bytes()
    handles = [fast_client.submit("describe", [image], max_new_tokens=1) for _ in range(100)]
    began = time.monotonic()
    with WorkerProcess(redis_url, tmp_path, **SHIPPED_DELIVERY) as worker:
        while fast_client._redis.llen("gpu") > 90:  # a few done, most still queued
            time.sleep(0.05)
        redis_server.restart()  # AOF on: queued messages and results survive
        try:
            results = [fast_client.result(h.id, wait=True, timeout=300) for h in handles]
        except WaitTimeout as timeout:
            raise AssertionError(where_tasks_are(fast_client, handles, worker)) from timeout
    failed = [r for r in results if r is None or r["state"] != "SUCCESS"]
    assert not failed, failed[:3]
    print(
        f"\nreliability: redis restart with 100 queued: 100/100 in {time.monotonic() - began:.1f}s"
    )
    assert successes([worker], [h.id for h in handles]).total() >= 100


@pytest.mark.parametrize("kind", ["pubsub", "normal"])
def test_connections_redis_closes_are_reopened_and_the_worker_serves_on(
    kind: str, redis_url: str, fast_client: Client, tmp_path: Path, images: Path
):
    # A restart, a failover, a CLIENT KILL or a proxy dropping idle connections: the
    # worker's event loop must notice and reconnect, never sit on a dead subscription.
    image = (images / "small_400x300.jpg").read_bytes()
    admin = redis.Redis.from_url(redis_url)
    with WorkerProcess(redis_url, tmp_path, **SHIPPED_DELIVERY) as worker:
        for _ in range(2):
            answers_broadcasts(fast_client.settings, worker)
            assert admin.client_kill_filter(_type=kind, skipme=True) >= 1
            handle = fast_client.submit("describe", [image], max_new_tokens=1)
            result = fast_client.result(handle.id, wait=True, timeout=120)
            assert result["state"] == "SUCCESS", worker.log()[-3000:]
        answers_broadcasts(fast_client.settings, worker)


def answers_broadcasts(settings: Settings, worker: WorkerProcess, timeout_s: float = 120) -> None:
    """Wait until the worker answers a ping: subscribed (again) to control broadcasts.
    Pinged again and again, since one sent while it resubscribes reaches no one."""
    app = make_celery_app(settings)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                if app.control.ping([worker.name], timeout=1.0, limit=1):
                    return
            except redis.ConnectionError:
                pass  # a pooled connection of the test's own that the kill closed
    finally:
        app.close()
    raise AssertionError(f"{worker.name} answers no broadcast:\n{worker.log()[-3000:]}")


def test_a_burst_of_1000_tasks_on_2_workers_gives_1000_results(
    redis_url: str, fast_client: Client, tmp_path: Path
):
    with WorkerProcess(redis_url, tmp_path) as a, WorkerProcess(redis_url, tmp_path) as b:
        began = time.monotonic()
        handles = [
            fast_client.submit("ask", [], f"Say {i}.", max_new_tokens=1) for i in range(1000)
        ]
        submitted = time.monotonic() - began
        results = [fast_client.result(h.id, wait=True, timeout=600) for h in handles]
        elapsed = time.monotonic() - began
        counts = successes([a, b], [h.id for h in handles])
        per_worker = [successes([w]).total() for w in (a, b)]
    failed = [r for r in results if r is None or r["state"] != "SUCCESS"]
    assert not failed, failed[:3]
    assert len({r["id"] for r in results if r}) == 1000
    assert all(counts[h.id] == 1 for h in handles)
    print(
        f"\nreliability: burst 1000 on 2 workers: submitted in {submitted:.1f}s, "
        f"all done in {elapsed:.1f}s, per worker {per_worker}"
    )


def test_a_task_that_kills_its_worker_every_time_fails_after_bounded_deliveries(
    redis_url: str, fast_client: Client, tmp_path: Path
):
    env = {
        **SHIPPED_DELIVERY,
        "VQ_MAX_DELIVERIES": "2",
        "VQ_FAULT_INJECTION": "crash_marker=__CRASH__",
    }
    handle = fast_client.submit("ask", [], "__CRASH__ now", max_new_tokens=4)
    started = 0
    deadline = time.monotonic() + 240
    # Keep one worker running, as a supervisor would, until the task has an outcome.
    while not fast_client.status(handle.id).done and time.monotonic() < deadline:
        worker = WorkerProcess(redis_url, tmp_path, **env).start(wait_ready=False)
        started += 1
        while worker.process is not None and worker.process.poll() is None:
            if fast_client.status(handle.id).done:
                break
            time.sleep(0.1)
        worker.stop()
    result = fast_client.result(handle.id)
    assert result is not None and result["state"] == "FAILURE"
    assert result["error"]["code"] == "model_error"
    assert started == 3  # two deliveries crashed a worker, the third was refused
    print(f"\nreliability: crash loop ended after {started} worker starts")


def test_a_run_that_loses_its_lease_is_not_counted_as_a_delivery_that_killed_a_worker(
    redis_url: str, fast_client: Client, tmp_path: Path
):
    # Given a worker that fails a task for good after one delivery that killed a worker
    env = {**SHIPPED_DELIVERY, "VQ_MAX_DELIVERIES": "1"}
    worker = WorkerProcess(redis_url, tmp_path, **env).start()
    try:
        handle = fast_client.submit("ask", [], "Tell a story.", max_new_tokens=RUNNING_TOKENS)
        wait_until_generating(fast_client, handle.id)
        # When the running task's lease vanishes (as a Sentinel failover could make it)
        admin = redis.Redis.from_url(redis_url)
        tags = admin.zrange(LEASED_KEY, 0, -1)
        assert len(tags) == 1
        admin.delete(LEASE_KEY.format(tag=tags[0].decode()))
        # Then that run is abandoned, alive, and the message taken again runs to success
        # instead of failing as if a worker had died on it
        result = fast_client.result(handle.id, wait=True, timeout=300)
        assert result is not None and result["state"] == "SUCCESS", result
        assert f"task id={handle.id} task=ask outcome=abandoned" in worker.log()
        assert successes([worker], [handle.id])[handle.id] == 1
    finally:
        worker.stop()


def test_redis_down_during_submit_exits_3_within_a_bounded_time(
    redis_server: RedisServer, redis_url: str, images: Path
):
    redis_server.stop()
    try:
        began = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "producer.cli",
                "submit",
                "--task",
                "describe",
                "--image",
                str(images / "small_400x300.jpg"),
            ],
            env=base_env(redis_url, VQ_CONNECT_TIMEOUT_S="3"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        elapsed = time.monotonic() - began
    finally:
        redis_server.start()
    assert done.returncode == 3, done.stderr
    assert "unreachable" in done.stderr
    assert elapsed < 15
    print(f"\nreliability: submit with redis down exited 3 in {elapsed:.1f}s")


def where_tasks_are(client: Client, handles: list[TaskHandle], worker: WorkerProcess) -> str:
    """Where each unfinished task is: queued, taken, leased, or nowhere (lost)."""
    redis = client._redis
    queued = b"".join(b for key in ("gpu", "gpu.high", "gpu.low") for b in redis.lrange(key, 0, -1))
    taken = b"".join(redis.hvals("unacked"))
    leased = redis.zcard("vq:leased")
    log = worker.log()
    lines = []
    for handle in handles:
        if client.result(handle.id) is not None:
            continue
        mentions = [line for line in log.splitlines() if handle.id in line]
        lines.append(
            f"{handle.id}: status={client.status(handle.id).state} "
            f"queued={handle.id.encode() in queued} taken={handle.id.encode() in taken} "
            f"log={mentions[-3:]}"
        )
    return "\n".join([f"unfinished {len(lines)}; leased tags {leased}", *lines[:10], log[-6000:]])
