"""The `producer` CLI's untrusted inputs (issue #19, class 7): `--image -` reads stdin up to
the byte cap and no further, and every refusal names the file (or stdin) and the field.
Real processes: the CLI as a user runs it, on a real redis-server; nothing is queued."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from support.redis_server import RedisServer
from support.workers import IMAGES, base_env


def run(
    args: list[str], env: dict[str, str], stdin: object = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env=env,
        stdin=stdin,  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def queued(redis: RedisServer) -> int:
    client = redis.client()
    try:
        return sum(1 for _ in client.scan_iter("vq:submitted:*"))
    finally:
        client.close()


def test_an_endless_stdin_is_read_up_to_the_cap_and_refused(redis_server: RedisServer) -> None:
    env = base_env(redis_server.url, VQ_MAX_IMAGE_BYTES="100000")
    before = queued(redis_server)
    began = time.monotonic()
    with Path("/dev/zero").open("rb") as endless:
        done = run(["submit", "--task", "describe", "--image", "-"], env, stdin=endless)
    assert time.monotonic() - began < 120  # it would read /dev/zero forever otherwise
    assert done.returncode != 0
    assert "stdin (--image -)" in done.stderr
    assert "images[0]" in done.stderr
    assert "100000" in done.stderr
    assert queued(redis_server) == before


def test_a_refused_file_is_named_with_its_field(redis_server: RedisServer, tmp_path: Path) -> None:
    env = base_env(redis_server.url, VQ_MAX_IMAGE_BYTES="1000")
    photo = tmp_path / "holiday-photo.png"
    photo.write_bytes((IMAGES / "shapes_640x480.png").read_bytes())
    done = run(
        ["submit", "--task", "compare", "--image", "https://img.example/a.png",
         "--image", str(photo)],
        env,
    )
    assert done.returncode != 0
    assert "holiday-photo.png" in done.stderr
    assert "images[1]" in done.stderr
    missing = run(["submit", "--task", "describe", "--image", str(tmp_path / "gone.png")], env)
    assert missing.returncode != 0
    assert "gone.png" in missing.stderr and "images[0]" in missing.stderr
