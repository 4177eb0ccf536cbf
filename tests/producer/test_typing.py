"""The Python API as a type checker sees it: the README's snippet passes `mypy --strict`.

A waited-for result is a `Result` (never None), on `Client` and `AsyncClient` alike; an
unwaited one may be None. The project is checked as an installed package is by its users
(`--follow-imports=silent`: its types are used, its own modules are not re-linted).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)

TYPED_USES = '''
from typing import assert_type

from producer import AsyncClient, Client, Result


def waits(client: Client, task_id: str, flag: bool) -> str:
    assert_type(client.result(task_id, wait=True), Result)
    assert_type(client.result(task_id, True, 5.0), Result)
    assert_type(client.result(task_id), Result | None)
    assert_type(client.result(task_id, wait=flag), Result | None)
    result = client.result(task_id, wait=True, timeout=120)
    return result["text"] + str(result["usage"]["completion_tokens"])


async def waits_async(client: AsyncClient, task_id: str) -> str:
    assert_type(await client.result(task_id, wait=True), Result)
    assert_type(await client.result(task_id), Result | None)
    result = await client.result(task_id, wait=True, timeout=120)
    return result["finish_reason"]
'''


def readme_python_snippet() -> str:
    """The first ```python block of README.md's "From Python" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


def test_the_readme_snippet_and_typed_results_pass_mypy_strict(tmp_path: Path):
    snippet = readme_python_snippet()
    assert "client.result(handle.id, wait=True" in snippet
    (tmp_path / "readme_snippet.py").write_text(snippet)
    (tmp_path / "typed_uses.py").write_text(TYPED_USES)
    done = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--config-file", os.devnull, "--strict",
            "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"),
            str(tmp_path / "readme_snippet.py"), str(tmp_path / "typed_uses.py"),
        ],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(ROOT)},  # this checkout's producer, not another
        capture_output=True, text=True, timeout=280, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
