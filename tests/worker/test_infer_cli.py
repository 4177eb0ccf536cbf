"""`worker infer`: one request without the queue, on the tiny reference checkpoint (CPU)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.phi35v import PHI35_CASES, infer_argv

from vision_queue.protocol import TASK_SPECS, TaskName
from vision_queue.results import Result, ResultTimings
from vision_queue.settings import Settings
from worker.infer_cli import infer_main

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "data" / "phi3v-reference"
MODEL = str(REFERENCE_DIR / "model")
IMAGE = str(REFERENCE_DIR / "images" / "shapes_640x480.png")
OTHER = str(REFERENCE_DIR / "images" / "small_400x300.jpg")
BASE = ["--model", MODEL, "--device", "cpu", "--max-new-tokens", "4"]


def infer(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = infer_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_has_the_shape_of_a_queued_result_plus_token_ids(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given one describe answered without the queue, when printed as JSON, then it reads
    # like `producer result --json` (the same keys, Result's TypedDict), plus the ids.
    code, out, _ = infer(capsys, *BASE, "--task", "describe", "--image", IMAGE, "--json")

    assert code == 0
    result = json.loads(out)
    assert set(result) == set(Result.__required_keys__) | {"token_ids"}  # optional keys: none asked
    assert (result["task"], result["state"], result["finish_reason"]) == (
        "describe", "SUCCESS", "length"
    )
    assert result["usage"] == {"prompt_tokens": 1939, "completion_tokens": 4, "cached_tokens": 0}
    assert len(result["token_ids"]) == 4
    assert set(result["timings"]) == set(ResultTimings.__annotations__)
    assert result["timings"]["total"] >= result["timings"]["generate"] > 0
    assert (result["model"], result["device"]) == (MODEL, "cpu")
    assert isinstance(result["text"], str)


def test_json_output_keeps_non_ascii_text_as_it_is(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.inference import engine as engine_module

    generate = engine_module.Engine.generate

    def with_accents(self: Any, request: Any) -> Any:
        return dataclasses.replace(generate(self, request), text="café – 東京")

    monkeypatch.setattr(engine_module.Engine, "generate", with_accents)
    code, out, _ = infer(capsys, *BASE, "--task", "describe", "--image", IMAGE, "--json")
    assert code == 0
    assert "café – 東京" in out  # not \u escapes: what `producer result --json` prints
    assert json.loads(out)["text"] == "café – 東京"


def test_describe_uses_the_contract_prompt_and_ask_a_free_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.inference import engine as engine_module

    prompts: list[str] = []
    generate = engine_module.Engine.generate

    def spy(self: Any, request: Any) -> Any:
        prompts.append(request.prompt)
        return generate(self, request)

    monkeypatch.setattr(engine_module.Engine, "generate", spy)
    assert infer(capsys, *BASE, "--task", "describe", "--image", IMAGE)[0] == 0
    assert infer(capsys, *BASE, "--task", "ask", "--prompt", "What is 2+2?")[0] == 0

    assert prompts == [TASK_SPECS[TaskName.DESCRIBE].fixed_prompt, "What is 2+2?"]


def test_plain_output_is_the_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = infer(capsys, *BASE, "--task", "compare", "--image", IMAGE, "--image", OTHER,
                         "--num-crops", "4")

    assert code == 0 and out.endswith("\n") and not out.startswith("{")


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--task", "compare", "--image", IMAGE], "compare takes 2..8 image(s), got 1"),
        (["--task", "summarise", "--image", IMAGE], "unknown task 'summarise'"),
        (["--task", "describe", "--image", "/no/such/image.png"], "cannot read image"),
        (["--task", "describe", "--image", str(REFERENCE_DIR / "cases.json")], "not a PNG, JPEG"),
        (["--task", "describe", "--image", IMAGE, "--prompt", "hi"], "fixed prompt"),
        (["--task", "ask"], "ask needs a prompt"),
        (["--task", "ask", "--prompt", "x", "--num-crops", "17"], "num_crops"),
        (["--task", "ask", "--prompt", "x", "--device", "gpu7"], "argument --device"),
        (["--image", IMAGE], "required: --task"),
    ],
)
def test_bad_arguments_exit_2_with_a_one_line_reason(
    capsys: pytest.CaptureFixture[str], argv: list[str], reason: str
) -> None:
    code, out, err = infer(capsys, "--model", "/not/loaded/anyway", *argv)

    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and reason in err


def test_a_model_that_cannot_load_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = infer(capsys, "--model", "/no/checkpoint", "--task", "ask", "--prompt", "x")

    assert code == 1 and "neither a checkpoint folder" in err


def test_urls_are_fetched_by_the_guarded_fetcher(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched: list[str] = []

    def fake_fetch(url: str, settings: Settings) -> bytes:
        fetched.append(url)
        return Path(IMAGE).read_bytes()

    monkeypatch.setattr("worker.fetch.fetch_image_bytes", fake_fetch)
    code, _, _ = infer(capsys, *BASE, "--task", "ocr", "--image", "https://example.com/a.png")

    assert code == 0 and fetched == ["https://example.com/a.png"]


def test_the_module_runs_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.infer_cli", "--help"], capture_output=True, text=True,
        check=False,
    )

    assert result.returncode == 0 and "--task" in result.stdout


def test_as_a_program_the_whole_answer_arrives_through_a_pipe_before_the_fast_exit() -> None:
    # The program ends with os._exit (no interpreter teardown): output must be flushed first.
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "infer", *BASE, "--task", "describe", "--image",
         IMAGE, "--json"],
        capture_output=True, text=True, check=False,
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["usage"]["completion_tokens"] == 4


def test_as_a_program_a_bad_request_still_exits_2_with_its_reason() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "worker.infer_cli", "--model", MODEL, "--task", "ask"],
        capture_output=True, text=True, check=False,
    )

    assert done.returncode == 2
    assert done.stdout == "" and "ask needs a prompt" in done.stderr



# Phi-3.5-vision: a checkpoint folder of its own, served as a Phi-3-vision one is ------------


@pytest.mark.parametrize("case_id", list(PHI35_CASES))
def test_every_phi35_case_gives_the_reference_ids_and_text(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, case_id: str
) -> None:
    monkeypatch.delenv("VQ_LONGROPE_SWITCH", raising=False)  # auto: what config.json says
    code, out, err = infer(capsys, *infer_argv(case_id))

    assert code == 0, err
    result = json.loads(out)
    case = PHI35_CASES[case_id]
    assert result["token_ids"] == case["generated_ids"]
    assert result["text"] == case["generated_text"]
    assert result["usage"] == {
        "prompt_tokens": case["prompt_tokens"],
        "completion_tokens": len(case["generated_ids"]),
        "cached_tokens": 0,
    }


def test_as_a_program_a_phi35_checkpoint_logs_its_switch_behaviour() -> None:
    case_id = "crosses_2048_at_step1_c16"
    env = {k: v for k, v in os.environ.items() if k != "VQ_LONGROPE_SWITCH"}
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "infer", *infer_argv(case_id)],
        capture_output=True, text=True, check=False, env=env,
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["token_ids"] == PHI35_CASES[case_id]["generated_ids"]
    assert "LongRoPE switch at 2048 positions: recompute (config.json names" in done.stderr
    assert "recomputed a row's 2049 positions with the long factors" in done.stderr
