"""Health commands and Prometheus metrics of a real worker, during a long generation too."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.redis_server import free_port
from support.workers import WorkerProcess, base_env, run_cli, terminate

from producer import Client
from vision_queue.settings import Settings
from worker.health import read_health
from worker.identity import claim_identity, default_health_file

pytestmark = pytest.mark.timeout(300)
LONG = 20_000


@pytest.fixture(scope="module")
def metered_worker(module_redis, tmp_path_factory) -> Iterator[WorkerProcess]:
    with WorkerProcess(
        module_redis.url,
        tmp_path_factory.mktemp("metered"),
        VQ_METRICS_PORT=str(free_port()),
        VQ_MAX_NEW_TOKENS_CAPS=f"ask={LONG},describe=8",
    ) as worker:
        yield worker


@pytest.fixture
def long_client(module_redis, metered_worker) -> Iterator[Client]:
    settings = Settings.from_env({}, redis_url=module_redis.url, max_new_tokens_caps=f"ask={LONG}")
    with Client(settings) as client:
        yield client


def health(worker: WorkerProcess, mode: str):
    return run_cli("worker", ["health", mode], worker.env, timeout_s=60)


def test_live_and_ready_hold_while_a_long_generation_runs(long_client: Client, metered_worker):
    handle = long_client.submit("ask", [], "A very long story.", max_new_tokens=LONG)
    deadline = time.monotonic() + 30
    while long_client.status(handle.id).state != "PROGRESS" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert long_client.status(handle.id).state == "PROGRESS"
    live, ready = health(metered_worker, "--live"), health(metered_worker, "--ready")
    assert long_client.status(handle.id).state == "PROGRESS"  # still generating
    assert live.returncode == 0, live.stderr
    assert ready.returncode == 0, ready.stderr
    long_client.cancel(handle.id)
    long_client.result(handle.id, wait=True, timeout=60)


def test_health_fails_for_a_worker_that_is_not_running(metered_worker, tmp_path):
    env = {**metered_worker.env, "VQ_HEALTH_FILE": str(tmp_path / "nobody.json")}
    done = run_cli("worker", ["health", "--live"], env)
    assert done.returncode == 1
    assert "no heartbeat" in done.stderr


def test_metrics_count_tasks_tokens_and_load_time(long_client: Client, metered_worker, images):
    handle = long_client.submit("describe", [(images / "small_400x300.jpg").read_bytes()])
    assert long_client.result(handle.id, wait=True, timeout=60)["state"] == "SUCCESS"
    port = metered_worker.env["VQ_METRICS_PORT"]

    def scrape() -> str:
        url = f"http://127.0.0.1:{port}/metrics"
        return urllib.request.urlopen(url, timeout=10).read().decode()

    # The worker counts a task right after storing its result, which may wake us first.
    deadline = time.monotonic() + 30
    body = scrape()
    while 'vq_tasks_total{outcome="success",task="describe"}' not in body:
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
        body = scrape()
    for metric in (
        'vq_tasks_total{outcome="success",task="describe"}',
        'vq_queue_wait_seconds_count{task="describe"}',
        'vq_generation_seconds_count{task="describe"}',
        'vq_generated_tokens_total{task="describe"}',
        'vq_prompt_tokens_total{task="describe"}',
        "vq_device_memory_peak_bytes{",
        "vq_model_load_seconds{",
        "vq_model_loaded{",
    ):
        assert metric in body, metric


def test_the_metrics_server_listens_on_loopback_only(metered_worker):
    port = int(metered_worker.env["VQ_METRICS_PORT"])
    listening = [
        line.split()[1]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port
    ]
    assert listening == [f"0100007F:{port:04X}"]  # 127.0.0.1, not 0.0.0.0


def test_a_consumer_restart_is_counted_and_one_is_no_loop(
    module_redis, metered_worker, long_client: Client, images
):
    # Given a worker that has started its consumer once
    before = len(read_health(metered_worker.health_file)["consumer_starts"])
    # When Redis restarts under it (the consumer reconnects: one more start)
    module_redis.restart()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        starts = (read_health(metered_worker.health_file) or {}).get("consumer_starts") or []
        if len(starts) > before:
            break
        time.sleep(0.1)
    assert len(starts) == before + 1
    # Then the worker is ready and serves again
    handle = long_client.submit("describe", [(images / "small_400x300.jpg").read_bytes()])
    assert long_client.result(handle.id, wait=True, timeout=120)["state"] == "SUCCESS"
    assert health(metered_worker, "--ready").returncode == 0


def test_a_worker_without_a_name_is_found_by_health_and_holds_its_name(
    module_redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Given a worker started with neither VQ_WORKER_NAME nor VQ_HEALTH_FILE, on a host
    # (its temp dir) of its own
    env = base_env(module_redis.url, TMPDIR=str(tmp_path), VQ_QUEUE="identity-check")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # that host's temp dir, here too
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"], env=env, stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            name = f"gpu-cpu@{socket.gethostname()}"
            health_file = default_health_file(name)
            assert health_file.parent == tmp_path
            deadline = time.monotonic() + 120
            while not (read_health(health_file) or {}).get("consuming"):
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.1)
            # Then its log says where its heartbeat is and how to check it,
            said = log_path.read_text()
            assert f"worker {name}, health file {health_file}" in said
            assert f"worker health --ready --health-file {health_file}" in said
            # `worker health` on the same host finds it without --name or --device,
            for mode in ("--live", "--ready"):
                done = run_cli("worker", ["health", mode], env, timeout_s=60)
                assert done.returncode == 0, done.stderr
            # and a second worker on this host and device gets a name of its own.
            second = claim_identity("", "", "cpu")
            try:
                assert second.name == f"gpu-cpu-2@{socket.gethostname()}"
                assert second.health_file != health_file
            finally:
                second.release()
        finally:
            terminate(process, grace_s=30)
