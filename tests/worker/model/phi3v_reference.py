"""Paths and cases of the tiny reference checkpoint (tests/data/phi3v-reference)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "data" / "phi3v-reference"
TINY_MODEL_DIR = REFERENCE_DIR / "model"
IMAGES_DIR = REFERENCE_DIR / "images"


def load_cases() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((REFERENCE_DIR / "cases.json").read_text(encoding="utf-8"))
    return data
