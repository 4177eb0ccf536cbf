"""Every reference case through the engine, float32 on CPU, against Microsoft's own outputs.

Two references, each produced by its model's own Hub code under transformers 4.48.3:
tests/data/phi3v-reference (Phi-3-vision-128k-instruct) and tests/data/phi35v-reference
(Phi-3.5-vision-instruct, whose code recomputes at the LongRoPE switch; the engine reads
that from the checkpoint). Required to match exactly: prompt token ids and image
positions, generated token ids, decoded text, stop reason. Within 1e-4 relative: pixel
statistics, embedding statistics, first-step logits (all 32,064, so the top 10 too).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
import torch
from phi3v_reference import PHI35_DIR, REFERENCE_DIR, load_cases
from PIL import Image
from safetensors.torch import load_file

from vision_queue.images import decode_image  # the worker's own decoder, as in production
from worker.inference.engine import Engine, GenerationRequest
from worker.model.kvcache import DynamicKVCache
from worker.model.model_runner import PromptPrefill
from worker.model.processor import EncodedPrompt, chat_text

DIRS = {"phi3v": REFERENCE_DIR, "phi35v": PHI35_DIR}
REFERENCES = {name: load_cases(folder) for name, folder in DIRS.items()}
# (reference, case) pairs, named e.g. phi35v-text_only: both sets have cases of that name.
CASES = [
    pytest.param(name, case, id=f"{name}-{case['id']}")
    for name, reference in REFERENCES.items()
    for case in reference["cases"]
]
IMAGE_CASES = [param for param in CASES if param.values[1]["images"]]
REL = 1e-4


@pytest.fixture(scope="module")
def engines(cpu_engine: Engine, phi35_cpu_engine: Engine) -> dict[str, Engine]:
    return {"phi3v": cpu_engine, "phi35v": phi35_cpu_engine}


def close(actual: float, expected: float, scale: float | None = None) -> bool:
    """Within REL relative to `scale` (default: the expected value itself)."""
    return abs(actual - expected) <= REL * abs(expected if scale is None else scale)


def images_of(ref: str, case: dict[str, Any]) -> list[Image.Image]:
    images = DIRS[ref] / "images"
    return [decode_image((images / name).read_bytes()) for name in case["images"]]


def encode(engine: Engine, ref: str, case: dict[str, Any]) -> EncodedPrompt:
    text = chat_text(case["prompt"], len(case["images"]))
    assert text == case["text"]
    return engine.processor.encode(text, images_of(ref, case), case["num_crops"])


def embeddings(engine: Engine, encoded: EncodedPrompt) -> torch.Tensor:
    """The prompt's input embeddings as the runner's prefill computes them."""
    crops = engine.processor.crops(encoded) if encoded.images else None
    prompt = PromptPrefill.of(encoded, crops, start=0)
    with torch.inference_mode():
        while not engine.runner.encode_unit(prompt):
            pass
    assert prompt.embeds is not None
    return prompt.embeds


def assert_stats(tensor: torch.Tensor, expected: dict[str, Any]) -> None:
    values = tensor.double()
    assert list(values.shape) == expected["shape"]
    scale = expected["abs_sum"]
    assert close(values.sum().item(), expected["sum"], scale)
    assert close(values.abs().sum().item(), expected["abs_sum"])
    assert close(values.norm().item(), expected["l2"])
    row_scale = max(abs(v) for v in expected["row0_first8"] + expected["last_row_first8"])
    for actual, wanted in zip(values[0, :8].tolist(), expected["row0_first8"], strict=True):
        assert close(actual, wanted, row_scale)
    for actual, wanted in zip(values[-1, :8].tolist(), expected["last_row_first8"], strict=True):
        assert close(actual, wanted, row_scale)


@pytest.mark.parametrize("ref", list(DIRS))
def test_reference_images_decode_to_the_reference_rgb(ref: str) -> None:
    for name, info in REFERENCES[ref]["images"].items():
        data = (DIRS[ref] / "images" / name).read_bytes()
        rgb = np.asarray(decode_image(data), dtype=np.uint8)
        assert hashlib.sha256(rgb.tobytes()).hexdigest() == info["rgb_sha256"], name


@pytest.mark.parametrize(("ref", "case"), CASES)
def test_prompt_tokens_and_image_positions_match_exactly(
    engines: dict[str, Engine], ref: str, case: dict
) -> None:
    cpu_engine = engines[ref]
    encoded = encode(cpu_engine, ref, case)

    assert encoded.prompt_tokens == case["prompt_tokens"]
    assert encoded.input_ids == case["input_ids"]  # BOS placement and image positions
    assert [span.length for span in encoded.spans] == case["image_token_counts"]
    sizes = [[hd.rows * hd.crop_size, hd.cols * hd.crop_size] for hd in encoded.images]
    assert sizes == (case["image_sizes"] or [])


@pytest.mark.parametrize(("ref", "case"), IMAGE_CASES)
def test_pixel_values_match_the_reference_statistics(
    engines: dict[str, Engine], ref: str, case: dict
) -> None:
    cpu_engine = engines[ref]
    encoded = encode(cpu_engine, ref, case)
    crops = cpu_engine.processor.crops(encoded).split([hd.num_crops_used for hd in encoded.images])
    padded_crops = case["num_crops"] + 1  # the original zero-pads every image to this

    for image_crops, expected in zip(crops, case["pixel_values"]["per_image"], strict=True):
        values = image_crops.double()
        assert values.shape[0] == expected["used_crops"]
        scale = expected["abs_sum"]
        assert close(values.sum().item(), expected["sum"], scale)
        assert close(values.abs().sum().item(), expected["abs_sum"])
        mean = values.sum().item() / (padded_crops * values[0].numel())
        assert close(mean, expected["mean"], scale / (padded_crops * values[0].numel()))
        crop_sums = values.sum(dim=(1, 2, 3)).tolist() + [0.0] * (padded_crops - values.shape[0])
        for actual, wanted in zip(crop_sums, expected["crop_sums"], strict=True):
            assert close(actual, wanted, scale)
        assert np.allclose(values[0].flatten()[:16], expected["crop0_first16"], atol=REL, rtol=0)
        assert np.allclose(values[1].flatten()[:16], expected["crop1_first16"], atol=REL, rtol=0)


@pytest.mark.parametrize(("ref", "case"), CASES)
def test_embeddings_match_the_reference_statistics(
    engines: dict[str, Engine], ref: str, case: dict
) -> None:
    cpu_engine = engines[ref]
    encoded = encode(cpu_engine, ref, case)

    assert_stats(embeddings(cpu_engine, encoded)[0], case["inputs_embeds"])

    if case["images"]:
        embedding = cpu_engine.model.model.vision_embed_tokens
        grids = [(hd.rows, hd.cols) for hd in encoded.images]
        with torch.inference_mode():
            features = embedding.image_features(cpu_engine.processor.crops(encoded), grids)
        for actual, expected in zip(features, case["vision_intermediates"], strict=True):
            assert_stats(actual, expected["image_embeds"])


@pytest.mark.parametrize(("ref", "case"), CASES)
def test_first_step_logits_match_within_1e4(
    engines: dict[str, Engine], ref: str, case: dict
) -> None:
    cpu_engine = engines[ref]
    encoded = encode(cpu_engine, ref, case)
    embeds = embeddings(cpu_engine, encoded)
    positions = torch.arange(encoded.prompt_tokens).unsqueeze(0)
    cache = DynamicKVCache(cpu_engine.model.config.num_hidden_layers)
    with torch.inference_mode():
        logits = cpu_engine.model(embeds, positions, cache, causal=True)[0].double()
    expected = load_file(DIRS[ref] / "logits_step0.safetensors")[case["id"]].double()
    first = case["first_step_logits"]

    scale = expected.abs().max().item()
    assert (logits - expected).abs().max().item() <= REL * scale
    top_ids = first["top10_ids"]
    for actual, wanted in zip(logits[top_ids].tolist(), first["top10_values"], strict=True):
        assert close(actual, wanted, scale)
    assert int(logits.argmax()) == first["argmax"]
    assert close(logits.sum().item(), first["sum"], logits.abs().sum().item())
    assert close(logits.norm().item(), first["l2_norm"])


@pytest.mark.parametrize(("ref", "case"), CASES)
def test_generation_matches_exactly(
    engines: dict[str, Engine], ref: str, case: dict
) -> None:
    cpu_engine = engines[ref]
    request = GenerationRequest(
        prompt=case["prompt"],
        images=images_of(ref, case),
        max_new_tokens=case["max_new_tokens"],
        num_crops=case["num_crops"],
    )

    result = cpu_engine.generate(request)

    assert result.token_ids == case["generated_ids"]
    assert result.text == case["generated_text"]
    assert result.stop_reason == case["stop_reason"]
    assert result.prompt_tokens == case["prompt_tokens"]
    assert result.completion_tokens == len(case["generated_ids"])


@pytest.mark.parametrize(("ref", "case"), CASES)
def test_longrope_regime_follows_the_per_call_rule(ref: str, case: dict) -> None:
    """Long factors iff max(position)+1 > original_max_position_embeddings, call by call;
    Phi-3.5 recomputes at the one step where a sequence within the limit first passes it."""
    original = REFERENCES[ref]["rope"]["original_max_position_embeddings"]
    length = case["prompt_tokens"]

    assert case["rope_prefill"] == ("long" if length > original else "short")
    for index, step in enumerate(case["steps"][1:], start=1):
        # Decode step `index` feeds the token at position length + index - 1.
        assert step["rope"] == ("long" if length + index > original else "short")
    crossing = original + 1 - length  # the step whose sequence is original + 1 long
    expected = [crossing] if ref == "phi35v" and 1 <= crossing < len(case["steps"]) else []
    assert case.get("recompute_steps", []) == expected
    assert [i for i, step in enumerate(case["steps"]) if step.get("recomputed")] == expected
