"""Paths and cases of the tiny reference checkpoints (tests/data/phi3v-reference, and
tests/data/phi35v-reference for Phi-3.5-vision)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "data" / "phi3v-reference"
TINY_MODEL_DIR = REFERENCE_DIR / "model"
IMAGES_DIR = REFERENCE_DIR / "images"
PHI35_DIR = REFERENCE_DIR.parent / "phi35v-reference"


def load_cases(folder: Path = REFERENCE_DIR) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "cases.json").read_text(encoding="utf-8"))
    return data
