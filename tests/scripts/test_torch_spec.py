"""setup's torch check: `TORCH_SPEC=... make setup` gets the torch it asks for.

The decision itself, on versions as `importlib.metadata` reports them (no torch installed
or removed here); scripts/setup.sh acts on it: keep, install, or uninstall then install.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scripts.torch_spec import BAD_SPEC, INSTALL, KEEP, REPLACE, decide

CUDA_INDEX = "--index-url https://download.pytorch.org/whl/cu128"


@pytest.mark.parametrize(
    ("installed", "spec", "explicit", "last", "action"),
    [
        # Nothing there: install whatever is asked, or the default.
        (None, "torch==2.13.0", False, None, INSTALL),
        (None, f"torch {CUDA_INDEX}", True, None, INSTALL),
        # No TORCH_SPEC: a torch already there (a GPU host's own build) is kept.
        ("2.9.1+cu126", "torch==2.13.0", False, None, KEEP),
        ("2.13.0+cpu", "torch==2.13.0", False, "torch==2.13.0", KEEP),
        # The issue: a CPU build is there and TORCH_SPEC asks for a (CUDA) torch.
        ("2.13.0+cpu", "torch", True, "torch==2.13.0", REPLACE),
        ("2.13.0+cpu", f"torch==2.13.0 {CUDA_INDEX}", True, "torch==2.13.0", REPLACE),
        ("2.13.0+cpu", "torch==2.13.0", True, None, REPLACE),
        # A version the installed one does not satisfy.
        ("2.9.1+cu126", "torch>=2.13", True, None, REPLACE),
        ("2.13.0", "torch==2.12.0", True, None, REPLACE),
        # Satisfied: a CUDA build for a plain spec, a CPU build for a CPU spec, or the
        # very spec setup installed last time (a second run only checks).
        ("2.13.0+cu128", "torch>=2.5", True, None, KEEP),
        ("2.13.0+cpu", "torch==2.13.0+cpu", True, None, KEEP),
        ("2.13.0+cpu", "torch --index-url https://download.pytorch.org/whl/cpu", True, None, KEEP),
        ("2.13.0", f"torch {CUDA_INDEX}", True, f"torch {CUDA_INDEX}", KEEP),
        ("2.13.0+cpu", "torch==2.13.0", True, "torch==2.13.0", KEEP),
        # Not a torch requirement at all.
        ("2.13.0", "numpy", True, None, BAD_SPEC),
        ("2.13.0", "torch>=>2", True, None, BAD_SPEC),
    ],
)
def test_decide(
    installed: str | None, spec: str, explicit: bool, last: str | None, action: int
) -> None:
    decision = decide(installed, spec, explicit=explicit, last_spec=last)

    assert decision.action == action, decision.reason
    assert decision.reason


def test_the_script_reports_the_installed_torch_with_its_exit_code(tmp_path: Path) -> None:
    # This very environment has a torch: asked for none it can satisfy, it must replace it.
    script = Path(__file__).resolve().parents[2] / "scripts" / "torch_spec.py"
    stamp = tmp_path / "stamp"
    run = subprocess.run(
        [sys.executable, str(script), "--explicit", "--stamp", str(stamp), "--", "torch<1"],
        capture_output=True, text=True, check=False,
    )

    assert run.returncode == REPLACE, run.stdout + run.stderr
    assert "does not satisfy torch<1" in run.stdout
