"""The producer is light: a web backend importing it never pulls torch or transformers."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_producer_loads_no_torch_or_transformers():
    code = (
        "import sys, producer, producer.cli; "
        "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_importing_the_producer_is_fast():
    code = "import time; t = time.perf_counter(); import producer; print(time.perf_counter() - t)"
    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(3)
    ]
    assert min(runs) < 1.0


def test_the_contract_and_the_engine_import_without_the_queue_packages():
    # The GPU check runs the engine where celery, kombu and redis are not installed.
    code = (
        "import sys, vision_queue.errors, vision_queue.protocol, vision_queue.schemas; "
        "import worker.inference.engine; "
        "queue = [m for m in ('celery', 'kombu', 'redis') if m in sys.modules]; "
        "print(','.join(queue))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_the_package_still_exports_the_client_names():
    code = "from producer import Client, TaskName, WaitTimeout; print(Client.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "Client"
