"""The Phi-3.5-vision reference cases (tests/data/phi35v-reference) as requests, jobs and
`worker infer` arguments.

Microsoft's Phi-3.5 code recomputes a sequence with the long factors at the decode step
where it first grows past `original_max_position_embeddings` (2,048 here); the cases in
`CROSSING` do that, at the steps their `recompute_steps` name. `prompt_2049_long_prefill_c16`
is long from its prompt on, so it never recomputes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from worker.inference.engine import Engine, GenerationRequest
    from worker.inference.scheduler import Job

PHI35_DIR = Path(__file__).resolve().parents[1] / "data" / "phi35v-reference"
PHI35_MODEL = PHI35_DIR / "model"
PHI35_IMAGES = PHI35_DIR / "images"
PHI35_REFERENCE: dict[str, Any] = json.loads((PHI35_DIR / "cases.json").read_text("utf-8"))
PHI35_CASES: dict[str, dict[str, Any]] = {case["id"]: case for case in PHI35_REFERENCE["cases"]}
CROSSING = [case_id for case_id, case in PHI35_CASES.items() if case["recompute_steps"]]
SWITCH = PHI35_REFERENCE["rope"]["original_max_position_embeddings"]


def num_crops_of(case_id: str) -> int | None:
    """The case's crop count, or None where the reference used the checkpoint's default."""
    case = PHI35_CASES[case_id]
    return None if case["num_crops_from_checkpoint"] else int(case["num_crops"])


def images_of(case_id: str) -> list[Image.Image]:
    from vision_queue.images import decode_image  # the worker's own decoder

    return [decode_image((PHI35_IMAGES / n).read_bytes()) for n in PHI35_CASES[case_id]["images"]]


def phi35_request(case_id: str, **overrides: Any) -> GenerationRequest:
    from worker.inference.engine import GenerationRequest

    case = PHI35_CASES[case_id]
    fields: dict[str, Any] = {
        "prompt": case["prompt"],
        "images": images_of(case_id),
        "max_new_tokens": case["max_new_tokens"],
        "num_crops": num_crops_of(case_id),
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


def phi35_job(engine: Engine, case_id: str) -> Job:
    """The job the engine would hand its scheduler for this case (greedy)."""
    from worker.inference.scheduler import Job
    from worker.model.processor import chat_text

    case = PHI35_CASES[case_id]
    text = chat_text(case["prompt"], len(case["images"]))
    encoded = engine.processor.encode(text, images_of(case_id), num_crops_of(case_id))
    crops = engine.processor.crops(encoded) if encoded.images else None
    return Job(encoded, crops, case["max_new_tokens"])


def infer_argv(case_id: str) -> list[str]:
    """`worker infer` arguments that ask the case's question (--json, float32 on the CPU)."""
    case = PHI35_CASES[case_id]
    argv = ["--model", str(PHI35_MODEL), "--device", "cpu", "--dtype", "float32", "--json"]
    argv += ["--task", "ask", "--prompt", case["prompt"]]
    argv += ["--max-new-tokens", str(case["max_new_tokens"])]
    for name in case["images"]:
        argv += ["--image", str(PHI35_IMAGES / name)]
    crops = num_crops_of(case_id)
    return argv if crops is None else [*argv, "--num-crops", str(crops)]
