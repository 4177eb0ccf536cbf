"""The README's shell examples run as written, against a live stack.

Every fenced `bash` block the README marks as tested runs in bash, unchanged, with the
variables its setup block exports (GATEWAY, VQ_API_KEY, REDIS_URL), against a real Redis,
worker and gateway on loopback. A block passes when bash exits 0 and no answer is an error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_support import API_KEY, STACK_ENV, GatewayProcess
from support.redis_server import RedisServer
from support.workers import WorkerProcess, base_env

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- tested: tests/gateway/test_readme_shell.py runs this block against a live stack -->"
# The README's commands leave token budgets at their defaults: small caps keep them short.
ENV = {**STACK_ENV, "VQ_MAX_NEW_TOKENS_CAPS": "describe=16,ocr=16,compare=16,ask=200"}


def _tested_blocks() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    blocks = []
    for index, line in enumerate(lines):
        if line != MARK:
            continue
        assert lines[index + 1] == "```bash", f"README line {index + 2}: a bash block must follow"
        end = lines.index("```", index + 2)
        blocks.append("\n".join(lines[index + 2 : end]))
    return blocks


BLOCKS = _tested_blocks()


def test_the_readme_marks_its_runnable_blocks() -> None:
    # The command line, the chat completions and the native task examples at least.
    assert len(BLOCKS) >= 3


@pytest.fixture(scope="module")
def readme_gateway(
    module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    # A worker and a gateway with the same caps; the examples name the default model.
    with (
        WorkerProcess(module_redis.url, tmp_path_factory.mktemp("readme-worker"), **ENV),
        GatewayProcess(
            module_redis.url,
            tmp_path_factory.mktemp("readme-gateway"),
            **ENV,
            VQ_GATEWAY_MODEL_NAME="phi-3-vision-128k-instruct",
        ) as process,
    ):
        yield process


@pytest.mark.parametrize("block", BLOCKS, ids=[b.splitlines()[0][:40] for b in BLOCKS])
def test_a_readme_shell_block_runs_as_written(
    block: str, readme_gateway: GatewayProcess, module_redis: RedisServer, tmp_path: Path
) -> None:
    # Given a shell where the README's setup has run (its exports), in a folder holding the
    # examples the blocks name
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = base_env(
        module_redis.url,
        **ENV,
        GATEWAY=readme_gateway.base_url,
        VQ_API_KEY=API_KEY,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=str(ROOT),
    )
    # When the block runs unchanged
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Then every command succeeded and no answer was an error
    assert done.returncode == 0, f"{block}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.stdout.strip()
    assert '"error"' not in done.stdout, done.stdout
