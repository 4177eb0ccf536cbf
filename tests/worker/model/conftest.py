"""Fixtures of the model tests: the reference cases and an engine on the tiny checkpoint."""

from __future__ import annotations

from typing import Any

import pytest
from phi3v_reference import PHI35_DIR, TINY_MODEL_DIR, load_cases

from worker.inference.engine import Engine, EngineConfig


@pytest.fixture(scope="session")
def reference() -> dict[str, Any]:
    return load_cases()


@pytest.fixture(scope="session")
def cpu_engine() -> Engine:
    """The engine as the reference ran: float32 on CPU, uncompiled."""
    return Engine.load(EngineConfig(model=str(TINY_MODEL_DIR), device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def phi35_cpu_engine() -> Engine:
    """The same for the Phi-3.5-vision reference checkpoint."""
    return Engine.load(EngineConfig(model=str(PHI35_DIR / "model"), device="cpu", dtype="float32"))
