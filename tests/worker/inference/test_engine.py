"""The engine a worker keeps resident: loading, requests (alone and concurrent), sampling, stop
strings, run control, errors, recovery, fault injection.

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

from vision_queue.errors import Cancelled, InvalidInput, ModelError, ResourceExhausted, TaskTimeout
from worker.inference import faults
from worker.inference.control import RunControl
from worker.inference.engine import Engine, EngineConfig, GenerationRequest, GenerationResult

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "data" / "phi3v-reference"
TINY_MODEL = str(REFERENCE_DIR / "model")
CASES = {c["id"]: c for c in json.loads((REFERENCE_DIR / "cases.json").read_text())["cases"]}
CROSSING = "decode_crosses_2048_c16"

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(EngineConfig(model=TINY_MODEL, device="cpu", max_batch=4))


def serve_concurrently(engine: Engine, requests: dict[str, GenerationRequest]) -> dict[str, Any]:
    """Each request from its own thread, as the worker's slots do; results or exceptions."""
    outcomes: dict[str, Any] = {}

    def serve(key: str) -> None:
        try:
            outcomes[key] = engine.generate(requests[key])
        except Exception as exc:
            outcomes[key] = exc

    threads = [threading.Thread(target=serve, args=(key,)) for key in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


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


class Recorded(RunControl):
    """A run's control that records what it is told; raises `error` at token
    `raise_at_token`, or (without one) whenever it is checked while waiting."""

    def __init__(
        self, raise_at_token: int | None = None, error: Exception | None = None
    ) -> None:
        self.raise_at_token, self.error = raise_at_token, error
        self.pieces: list[str] = []
        self.prompt_tokens: int | None = None
        self.counts: list[int] = []
        self.checks = 0
        self.decoding = threading.Event()

    def on_prompt(self, tokens: int) -> None:
        self.prompt_tokens = tokens

    def on_text(self, piece: str) -> None:
        self.pieces.append(piece)

    def on_token(self, count: int) -> None:
        self.counts.append(count)
        self.decoding.set()
        if count == self.raise_at_token and self.error is not None:
            raise self.error

    def check(self) -> None:
        self.checks += 1
        if self.raise_at_token is None and self.error is not None:
            raise self.error


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
    code = "import sys, worker, worker.inference.faults; print('torch' in sys.modules)"
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


def test_concurrent_requests_each_get_their_reference_text(engine: Engine) -> None:
    case_ids = ["text_only", "wide_800x400_c1", "two_images_c4", "text_eos_stop", CROSSING]

    results = serve_concurrently(engine, {c: case_request(c) for c in case_ids})

    for case_id, result in results.items():
        assert_reference(result, case_id)
        assert result.stop_reason == CASES[case_id]["stop_reason"]


def test_a_stop_string_ends_the_text_before_it_and_streams_never_show_it(engine: Engine) -> None:
    # text_only's reference text is "irienon praktÅulturMiddle도ions...".
    control = Recorded()

    result = engine.generate(case_request("text_only", stop=("Middle",), control=control))

    assert result.text == "irienon praktÅultur"
    assert "".join(control.pieces) == result.text
    assert control.prompt_tokens == result.prompt_tokens
    # The token that completes the stop string is not reported as generated progress.
    assert control.counts == list(range(1, len(result.token_ids)))
    assert (result.stop_reason, result.finish_reason) == ("stop_string", "stop")
    reference = CASES["text_only"]["generated_ids"]
    assert result.token_ids == reference[: len(result.token_ids)]  # up to "Middle"'s token
    assert len(result.token_ids) < len(reference)


def test_sampled_text_depends_on_the_seed_not_on_the_batch(engine: Engine) -> None:
    sampled = {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 24}
    alone = engine.generate(case_request("two_images_c4", seed=5, **sampled))
    again = engine.generate(case_request("two_images_c4", seed=5, **sampled))
    other_seed = engine.generate(case_request("two_images_c4", seed=6, **sampled))

    # Given the same request among three other requests, two of them also sampling,
    crowd = serve_concurrently(engine, {
        "mine": case_request("two_images_c4", seed=5, **sampled),
        "greedy": case_request("text_only", max_new_tokens=40),
        "sampled": case_request("wide_800x400_c1", seed=1, **sampled),
        "also": case_request("max_new_tokens_24_c4", seed=5, **sampled),
    })

    assert again.token_ids == alone.token_ids and again.text == alone.text
    assert other_seed.token_ids != alone.token_ids
    assert crowd["mine"].token_ids == alone.token_ids  # the neighbours change nothing
    assert crowd["greedy"].token_ids[:12] == CASES["text_only"]["generated_ids"]


def test_a_request_waiting_for_a_row_can_be_abandoned_by_its_control() -> None:
    # Given one batch row, busy with a long request,
    single = Engine.load(EngineConfig(model=TINY_MODEL, device="cpu", max_batch=1))
    running = Recorded()
    long = case_request("text_only", max_new_tokens=400, control=running)
    results: list[GenerationResult] = []
    long_thread = threading.Thread(target=lambda: results.append(single.generate(long)))
    long_thread.start()
    assert running.decoding.wait(60)

    # when the queued request's control raises while it waits, then it ends at once with
    # that error,
    waiting = Recorded(error=Cancelled("client"))
    with pytest.raises(Cancelled):
        single.generate(case_request("wide_800x400_c1", control=waiting))
    long_thread.join()

    # and the running one is untouched.
    assert waiting.checks == 1 and not waiting.counts
    assert results[0].token_ids[:12] == CASES["text_only"]["generated_ids"]
    single.close()


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
def test_what_the_control_raises_between_tokens_propagates_unchanged(
    engine: Engine, error: Exception
) -> None:
    control = Recorded(raise_at_token=2, error=error)

    with pytest.raises(type(error)) as caught:
        engine.generate(case_request("text_only", control=control))
    assert caught.value is error
    assert control.counts == [1, 2]


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
    decode = engine.runner.decode
    calls = {"n": 0}

    def failing_on_third_call(batch: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate")
        return decode(batch)

    monkeypatch.setattr(engine.runner, "decode", failing_on_third_call)
    with pytest.raises(ResourceExhausted) as caught:
        engine.generate(case_request("text_only"))
    monkeypatch.undo()
    assert engine.pool.allocator.free_positions == engine.pool.positions  # region returned

    assert caught.value.__context__ is None  # nothing of the failed request stays referenced
    assert_reference(engine.generate(case_request("text_only")), "text_only")


def test_other_model_failures_are_model_errors(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise IndexError("index 40000 is out of bounds")

    monkeypatch.setattr(engine.model.model.vision_embed_tokens, "crop_features", broken)
    # The image cache off: a prefix it holds from an earlier test skips the image tower.
    monkeypatch.setattr(engine.image_cache, "capacity", 0)

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


@pytest.mark.gpu
@needs_gpu
def test_float32_on_gpu_batched_reproduces_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    # Full float32 in the patch convolution too, as in the CPU reference.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    gpu_engine = Engine.load(
        EngineConfig(model=TINY_MODEL, device="cuda", dtype="float32", max_batch=3)
    )
    case_ids = [CROSSING, "two_images_c4", "text_eos_stop"]

    results = serve_concurrently(gpu_engine, {c: case_request(c) for c in case_ids})

    for case_id in case_ids:
        assert_reference(results[case_id], case_id)
    assert gpu_engine.runner.decode_kernel == "rows"  # flash kernels need bf16/fp16
    assert gpu_engine.peak_memory_bytes() > 0
    gpu_engine.close()


@pytest.mark.gpu
@needs_gpu
def test_bfloat16_on_gpu_decodes_with_varlen_graphs_batched_as_alone() -> None:
    # Given the CUDA path: varlen attention over the pool, a graph per batch-size bucket,
    gpu_engine = Engine.load(EngineConfig(model=TINY_MODEL, device="cuda", max_batch=4))
    gpu_engine.warmup()
    assert gpu_engine.runner.decode_kernel == "varlen"
    assert sorted(gpu_engine.runner._graphs) == [1, 2, 4]
    case_ids = [CROSSING, "img_1280x720_jpeg_c16", "two_images_c4", "text_only"]
    alone = {c: gpu_engine.generate(case_request(c)) for c in case_ids}

    # when the same requests run together (buckets 4, 2, 1 as they finish),
    together = serve_concurrently(gpu_engine, {c: case_request(c) for c in case_ids})

    # then each gets its batch-1 tokens up to the first step where bf16 noise could
    # decide (a reference top-2 margin below 0.05).
    for case_id in case_ids:
        steps = CASES[case_id]["steps"]
        clear = next((i for i, step in enumerate(steps) if step["margin"] < 0.05), len(steps))
        assert together[case_id].token_ids[:clear] == alone[case_id].token_ids[:clear]
        assert together[case_id].completion_tokens == 12
    gpu_engine.close()


@pytest.mark.gpu
@needs_gpu
def test_the_varlen_kernel_reads_the_pool_like_the_reference_kernel() -> None:
    from worker.model.gpu_checks import varlen_problem

    assert varlen_problem(torch.device("cuda"), torch.bfloat16) is None


@pytest.mark.gpu
@needs_gpu
def test_bfloat16_on_gpu_survives_an_oom_in_the_request_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu_engine = Engine.load(EngineConfig(model=TINY_MODEL, device="cuda", max_batch=2))
    gpu_engine.warmup()
    monkeypatch.setenv(faults.ENV_VAR, "oom_marker=__OOM__")

    with pytest.raises(ResourceExhausted):
        gpu_engine.generate(GenerationRequest("__OOM__", [], 4))
    result = gpu_engine.generate(case_request("img_640x480_png_c16"))

    assert gpu_engine.dtype == "bfloat16"
    assert result.completion_tokens == 12
    gpu_engine.close()


@pytest.mark.gpu
@needs_gpu
def test_bfloat16_on_gpu_logprobs_image_reuse_and_choices() -> None:
    # Given the CUDA graph path with the image cache on, and one without it
    gpu_engine = Engine.load(EngineConfig(model=TINY_MODEL, device="cuda", max_batch=4))
    gpu_engine.warmup()
    plain = Engine.load(
        EngineConfig(model=TINY_MODEL, device="cuda", max_batch=4, image_cache_bytes=0)
    )
    case_id = "img_640x480_png_c16"
    # When a greedy request asks for logprobs (tokens and logprobs in one copy per step)
    first = gpu_engine.generate(case_request(case_id, logprobs=3))
    # Then each token is its own first alternative
    assert first.logprobs is not None and first.logprobs
    for item in first.logprobs:
        assert item["top_logprobs"][0]["token"] == item["token"]
        assert item["top_logprobs"][0]["logprob"] == item["logprob"]
    # And a hit on the image prefix gives the tokens of a miss and of no cache at all
    hit = gpu_engine.generate(case_request(case_id))
    assert hit.cached_tokens > 0
    assert hit.token_ids == first.token_ids == plain.generate(case_request(case_id)).token_ids
    # And three greedy choices from one prefill are each that text
    choices = gpu_engine.generate(case_request(case_id, n=3))
    assert [c.token_ids for c in (choices, *choices.more)] == [first.token_ids] * 3
    gpu_engine.close()
    plain.close()
