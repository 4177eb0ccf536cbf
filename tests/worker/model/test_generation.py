"""Greedy decoding: the static-cache and compiled paths agree with the eager one; stop rules;
error translation; the compiler fallback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from phi3v_reference import IMAGES_DIR, load_cases
from PIL import Image

from producer.errors import Cancelled, InvalidInput, ModelError, ResourceExhausted
from worker.engine import Engine
from worker.model import generation
from worker.model.generation import CACHE_BUCKETS, Generator, model_errors
from worker.model.processor import chat_text

CASES = {case["id"]: case for case in load_cases()["cases"]}
CPU = torch.device("cpu")


def prompt_embeddings(engine: Engine, case_id: str) -> torch.Tensor:
    case = CASES[case_id]
    images = [Image.open(IMAGES_DIR / name).convert("RGB") for name in case["images"]]
    encoded = engine.processor.encode(
        chat_text(case["prompt"], len(images)), images, case["num_crops"]
    )
    with torch.inference_mode():
        return engine.embed(encoded)


def run(generator: Generator, engine: Engine, case_id: str, **kwargs: Any) -> list[int]:
    case = CASES[case_id]
    with torch.inference_mode():
        decoded = generator.generate(
            prompt_embeddings(engine, case_id), case["max_new_tokens"],
            engine.processor.stop_token_ids, **kwargs,
        )
    return decoded.token_ids


def generator(engine: Engine, **options: Any) -> Generator:
    settings: dict[str, Any] = {"kernel": "sdpa", "static_cache": True, "compile": False}
    settings.update(options)
    return Generator(engine.model, device=CPU, **settings)


@pytest.mark.parametrize("case_id", ["decode_crosses_2048_c16", "text_eos_stop"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_the_static_cache_path_gives_the_reference_tokens(
    cpu_engine: Engine, case_id: str, kernel: str
) -> None:
    # decode_crosses_2048_c16 switches to long factors mid-decode with short-rotated keys
    # cached; text_eos_stop ends on <|end|>.
    tokens = run(generator(cpu_engine, kernel=kernel), cpu_engine, case_id)

    assert tokens == CASES[case_id]["generated_ids"]


def test_the_compiled_decode_step_traces_as_one_graph(cpu_engine: Engine) -> None:
    # fullgraph=True makes any graph break an error; the eager backend skips code generation.
    compiled = generator(cpu_engine, compile=True, compile_backend="eager")

    tokens = run(compiled, cpu_engine, "decode_crosses_2048_c16")

    assert tokens == CASES["decode_crosses_2048_c16"]["generated_ids"]
    assert all(workspace.compiled for workspace in compiled._workspaces.values())


def test_a_failing_compiler_falls_back_to_the_uncompiled_step(
    cpu_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_compile(step: Callable[..., Any], **_: Any) -> Callable[..., Any]:
        def fail(*args: Any) -> Any:
            raise RuntimeError("no compiler for this platform")

        return fail

    monkeypatch.setattr(generation.torch, "compile", broken_compile)
    fallback = generator(cpu_engine, compile=True)

    tokens = run(fallback, cpu_engine, "max_new_tokens_24_c4")

    assert tokens == CASES["max_new_tokens_24_c4"]["generated_ids"]
    assert fallback.compile is False


def test_cache_buckets_cover_prompt_plus_budget_and_beyond_them_decoding_is_eager(
    cpu_engine: Engine,
) -> None:
    static = generator(cpu_engine)

    assert static.capacity_for(2043 + 12) == 4096
    assert static.capacity_for(CACHE_BUCKETS[0]) == CACHE_BUCKETS[0]
    assert static.capacity_for(CACHE_BUCKETS[-1] + 1) is None
    assert generator(cpu_engine, static_cache=False).capacity_for(10) is None


def test_on_token_sees_every_count_and_may_stop_generation(cpu_engine: Engine) -> None:
    seen: list[int] = []
    run(generator(cpu_engine), cpu_engine, "text_eos_stop", on_token=seen.append)
    assert seen == list(range(1, len(CASES["text_eos_stop"]["generated_ids"]) + 1))

    def cancel_at_three(count: int) -> None:
        if count == 3:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        run(generator(cpu_engine), cpu_engine, "text_only", on_token=cancel_at_three)


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), ResourceExhausted),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: 1 TB"), ResourceExhausted),
        (RuntimeError("DefaultCPUAllocator: not enough memory"), ResourceExhausted),
        (RuntimeError("shape mismatch"), ModelError),
        (ValueError("bad"), ModelError),
        (InvalidInput("bad tag", field="prompt"), InvalidInput),
    ],
)
def test_model_errors_become_coded_errors(raised: Exception, expected: type) -> None:
    with pytest.raises(expected) as caught, model_errors("decoding"):
        raise raised

    assert "decoding" in str(caught.value) or expected is InvalidInput
