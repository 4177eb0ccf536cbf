"""Start-up choices: devices, dtypes, kernels and the LongRoPE switch, and the KV pool size."""

from __future__ import annotations

import json

import pytest
import torch
from support.phi35v import PHI35_MODEL

from vision_queue.errors import ModelError
from worker.inference.engine_setup import (
    EngineConfig,
    available_ram_bytes,
    choose_attention,
    choose_longrope_switch,
    kv_pool_positions,
    resolve_device,
    resolve_dtype,
)
from worker.model.config import Phi3VConfig

CPU = torch.device("cpu")
BYTES_PER_POSITION = 4096


def test_auto_picks_the_cpu_and_float32_on_a_host_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    assert resolve_device("auto") == CPU
    assert resolve_dtype("auto", CPU) == torch.float32


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "gpu0"])
def test_an_unknown_or_unavailable_device_is_a_model_error_naming_it(spec: str) -> None:
    with pytest.raises(ModelError, match=spec):
        resolve_device(spec)


def test_an_unknown_dtype_is_a_model_error_listing_the_choices() -> None:
    with pytest.raises(ModelError, match="float32"):
        resolve_dtype("int4", CPU)


def test_flash_attention_asked_for_on_the_cpu_is_refused_with_the_reason() -> None:
    with pytest.raises(ModelError, match="CUDA"):
        choose_attention("flash_attention_2", CPU, torch.float32)
    assert choose_attention("auto", CPU, torch.float32)[0] == "sdpa"


def test_the_kv_pool_setting_wins_over_free_memory() -> None:
    config = EngineConfig(model="m", max_batch=4, kv_cache_positions=5000)
    assert kv_pool_positions(config, CPU, BYTES_PER_POSITION, 131072) == 5000


def test_the_kv_pool_never_exceeds_every_row_at_the_models_full_length() -> None:
    config = EngineConfig(model="m", max_batch=2)
    assert kv_pool_positions(config, CPU, 1, 4096) == 2 * 4096


def test_too_little_memory_for_a_useful_pool_is_a_model_error_saying_what_to_set() -> None:
    config = EngineConfig(model="m", max_batch=1)
    huge = available_ram_bytes()  # a quarter of RAM holds well under 1,024 such positions
    with pytest.raises(ModelError, match="VQ_KV_CACHE_POSITIONS"):
        kv_pool_positions(config, CPU, huge, 131072)


@pytest.mark.parametrize(
    ("spec", "expected", "why"),
    [
        ("auto", "recompute", "config.json names 'Phi-3.5-vision-instruct'"),
        (" Keep-Cache ", "keep-cache", "set by VQ_LONGROPE_SWITCH"),
        ("recompute", "recompute", "set by VQ_LONGROPE_SWITCH"),
    ],
)
def test_the_longrope_switch_is_the_checkpoints_unless_set(
    spec: str, expected: str, why: str
) -> None:
    config = Phi3VConfig.from_file(PHI35_MODEL / "config.json")

    mode, reason = choose_longrope_switch(spec, config)

    assert mode == expected and reason.startswith(why)


def test_a_config_without_a_switch_says_the_behaviour_never_applies() -> None:
    raw = json.loads((PHI35_MODEL / "config.json").read_text())
    raw["rope_scaling"] = None

    mode, reason = choose_longrope_switch("auto", Phi3VConfig.from_dict(raw))

    assert mode == "recompute" and reason.endswith("this config rotates every length alike")
