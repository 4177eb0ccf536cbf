"""The local stack in one command: Redis, one worker, Flower; then describe, OCR and compare.

Uses the real Phi-3-vision when it can load it (VQ_MODEL, or the checkpoint already in the
Hugging Face cache); otherwise the small random-weight checkpoint shipped for the tests,
whose answers are random text. `--keep` leaves the stack running until Ctrl+C.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the repo first: tests/ mirrors its package names

from support.redis_server import RedisServer, free_port  # noqa: E402

from producer import Client, Settings  # noqa: E402

REAL_MODEL = "microsoft/Phi-3-vision-128k-instruct"
TINY_MODEL = ROOT / "tests" / "data" / "phi3v-reference" / "model"
EXAMPLES = ROOT / "examples" / "images"
JOBS = [
    ("describe", ["street_1280x720.jpg"]),
    ("ocr", ["doc_900x600.png"]),
    ("compare", ["shapes_640x480.png", "shapes_b_640x480.png"]),
]


def choose_model() -> tuple[str, bool]:
    """(model, is_real): the configured or cached real checkpoint, else the tiny one."""
    wanted = os.environ.get("VQ_MODEL", REAL_MODEL)
    if Path(wanted).is_dir() and (Path(wanted) / "config.json").exists():
        return wanted, Path(wanted).resolve() != TINY_MODEL.resolve()
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(wanted, local_files_only=True, allow_patterns=["*.json"])
        if (
            list(Path(path).glob("*.safetensors"))
            or (Path(path) / "model.safetensors.index.json").exists()
        ):
            return wanted, True
    except Exception as exc:  # not cached, offline: fall back below
        print(f"demo: {wanted} is not available locally ({type(exc).__name__})")
    return str(TINY_MODEL), False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the stack running")
    args = parser.parse_args()

    workdir = ROOT / "var" / "demo"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    model, real = choose_model()
    if not real:
        print(
            "demo: NOTE the real Phi-3-vision weights are not here; using the small RANDOM "
            "checkpoint from tests/data. Its answers are random text, not descriptions."
        )

    redis_server = RedisServer(workdir / "redis")
    redis_server.start()
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "VQ_MODEL": model,
        "VQ_HEALTH_FILE": str(workdir / "worker.health.json"),
        "VQ_WORKER_NAME": "demo-worker@local",
    }
    if not real:
        env.update(VQ_DEVICE="cpu", VQ_MAX_NEW_TOKENS_CAPS="describe=24,ocr=24,compare=24,ask=24")
    flower_password = secrets.token_urlsafe(9)
    flower_port = free_port()
    log = (workdir / "stack.log").open("ab")
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "producer.flower_app:app",
                "flower",
                "--address=127.0.0.1",
                f"--port={flower_port}",
                f"--basic-auth=demo:{flower_password}",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        ),
    ]
    try:
        print(f"demo: Redis on 127.0.0.1:{redis_server.port}; loading {model}")
        print(f"demo: logs in {workdir}/stack.log")
        client = Client(Settings.from_env(env))
        for task, files in JOBS:
            handle = client.submit(task, [(EXAMPLES / name).read_bytes() for name in files])
            result = client.result(handle.id, wait=True, timeout=1800)
            assert result is not None
            answer = result.get("text") if result["state"] == "SUCCESS" else result.get("error")
            tokens = result.get("usage", {}).get("completion_tokens", 0)
            seconds = result.get("timings", {}).get("total", 0)
            print(f"\n== {task} {', '.join(files)} ({result['state']}, {tokens} tokens, "
                  f"{seconds:.2f}s on {result.get('device')})\n{answer}")
        print(f"\ndemo: Flower at http://127.0.0.1:{flower_port}/ "
              f"(user demo, password {flower_password})")
        if args.keep:
            print("demo: stack running; Ctrl+C to stop")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        redis_server.stop()
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
