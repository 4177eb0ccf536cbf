"""The reference cases (tests/data/phi3v-reference) as engine requests and scheduler jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from worker.inference.engine import Engine, GenerationRequest
    from worker.inference.scheduler import Job

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "data" / "phi3v-reference"
TINY_MODEL = REFERENCE_DIR / "model"
IMAGES_DIR = REFERENCE_DIR / "images"
CASES: dict[str, dict[str, Any]] = {
    case["id"]: case
    for case in json.loads((REFERENCE_DIR / "cases.json").read_text(encoding="utf-8"))["cases"]
}


def images_of(case_id: str) -> list[Image.Image]:
    from vision_queue.images import decode_image  # the worker's own decoder, as in production

    return [decode_image((IMAGES_DIR / name).read_bytes()) for name in CASES[case_id]["images"]]


def case_request(case_id: str, **overrides: Any) -> GenerationRequest:
    from worker.inference.engine import GenerationRequest

    case = CASES[case_id]
    fields: dict[str, Any] = {
        "prompt": case["prompt"],
        "images": images_of(case_id),
        "max_new_tokens": case["max_new_tokens"],
        "num_crops": case["num_crops"],
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


def case_job(engine: Engine, case_id: str, max_new_tokens: int | None = None) -> Job:
    """The job the engine would hand its scheduler for this case (greedy)."""
    from worker.inference.scheduler import Job
    from worker.model.processor import chat_text

    case = CASES[case_id]
    encoded = engine.processor.encode(
        chat_text(case["prompt"], len(case["images"])), images_of(case_id), case["num_crops"]
    )
    crops = engine.processor.crops(encoded) if encoded.images else None
    return Job(encoded, crops, max_new_tokens or case["max_new_tokens"])
