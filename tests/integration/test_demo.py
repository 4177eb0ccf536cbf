"""`scripts/demo.py` (what `make demo` runs), tried as a new user would, on the tiny checkpoint.

One demo kept running for the module (its own redis-server, worker and Flower): what it
prints works as printed, in a shell without any VQ_ setting; a second demo on the same
state folder refuses and leaves it alone. Then one demo against a Redis that is already
running (REDIS_URL): it uses that one and starts none.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.flower import http_get
from support.workers import TINY_MODEL, run_cli

from scripts import demo
from vision_queue.settings import Settings

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo.py"
UP = "demo: Ctrl+C here stops the stack."
TRY_NEXT = "demo: the stack is up. In another terminal, from this folder:"


def user_env(**extra: str) -> dict[str, str]:
    """A new user's shell: no VQ_ or REDIS_ settings, the small checkpoint, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VQ_", "REDIS_"))}
    env.update(VQ_MODEL=str(TINY_MODEL), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@dataclass
class RunningDemo:
    process: subprocess.Popen[str]
    state_dir: Path
    lines: list[str]

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def exported(self, name: str) -> str:
        for line in self.commands:
            words = shlex.split(line)
            if words[:1] == ["export"] and words[1].startswith(f"{name}="):
                return words[1].split("=", 1)[1]
        raise AssertionError(f"no `export {name}=` in:\n{self.output}")

    @property
    def commands(self) -> list[str]:
        """The commands printed to try next: the indented lines above the Flower line."""
        block = self.lines[self.lines.index(TRY_NEXT) + 1 :]
        commands = []
        for line in block:
            if "Flower:" in line:
                return commands
            if line.startswith("  "):
                commands.append(line.strip())
        raise AssertionError(f"no Flower line in:\n{self.output}")

    def run_printed(self, *wanted: str) -> subprocess.CompletedProcess[str]:
        """In bash, as a user pasting them: the setup lines, then the commands containing
        each of `wanted` in the order printed."""
        setup = [c for c in self.commands if c.startswith(("source ", "export "))]
        chosen = [c for c in self.commands if any(w in c for w in wanted)]
        assert len(chosen) == len(wanted), (wanted, self.commands)
        script = "set -e\n" + "\n".join(setup + chosen)
        # PYTHONPATH: the console scripts run this checkout's code (the venv may be shared).
        return subprocess.run(
            ["bash", "-c", script], cwd=ROOT, env=user_env(PYTHONPATH=str(ROOT)),
            capture_output=True, text=True, timeout=600, check=False,
        )


def start_demo(state_dir: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(DEMO), "--state-dir", str(state_dir), *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def read_until(process: subprocess.Popen[str], marker: str, timeout_s: float) -> list[str]:
    """Lines printed up to `marker`; fails with the output if the demo ends first."""
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    while True:
        line = lines.get(timeout=timeout_s)
        if line is None:
            printed = "\n".join(seen)
            raise AssertionError(f"demo ended before `{marker}`:\n{printed}")
        seen.append(line)
        if line == marker:
            return seen


@pytest.fixture(scope="module")
def kept_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDemo]:
    state_dir = tmp_path_factory.mktemp("demo-state")
    process = start_demo(state_dir, user_env(), "--keep")
    try:
        yield RunningDemo(process, state_dir, read_until(process, UP, timeout_s=600))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)


def test_the_printed_redis_url_and_producer_status_reach_the_stack(
    kept_demo: RunningDemo,
) -> None:
    redis_url = kept_demo.exported("REDIS_URL")
    status = kept_demo.run_printed("# one of the examples above")

    assert re.fullmatch(r"redis://:[^@]+@127\.0\.0\.1:\d+/0", redis_url)  # password included
    assert status.returncode == 0, status.stderr
    assert ": succeeded on " in status.stdout


def test_a_request_above_the_old_demo_cap_is_answered_not_refused_by_the_worker(
    kept_demo: RunningDemo,
) -> None:
    # As seen: `--max-new-tokens 500` was accepted by the producer, then refused by a
    # worker capped at 24. The printed commands submit exactly that, then wait.
    done = kept_demo.run_printed("--max-new-tokens 500", "producer result $ID --wait")

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip()  # the text
    cap = Settings.from_env(user_env()).token_caps["describe"]
    assert cap >= 500


