"""Both command lines: `--version`, and a reader that goes away (`| head`) ends them quietly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from producer.cli_support import EXIT_CLOSED_PIPE, package_version


@pytest.mark.parametrize("program", ["producer", "worker"])
def test_version_names_the_program_and_the_package_version(program: str):
    done = subprocess.run(
        [sys.executable, "-m", f"{program}.cli", "--version"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{program} (vision-queue) {package_version()}"
    assert package_version()[0].isdigit()  # the project is installed (make setup)


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["worker.cli", "settings"], EXIT_CLOSED_PIPE),
        # argparse itself drops a failed write of the help text and exits 0
        (["producer.cli", "submit", "--help"], 0),
    ],
    ids=["worker-settings", "producer-help"],
)
def test_a_closed_pipe_ends_without_a_traceback(args: list[str], code: int):
    reader, writer = os.pipe()
    os.close(reader)  # the reader has gone before the first line is written
    try:
        done = subprocess.run(
            [sys.executable, "-m", *args], stdout=writer, stderr=subprocess.PIPE, text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith(("VQ_", "REDIS_"))},
            timeout=60, check=False,
        )
    finally:
        os.close(writer)
    assert done.stderr == ""
    assert done.returncode == code
