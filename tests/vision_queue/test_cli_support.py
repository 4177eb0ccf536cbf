"""Both command lines: `--version`, and a reader that goes away (`| head`) ends them quietly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from vision_queue.cli_support import EXIT_CLOSED_PIPE, package_version


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


# A wait whose KeyboardInterrupt Python loses: swallowed where it lands, as Python does with
# one raised inside a finalizer (it prints it and goes on).
SWALLOWING_WAIT = """
import sys, time
from vision_queue.cli_support import CtrlC
with CtrlC("interrupted: bye", 130, grace_s=float(sys.argv[1])):
    # "waiting" is printed inside the try: the test's Ctrl+C can land nowhere else, so it is
    # swallowed whichever bytecode it interrupts (outside a try it would end the child).
    try:
        print("waiting", flush=True)
        while True:
            time.sleep(0.05)
    except KeyboardInterrupt:
        print("lost", flush=True)
    # A second Ctrl+C does not raise (CtrlC exits from its handler), so nothing to catch.
    while True:
        time.sleep(0.05)
"""


def start_swallowing_wait(grace_s: float) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", SWALLOWING_WAIT, str(grace_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "waiting\n"
    return child


def test_ctrl_c_ends_a_wait_even_when_the_interrupt_is_lost():
    child = start_swallowing_wait(grace_s=0.5)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130
    assert stderr.count("interrupted: bye") == 1


def test_a_second_ctrl_c_ends_it_at_once():
    child = start_swallowing_wait(grace_s=3600)
    child.send_signal(signal.SIGINT)
    assert child.stdout is not None and child.stdout.readline() == "lost\n"
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130
    assert stderr.count("interrupted: bye") == 1