def test_the_printed_flower_login_and_health_command_work(kept_demo: RunningDemo) -> None:
    flower = re.search(r"Flower: (http://\S+) \(user (\S+), password (\S+)\)", kept_demo.output)

    assert flower is not None
    url, user, password = flower.groups()
    assert http_get(url + "api/workers", auth=(user, password)).status == 200
    assert http_get(url + "api/workers").status == 401
    health = kept_demo.run_printed("worker health --ready")
    assert health.returncode == 0, health.stderr
    assert health.stdout.startswith("ready")


def test_a_second_kept_demo_on_the_same_state_refuses_and_leaves_the_first_running(
    kept_demo: RunningDemo, tmp_path: Path
) -> None:
    state_dir = kept_demo.state_dir
    before = sorted(path.name for path in state_dir.iterdir())

    second = start_demo(state_dir, user_env(), "--keep")
    out, _ = second.communicate(timeout=120)

    assert second.returncode == 1
    assert f"another demo is running on {state_dir} (pid {kept_demo.process.pid})" in out
    assert sorted(path.name for path in state_dir.iterdir()) == before
    assert kept_demo.process.poll() is None
    redis_url = kept_demo.exported("REDIS_URL")
    example_id = re.search(r"producer status ([0-9a-f-]{36})", kept_demo.output)
    assert example_id is not None
    status = run_cli("producer", ["status", example_id.group(1)], user_env(REDIS_URL=redis_url))
    assert status.returncode == 0, status.stderr


def test_with_redis_url_given_the_demo_uses_that_redis_and_starts_none(
    redis_server, redis_url: str, tmp_path: Path
) -> None:
    process = start_demo(tmp_path / "state", user_env(REDIS_URL=redis_url))
    out, _ = process.communicate(timeout=600)

    assert process.returncode == 0, out
    assert "using the Redis at REDIS_URL (starting none)" in out
    assert not (tmp_path / "state" / "redis").exists()  # a started one keeps its data there
    results = redis_server.client().keys("celery-task-meta-*")
    assert len(results) == len(demo.JOBS)  # the three examples' results landed here


def test_both_sides_of_the_stack_get_one_cap_value() -> None:
    env = demo.stack_env(user_env(), "redis://:p@127.0.0.1:1/0", str(TINY_MODEL), False,
                         Path("/tmp/state"))
    mine = demo.stack_env(user_env(VQ_MAX_NEW_TOKENS_CAPS="describe=9,ocr=9,compare=9,ask=9"),
                          "redis://:p@127.0.0.1:1/0", str(TINY_MODEL), False, Path("/tmp/state"))

    # The demo's client and its worker read the same environment: the user's caps or none.
    assert env["VQ_MAX_NEW_TOKENS_CAPS"] == Settings.from_env({}).max_new_tokens_caps
    assert mine["VQ_MAX_NEW_TOKENS_CAPS"] == "describe=9,ocr=9,compare=9,ask=9"


@pytest.mark.parametrize("tiny", demo.TINY_MODELS, ids=["phi3v", "phi35v"])
def test_the_shipped_random_checkpoints_are_never_taken_for_real_weights(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VQ_MODEL", str(tiny))
    assert demo.choose_model() == (str(tiny), False)

    # A checkpoint folder of its own (e.g. downloaded Phi-3.5-vision weights) is real.
    (tmp_path / "config.json").write_text((tiny / "config.json").read_text())
    monkeypatch.setenv("VQ_MODEL", str(tmp_path))
    assert demo.choose_model() == (str(tmp_path), True)


def test_the_demo_answers_its_examples_with_a_phi35_checkpoint_folder(
    redis_server, redis_url: str, tmp_path: Path
) -> None:
    phi35 = ROOT / "tests" / "data" / "phi35v-reference" / "model"
    process = start_demo(tmp_path / "state", user_env(REDIS_URL=redis_url, VQ_MODEL=str(phi35)))
    out, _ = process.communicate(timeout=600)

    assert process.returncode == 0, out
    assert f"RANDOM checkpoint {phi35}" in out
    assert out.count("(SUCCESS, ") == len(demo.JOBS)
