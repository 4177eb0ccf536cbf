"""The engine a worker keeps resident: loading, requests, errors, recovery, fault injection.

Runs on the tiny reference checkpoint (tests/data/phi3v-reference/model), on CPU; the
tests marked `gpu` need CUDA and are skipped without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from producer.errors import Cancelled, InvalidInput, ModelError, ResourceExhausted, TaskTimeout
from worker import faults
from worker.engine import Engine, EngineConfig, GenerationRequest, GenerationResult

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "data" / "phi3v-reference"
TINY_MODEL = str(REFERENCE_DIR / "model")
CASES = {c["id"]: c for c in json.loads((REFERENCE_DIR / "cases.json").read_text())["cases"]}

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(EngineConfig(model=TINY_MODEL, device="cpu"))


def case_request(case_id: str, **overrides: Any) -> GenerationRequest:
    case = CASES[case_id]
    images = [
        Image.open(REFERENCE_DIR / "images" / name).convert("RGB") for name in case["images"]
    ]
    fields: dict[str, Any] = {
        "prompt": case["prompt"], "images": images,
        "max_new_tokens": case["max_new_tokens"], "num_crops": case["num_crops"],
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


def assert_reference(result: GenerationResult, case_id: str) -> None:
    assert result.token_ids == CASES[case_id]["generated_ids"]
    assert result.text == CASES[case_id]["generated_text"]


# Loading -----------------------------------------------------------------------------------


def test_a_loaded_engine_reports_what_it_runs(engine: Engine) -> None:
    assert engine.model_id == TINY_MODEL
    assert (engine.device, engine.dtype, engine.attention) == ("cpu", "float32", "sdpa")
    assert engine.load_seconds > 0
    assert engine.peak_memory_bytes() == 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (EngineConfig(model="/no/such/checkpoint"), "neither a checkpoint folder"),
        (EngineConfig(model=TINY_MODEL, dtype="float64"), "unknown dtype"),
        (EngineConfig(model=TINY_MODEL, attention="xformers"), "unknown attention"),
        (EngineConfig(model=TINY_MODEL, device="tpu"), "unknown device"),
        (EngineConfig(model=TINY_MODEL, num_crops=0), "num_crops"),
        (EngineConfig(model=TINY_MODEL, device="cpu", attention="flash_attention_2"), "CUDA"),
    ],
)
def test_load_failures_are_model_errors_that_say_why(config: EngineConfig, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        Engine.load(config)


def test_a_checkpoint_adding_an_unchecked_control_token_is_refused(tmp_path: Path) -> None:
    # Given the reference checkpoint whose tokenizer adds one token the contract does not list
    folder = tmp_path / "model"
    folder.mkdir()
    for item in Path(TINY_MODEL).iterdir():
        (folder / item.name).symlink_to(item)
    tokenizer = json.loads((Path(TINY_MODEL) / "tokenizer.json").read_text())
    extra = {**tokenizer["added_tokens"][-1], "id": 32045, "content": "<tool_call>"}
    tokenizer["added_tokens"].append(extra)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    # Then loading fails, naming it: prompts containing it would reach the model as a token
    with pytest.raises(ModelError, match="<tool_call>"):
        Engine.load(EngineConfig(model=str(folder), device="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="CUDA is not available"):
        Engine.load(EngineConfig(model=TINY_MODEL, device="cuda:0"))


def test_importing_the_worker_package_neither_imports_torch_nor_loads_anything() -> None:
    code = "import sys, worker, worker.faults; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("dtype", "attention"), [("bfloat16", "sdpa"), ("float32", "eager")])
def test_dtype_and_attention_are_selectable(dtype: str, attention: str) -> None:
    chosen = Engine.load(
        EngineConfig(model=TINY_MODEL, device="cpu", dtype=dtype, attention=attention)
    )

    result = chosen.generate(case_request("text_eos_stop"))

    assert (chosen.dtype, chosen.attention) == (dtype, attention)
    assert result.completion_tokens >= 1
    if dtype == "float32":
        assert_reference(result, "text_eos_stop")


# Requests ------------------------------------------------------------------------------------


def test_generate_returns_text_ids_usage_and_timings(engine: Engine) -> None:
    result = engine.generate(case_request("two_images_c4"))

    assert_reference(result, "two_images_c4")
    assert result.prompt_tokens == CASES["two_images_c4"]["prompt_tokens"]
    assert result.completion_tokens == len(result.token_ids) == 12
    assert result.stop_reason == "length"
    assert min(result.preprocess_s, result.prefill_s, result.decode_s) >= 0


def test_warmup_leaves_results_unchanged(engine: Engine) -> None:
    engine.warmup()

    assert_reference(engine.generate(case_request("text_eos_stop")), "text_eos_stop")
    assert engine.generate(case_request("text_eos_stop")).stop_reason == "eos:32007"


def test_num_crops_defaults_to_the_engine_setting_and_requests_override_it() -> None:
    four = Engine.load(EngineConfig(model=TINY_MODEL, device="cpu", num_crops=4))
    image = [Image.new("RGB", (640, 480), (10, 200, 10))]

    default = four.generate(GenerationRequest("Describe.", image, 1))
    override = four.generate(GenerationRequest("Describe.", image, 1, num_crops=16))

    assert default.prompt_tokens < override.prompt_tokens


def test_concurrent_requests_are_served_one_at_a_time(engine: Engine) -> None:
    results: dict[str, GenerationResult] = {}

    def serve(case_id: str) -> None:
        results[case_id] = engine.generate(case_request(case_id))

    threads = [threading.Thread(target=serve, args=(c,)) for c in ("text_only", "wide_800x400_c1")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for case_id, result in results.items():
        assert_reference(result, case_id)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (GenerationRequest("Hi", [], 0), "max_new_tokens"),
        (GenerationRequest("Hi", [], 131072), "prompt"),  # past the model's positions
        (GenerationRequest("see <|image_1|>", [], 4), "prompt"),
        (GenerationRequest("Hi", [Image.new("RGB", (400, 300))], 4, num_crops=32), "num_crops"),
    ],
)
def test_invalid_requests_are_invalid_input_naming_the_field(
    engine: Engine, request_: GenerationRequest, field: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        engine.generate(request_)
    assert caught.value.field == field


@pytest.mark.parametrize("error", [Cancelled("client"), TaskTimeout("late"), KeyError("bug")])
def test_what_on_token_raises_propagates_unchanged(engine: Engine, error: Exception) -> None:
    def on_token(count: int) -> None:
        if count == 2:
            raise error

    with pytest.raises(type(error)) as caught:
        engine.generate(case_request("text_only", on_token=on_token))
    assert caught.value is error


# Failures and recovery ---------------------------------------------------------------------


def test_an_injected_oom_is_resource_exhausted_and_the_engine_keeps_serving(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(faults.ENV_VAR, "oom_marker=__OOM__")

    with pytest.raises(ResourceExhausted, match="out of memory"):
        engine.generate(GenerationRequest("Describe __OOM__ please", [], 4))

    assert_reference(engine.generate(case_request("max_new_tokens_24_c4")), "max_new_tokens_24_c4")


def test_running_out_of_memory_mid_decode_frees_the_request(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_call = type(engine.model).__call__
    calls = {"n": 0}

    def failing_on_third_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate")
        return model_call(self, *args, **kwargs)

    monkeypatch.setattr(type(engine.model), "__call__", failing_on_third_call)
    with pytest.raises(ResourceExhausted) as caught:
        engine.generate(case_request("text_only"))
    monkeypatch.undo()

    assert caught.value.__context__ is None  # nothing of the failed request stays referenced
    assert_reference(engine.generate(case_request("text_only")), "text_only")


def test_other_model_failures_are_model_errors(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise IndexError("index 40000 is out of bounds")

    monkeypatch.setattr(engine.model.model.vision_embed_tokens, "forward", broken)

    with pytest.raises(ModelError, match="image encoding failed: IndexError"):
        engine.generate(case_request("wide_800x400_c1"))


def test_fault_markers_are_parsed_from_the_environment_value() -> None:
    environ = {faults.ENV_VAR: "oom_marker=__OOM__, other_marker=@@,junk"}

    assert faults.parse_faults("a=1,b=2,=3,c") == {"a": "1", "b": "2"}
    assert faults.fault_for("text with __OOM__ inside", environ) == "oom"
    assert faults.fault_for("text with @@", environ) == "other"
    assert faults.fault_for("plain text", environ) is None
    assert faults.fault_for("__OOM__", {}) is None


# GPU ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compile_", [False, True])
@pytest.mark.gpu
@needs_gpu
def test_float32_on_gpu_reproduces_the_reference(
    compile_: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Full float32 in the patch convolution too, as in the CPU reference.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    gpu_engine = Engine.load(
        EngineConfig(model=TINY_MODEL, device="cuda", dtype="float32", compile=compile_)
    )

    for case_id in ("decode_crosses_2048_c16", "two_images_c4", "text_eos_stop"):
        assert_reference(gpu_engine.generate(case_request(case_id)), case_id)
    assert gpu_engine.peak_memory_bytes() > 0


@pytest.mark.gpu
@needs_gpu
def test_bfloat16_on_gpu_warms_up_serves_and_survives_an_oom(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu_engine = Engine.load(EngineConfig(model=TINY_MODEL, device="cuda"))
    gpu_engine.warmup()
    monkeypatch.setenv(faults.ENV_VAR, "oom_marker=__OOM__")

    with pytest.raises(ResourceExhausted):
        gpu_engine.generate(GenerationRequest("__OOM__", [], 4))
    result = gpu_engine.generate(case_request("img_640x480_png_c16"))

    assert gpu_engine.dtype == "bfloat16"
    assert result.completion_tokens == 12
