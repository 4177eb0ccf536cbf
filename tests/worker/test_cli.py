"""`worker run`'s start: what it does before and after the consumer is up."""

from __future__ import annotations

import subprocess
import sys


def test_worker_run_pauses_the_collector_until_the_consumer_is_up() -> None:
    code = (
        "import gc\n"
        "from celery.signals import worker_ready\n"
        "from worker import cli\n"
        "cli._pause_collector_until_consuming()\n"
        "paused = not gc.isenabled()\n"
        "worker_ready.send(sender=None)\n"
        "print(paused, gc.isenabled(), gc.get_freeze_count() > 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert done.stdout.split() == ["True", "True", "True"]
