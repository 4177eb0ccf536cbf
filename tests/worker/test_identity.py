"""Workers on one host never share a node name or a health file, and `worker health`
finds the one running here without being told its name."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.workers import base_env

from worker.health import HealthReporter
from worker.identity import (
    IdentityTaken,
    WorkerIdentity,
    claim_identity,
    default_worker_name,
    running_health_files,
)


@pytest.fixture(autouse=True)
def host_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own temp dir, standing for the host's (other workers may run here)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.fixture
def claims() -> Iterator[list[WorkerIdentity]]:
    held: list[WorkerIdentity] = []
    yield held
    for identity in held:
        identity.release()


def test_a_second_worker_on_the_same_device_takes_the_next_name_and_file(claims):
    first = claim_identity("", "", "cuda:0")
    second = claim_identity("", "", "cuda:0")
    claims += [first, second]
    assert first.name == default_worker_name("cuda:0") and first.name.startswith("gpu-cuda0@")
    assert second.name == default_worker_name("cuda:0", 2)
    assert second.name.startswith("gpu-cuda0-2@")
    assert first.health_file != second.health_file


def test_a_stopped_workers_name_is_free_again(claims, tmp_path: Path):
    first = claim_identity("", "", "cpu")
    first.release()  # a clean stop; the kernel drops the lock of a killed one too
    assert list(tmp_path.glob("*.lock")) == []  # and no lock file is left behind
    again = claim_identity("", "", "cpu")
    claims.append(again)
    assert again.name == first.name and again.health_file == first.health_file


def test_a_killed_workers_name_is_free_again(tmp_path: Path, claims):
    # Given a worker process that took the default name and was killed (no cleanup ran)
    code = (
        "import os, tempfile, sys; tempfile.tempdir = sys.argv[1]\n"
        "from worker.identity import claim_identity\n"
        "print(claim_identity('', '', 'cpu').name, flush=True)\n"
        "os._exit(0)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                            capture_output=True, text=True, timeout=60, check=True)
    assert list(tmp_path.glob("*.lock"))  # its lock file stayed
    # Then the next worker takes that name
    claims.append(claim_identity("", "", "cpu"))
    assert claims[-1].name == killed.stdout.strip()


def test_an_explicit_name_in_use_is_refused_with_the_setting_to_change(claims):
    claims.append(claim_identity("gpu0@box", "", "cuda:0"))
    with pytest.raises(IdentityTaken) as taken:
        claim_identity("gpu0@box", "", "cuda:1")
    assert "gpu0@box" in str(taken.value) and "VQ_WORKER_NAME" in str(taken.value)


def test_an_explicit_health_file_in_use_is_refused(claims, tmp_path: Path):
    shared = str(tmp_path / "worker.health.json")
    claims.append(claim_identity("", shared, "cuda:0"))
    with pytest.raises(IdentityTaken) as taken:
        claim_identity("", shared, "cuda:0")
    assert shared in str(taken.value) and "VQ_HEALTH_FILE" in str(taken.value)
    # and the refused worker did not keep the name it had tried
    claims.append(claim_identity("", "", "cuda:0"))
    assert claims[-1].name.startswith("gpu-cuda0-2@")


def test_only_heartbeats_of_running_processes_are_found(claims, tmp_path: Path):
    identity = claim_identity("", "", "cpu")
    claims.append(identity)
    reporter = HealthReporter(identity.health_file, identity.name, interval_s=60)
    reporter.start()
    try:
        # A crashed worker's file stays behind, with a process id that no longer runs
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
        leftover = tmp_path / "vision-queue-gpu-cpu-9@old.health.json"
        leftover.write_text(f'{{"worker": "gpu-cpu-9@old", "pid": {gone.stdout.strip()}}}')
        assert running_health_files() == [identity.health_file]

        # `worker health` without --name checks the worker running on this host
        env = base_env("redis://127.0.0.1:1/0", TMPDIR=str(tmp_path))
        done = subprocess.run([sys.executable, "-m", "worker.cli", "health", "--live"],
                              env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("alive, state=loading")
    finally:
        reporter.stop()
    done = subprocess.run([sys.executable, "-m", "worker.cli", "health", "--live"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and "no worker running on this host" in done.stderr


def test_a_worker_with_its_heartbeat_file_elsewhere_is_found_too(claims, tmp_path: Path):
    # Given a worker whose VQ_HEALTH_FILE is outside the temp dir, as `make demo` sets it
    elsewhere = tmp_path / "var" / "demo"
    elsewhere.mkdir(parents=True)
    identity = claim_identity("", str(elsewhere / "worker.health.json"), "cpu")
    claims.append(identity)
    reporter = HealthReporter(identity.health_file, identity.name, interval_s=60)
    reporter.start()
    env = base_env("redis://127.0.0.1:1/0", TMPDIR=str(tmp_path))
    try:
        # `worker health` without a name or a file finds it through its pointer
        done = subprocess.run([sys.executable, "-m", "worker.cli", "health", "--live"],
                              env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("alive, state=loading")
    finally:
        reporter.stop()
    # Stopped, it leaves no pointer behind, and nothing is found
    assert list(tmp_path.glob("*.pointer")) == []
    done = subprocess.run([sys.executable, "-m", "worker.cli", "health", "--live"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and "no worker running on this host" in done.stderr
