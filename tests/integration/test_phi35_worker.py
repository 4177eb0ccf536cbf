"""A real worker serving a Phi-3.5-vision checkpoint: rows that cross the LongRoPE switch
while decoding are recomputed, next to rows that do not, and every answer is exact.

The tiny Phi-3.5 reference checkpoint (tests/data/phi35v-reference, switch at 2,048
positions) runs in float32 on the CPU with four slots and prompts prefilled 512 positions
at a time, so a crossing row's re-prefill runs in units while its neighbours decode.
Every one of the seventeen cases, at most four at a time, each with its own small budget
(12 to 32 tokens); the four crossing ones are queued first, each next to one that does not
cross.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from support.phi35v import PHI35_CASES, PHI35_IMAGES, PHI35_MODEL, num_crops_of
from support.workers import WorkerProcess

from producer import Client
from vision_queue.settings import Settings

pytestmark = pytest.mark.timeout(600)

# Submitted in this order: crossing rows first, each beside a row that does not cross.
CROSSING = [c for c in PHI35_CASES if PHI35_CASES[c]["recompute_steps"]]
OTHERS = ["prompt_2049_long_prefill_c16", "text_only", "two_frames_c4", "text_eos_stop"]
CASE_IDS = [c for pair in zip(CROSSING, OTHERS, strict=True) for c in pair] + [
    c for c in PHI35_CASES if c not in CROSSING and c not in OTHERS
]
CAPS = "describe=16,ocr=16,compare=16,ask=32"


@pytest.fixture(scope="module")
def phi35_worker(module_redis, tmp_path_factory) -> Iterator[WorkerProcess]:
    with WorkerProcess(
        module_redis.url,
        tmp_path_factory.mktemp("phi35-worker"),
        VQ_MODEL=str(PHI35_MODEL),
        VQ_MAX_BATCH="4",
        VQ_PREFILL_CHUNK_TOKENS="512",
        VQ_NUM_CROPS="0",  # the checkpoint's own default (4), as the reference had it
        VQ_MAX_NEW_TOKENS_CAPS=CAPS,
        VQ_MAX_RETRIES="0",
    ) as worker:
        yield worker


@pytest.fixture
def phi35_client(module_redis, phi35_worker) -> Iterator[Client]:
    settings = Settings.from_env({}, redis_url=module_redis.url, max_new_tokens_caps=CAPS)
    with Client(settings) as client:
        yield client


def test_rows_crossing_the_switch_beside_rows_that_do_not_get_the_reference_answers(
    phi35_client: Client, phi35_worker: WorkerProcess
) -> None:
    # Given a Phi-3.5 checkpoint, whose config.json says it recomputes at the switch,
    assert "LongRoPE switch at 2048 positions: recompute" in phi35_worker.log()

    # when all seventeen cases are queued at once for a worker with four slots,
    ids = {}
    for case_id in CASE_IDS:
        case = PHI35_CASES[case_id]
        handle = phi35_client.submit(
            "ask",
            [PHI35_IMAGES / name for name in case["images"]],
            case["prompt"],
            max_new_tokens=case["max_new_tokens"],
            num_crops=num_crops_of(case_id),
        )
        ids[case_id] = handle.id
    assert sorted(ids) == sorted(PHI35_CASES)
    most, deadline = 0, time.monotonic() + 300
    while not all(phi35_client.status(i).done for i in ids.values()):
        running = phi35_worker._health().get("running") or {}
        most = max(most, len(running) if isinstance(running, dict) else 0)
        assert time.monotonic() < deadline, "the worker did not finish"
        time.sleep(0.02)

    # then each has exactly the reference's text, token counts and finish reason,
    for case_id, task_id in ids.items():
        case = PHI35_CASES[case_id]
        result = phi35_client.result(task_id, wait=True, timeout=120)
        assert result is not None and result["state"] == "SUCCESS", (case_id, result)
        assert result["text"] == case["generated_text"], case_id
        counts = result["usage"]
        assert (counts["prompt_tokens"], counts["completion_tokens"]) == (
            case["prompt_tokens"],
            len(case["generated_ids"]),
        ), case_id
        finish = "length" if case["stop_reason"] == "length" else "stop"
        assert result["finish_reason"] == finish, case_id
    # the tasks ran side by side, and each crossing row was recomputed once, no other row.
    assert most > 1
    assert phi35_worker.log().count("LongRoPE switch: recomputed") == len(CROSSING) == 4
