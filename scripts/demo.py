"""The local stack in one command: Redis, one worker, Flower; then describe, OCR and compare.

    python scripts/demo.py --keep     # what `make demo` runs: answer, then keep the stack up

Uses the real Phi-3-vision when it can load it (VQ_MODEL, or the checkpoint already in the
Hugging Face cache; VQ_MODEL may name Phi-3.5-vision too, as a Hub id or a checkpoint
folder); otherwise the small random-weight checkpoint shipped for the tests, whose answers
are random text. With REDIS_URL set it uses that Redis and starts none.
With `--keep` the stack stays up until Ctrl+C and the commands to try against it are
printed (REDIS_URL with its password, producer, worker health, Flower login).

Its state (logs, Redis data, health file) lives in var/demo (`--state-dir`), guarded by a
lock: a second demo on the same folder refuses while the first runs.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from producer import Client, Settings  # noqa: E402
from scripts.devstack import RedisServer, free_port, redis_reachable  # noqa: E402
from vision_queue.settings import SettingsError  # noqa: E402

REAL_MODEL = "microsoft/Phi-3-vision-128k-instruct"
TINY_MODEL = ROOT / "tests" / "data" / "phi3v-reference" / "model"
# The random-weight checkpoints shipped for the tests: Phi-3-vision's and Phi-3.5-vision's.
TINY_MODELS = (TINY_MODEL, ROOT / "tests" / "data" / "phi35v-reference" / "model")
EXAMPLES = ROOT / "examples" / "images"
JOBS = [
    ("describe", ["street_1280x720.jpg"]),
    ("ocr", ["doc_900x600.png"]),
    ("compare", ["shapes_640x480.png", "shapes_b_640x480.png"]),
]
# The random checkpoint's answers are noise: the examples ask it for a few tokens only.
# A request option, not a cap: the worker accepts what any producer accepts.
TINY_EXAMPLE_TOKENS = 48
FLOWER_USER = "demo"
LOCK_NAME = "demo.pid"


class DemoRunning(Exception):
    """Another demo holds the state folder."""


@dataclass(frozen=True)
class Stack:
    redis_url: str
    started_redis: bool
    caps: str
    flower_url: str
    flower_password: str
    health_file: Path
    log_file: Path


def choose_model() -> tuple[str, bool]:
    """(model, is_real): the configured or cached real checkpoint, else the tiny one."""
    wanted = os.environ.get("VQ_MODEL", REAL_MODEL)
    if Path(wanted).is_dir() and (Path(wanted) / "config.json").exists():
        return wanted, Path(wanted).resolve() not in {tiny.resolve() for tiny in TINY_MODELS}
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


def acquire_state_dir(state_dir: Path) -> IO[str]:
    """Lock `state_dir` for this process (released when it exits, however it exits).

    Raises DemoRunning, touching nothing, while another demo holds it. Then the previous
    run's files are removed, except the lock file itself.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = (state_dir / LOCK_NAME).open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = (lock.readline().strip() or "?").split()[0]
        lock.close()
        raise DemoRunning(
            f"another demo is running on {state_dir} (pid {holder}); it is left as it is. "
            f"Stop it first (Ctrl+C in its terminal, or `kill {holder}`), or pass "
            "--state-dir for a second stack"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    for entry in state_dir.iterdir():
        if entry.name != LOCK_NAME:
            _remove(entry)
    return lock


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            _remove(child)
        path.rmdir()
    else:
        path.unlink()


def shared_caps(environ: dict[str, str] | os._Environ[str]) -> str:
    """The token caps for both sides: the caller's VQ_MAX_NEW_TOKENS_CAPS or the default."""
    return Settings.from_env(environ).max_new_tokens_caps


def stack_env(
    base: dict[str, str], redis_url: str, model: str, real: bool, state_dir: Path
) -> dict[str, str]:
    """The environment of every process of the stack, and of the demo's own client."""
    env = {
        **base,
        "REDIS_URL": redis_url,
        "VQ_MODEL": model,
        "VQ_MAX_NEW_TOKENS_CAPS": shared_caps(base),  # one value, producer and worker
        "VQ_HEALTH_FILE": str(state_dir / "worker.health.json"),
        "PYTHONUNBUFFERED": "1",
    }
    if not real:
        env.setdefault("VQ_DEVICE", "cpu")
    return env


def wait_for_port(port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        time.sleep(0.1)
    return False


def try_next(stack: Stack, example_id: str, state_dir: Path) -> str:
    """What to type in another terminal, against this very stack."""
    here = Path.cwd()

    def shown(path: Path) -> str:
        with contextlib.suppress(ValueError):
            return str(path.relative_to(here))
        return str(path)

    lines = []
    if sys.prefix != sys.base_prefix:  # running from a virtualenv: activate that one
        lines.append(f"source {shlex.quote(shown(Path(sys.prefix) / 'bin' / 'activate'))}")
    lines.append(f"export REDIS_URL={shlex.quote(stack.redis_url)}")
    if stack.caps != Settings().max_new_tokens_caps:
        lines.append(f"export VQ_MAX_NEW_TOKENS_CAPS={shlex.quote(stack.caps)}")
    image = shown(EXAMPLES / "street_1280x720.jpg")
    doc = shown(EXAMPLES / "doc_900x600.png")
    lines += [
        f"producer status {example_id}                 # one of the examples above",
        f"producer result {example_id} --json",
        f"producer submit --task ocr --image {doc} --wait",
        f"ID=$(producer submit --task describe --image {image} --max-new-tokens 500)",
        "producer status $ID",
        "producer cancel $ID                      # a queued or running task stops",
        f"ID=$(producer submit --task describe --image {image})",
        "producer result $ID --wait --timeout 600",
        "worker health --ready                    # finds the demo's worker by itself",
    ]
    return "\n".join(
        [
            "demo: the stack is up. In another terminal, from this folder:",
            "",
            *(f"  {line}" for line in lines),
            "",
            f"  Flower: {stack.flower_url} (user {FLOWER_USER}, password {stack.flower_password})",
            f"  Logs:   {shown(stack.log_file)}; Redis data: "
            + (shown(state_dir / "redis") if stack.started_redis else "your REDIS_URL's server"),
            "",
            "demo: Ctrl+C here stops the stack.",
        ]
    )


def run_examples(client: Client, real: bool, began: float) -> str:
    """Submit the three examples, print each answer; returns the first task's id."""
    first_id = ""
    tokens = None if real else TINY_EXAMPLE_TOKENS
    for task, files in JOBS:
        images = [(EXAMPLES / name).read_bytes() for name in files]
        handle = client.submit(task, images, max_new_tokens=tokens)
        first_id = first_id or handle.id
        result: dict[str, Any] | None = client.result(handle.id, wait=True, timeout=3600)
        assert result is not None
        ok = result["state"] == "SUCCESS"
        answer = result.get("text") if ok else result.get("error")
        usage = result.get("usage", {}).get("completion_tokens", 0)
        seconds = result.get("timings", {}).get("total", 0)
        print(
            f"\n== {task} {', '.join(files)} ({result['state']}, {usage} tokens, "
            f"{seconds:.2f}s on {result.get('device')}; {time.monotonic() - began:.1f}s "
            f"since the demo started) id {handle.id}\n{answer}",
            flush=True,
        )
    return first_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the stack running")
    parser.add_argument(
        "--state-dir", type=Path, default=ROOT / "var" / "demo",
        help="logs, Redis data and the lock (default var/demo)",
    )
    args = parser.parse_args(argv)
    began = time.monotonic()
    state_dir = args.state_dir.resolve()
    try:
        lock = acquire_state_dir(state_dir)
    except DemoRunning as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    # SIGTERM stops the stack as Ctrl+C does (children run in their own sessions, so a
    # Ctrl+C in this terminal reaches only the demo, which stops them in order).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    processes: list[subprocess.Popen[bytes]] = []
    redis_server: RedisServer | None = None
    try:
        model, real = choose_model()
        if not real:
            print(
                "demo: NOTE no real Phi-3-vision or Phi-3.5-vision weights here; using the small "
                f"RANDOM checkpoint {model}. Its answers are random text, not descriptions. "
                "README.md says how to get the weights."
            )
        redis_url = os.environ.get("REDIS_URL", "")
        if redis_url:
            if not redis_reachable(redis_url):
                print("demo: REDIS_URL is set but does not answer PING (address or password); "
                      "unset it to let the demo start its own Redis", file=sys.stderr)
                return 1
            print("demo: using the Redis at REDIS_URL (starting none)")
        else:
            redis_server = RedisServer(state_dir / "redis")
            redis_server.start()
            redis_url = redis_server.url
            print(f"demo: started redis-server on 127.0.0.1:{redis_server.port}")
        env = stack_env(dict(os.environ), redis_url, model, real, state_dir)
        flower_port, flower_password = free_port(), secrets.token_urlsafe(9)
        log_file = state_dir / "stack.log"
        stack = Stack(
            redis_url=redis_url, started_redis=redis_server is not None,
            caps=env["VQ_MAX_NEW_TOKENS_CAPS"], flower_url=f"http://127.0.0.1:{flower_port}/",
            flower_password=flower_password, health_file=Path(env["VQ_HEALTH_FILE"]),
            log_file=log_file,
        )
        processes = start_stack(env, log_file, flower_port, flower_password)
        with (state_dir / LOCK_NAME).open("a") as pids:  # for whoever wonders what runs
            pids.write(" ".join(str(p.pid) for p in processes) + "\n")
        print(f"demo: loading {model}; logs in {log_file}", flush=True)
        with Client(Settings.from_env(env)) as client:
            example_id = run_examples(client, real, began)
        if not wait_for_port(flower_port, 60):
            print(f"demo: Flower did not start; see {log_file}")
        if not args.keep:
            print("\ndemo: done; stopping the stack (`make demo` keeps it up to try commands)")
            return 0
        print("\n" + try_next(stack, example_id, state_dir), flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    except SettingsError as exc:
        print(f"demo: invalid settings: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        print("demo: stopping the stack", flush=True)
        stop_stack(processes, redis_server)
        lock.close()


def start_stack(
    env: dict[str, str], log_file: Path, flower_port: int, flower_password: str
) -> list[subprocess.Popen[bytes]]:
    log = log_file.open("ab")
    worker = [sys.executable, "-m", "worker.cli", "run"]
    flower = [
        sys.executable, "-m", "celery", "-A", "producer.flower_app:app", "flower",
        "--address=127.0.0.1", f"--port={flower_port}",
        f"--basic-auth={FLOWER_USER}:{flower_password}",
    ]
    return [
        subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for command in (worker, flower)
    ]


def stop_stack(processes: list[subprocess.Popen[bytes]], redis_server: RedisServer | None) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if redis_server is not None:
        redis_server.stop()


if __name__ == "__main__":
    sys.exit(main())
