"""Real `worker run` processes on the small reference checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from producer.client import Client, TaskStatus

TESTS = Path(__file__).resolve().parent.parent
TINY_MODEL = TESTS / "data" / "phi3v-reference" / "model"
IMAGES = TESTS / "data" / "phi3v-reference" / "images"


def base_env(redis_url: str, **extra: str) -> dict[str, str]:
    """A clean environment for child processes: only what the test sets, plus basics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VQ_", "REDIS_"))}
    env.update(
        REDIS_URL=redis_url,
        VQ_DEVICE="cpu",
        VQ_DTYPE="float32",
        VQ_MODEL=str(TINY_MODEL),
        VQ_HEARTBEAT_INTERVAL_S="0.5",
        VQ_CONNECT_TIMEOUT_S="3",
        # Small budgets keep CPU generations on the tiny model short.
        VQ_MAX_NEW_TOKENS_CAPS="describe=16,ocr=16,compare=16,ask=64",
        VQ_NUM_CROPS="4",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def terminate(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, then SIGKILL after `grace_s`: how an orchestrator stops a service."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def wait_until_generating(client: Client, task_id: str, timeout_s: float = 60) -> TaskStatus:
    """Wait until a task reports generated tokens; return that status (tokens, worker)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.status(task_id)
        if status.state == "PROGRESS" and status.tokens > 0:
            return status
        time.sleep(0.02)
    raise TimeoutError(f"{task_id} never reported progress")


class WorkerProcess:
    def __init__(self, redis_url: str, logdir: Path, **env: str) -> None:
        self.name = env.pop("VQ_WORKER_NAME", f"test-{uuid.uuid4().hex[:8]}@localhost")
        self.health_file = logdir / f"{self.name}.health.json"
        self.log_path = logdir / f"{self.name}.log"
        self.env = base_env(
            redis_url, VQ_WORKER_NAME=self.name, VQ_HEALTH_FILE=str(self.health_file), **env
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout_s: float = 120) -> WorkerProcess:
        logdir = self.log_path.parent
        logdir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if wait_ready:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Ready = model loaded and the Celery consumer connected."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            if self._health().get("consuming"):
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready after {timeout_s}s:\n{self.log()[-3000:]}")

    def _health(self) -> dict[str, object]:
        try:
            data = json.loads(self.health_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout_s: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.process is None:
            return
        terminate(self.process, grace_s=30)
        self._log.close()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_cli(
    program: str, args: list[str], env: Mapping[str, str], timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"{program}.cli", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
