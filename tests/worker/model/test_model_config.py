"""Reading the official config.json: what is accepted, what defaults apply, what is refused."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from phi3v_reference import TINY_MODEL_DIR

from vision_queue.errors import ModelError
from worker.model.config import Phi3VConfig, PreprocessorConfig

REPO = Path(__file__).resolve().parents[3]
REAL_CONFIG = REPO / "benchmarks" / "configs" / "phi3v-128k-config.json"


def tiny_raw() -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    return raw


def test_the_real_config_describes_phi3_vision_with_a_vit_l14_336_tower() -> None:
    config = Phi3VConfig.from_file(REAL_CONFIG)

    assert config.hidden_size == 3072 and config.intermediate_size == 8192
    assert config.num_hidden_layers == config.num_attention_heads == 32
    assert config.num_key_value_heads == 32
    assert config.vision.hidden_size == 1024 and config.vision.num_hidden_layers == 24
    assert config.vision.num_attention_heads == 16 and config.vision.hidden_act == "quick_gelu"
    assert config.vision.grid == 24
    assert config.image.layer_idx == -2 and config.image.hd_transform_order == "sub_glb"
    assert len(config.rope.short_factor) == len(config.rope.long_factor) == 48
    assert config.rope.original_max_positions == 4096
    expected_scaling = math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))
    assert config.rope.attention_scaling == pytest.approx(expected_scaling)


def test_the_tiny_config_takes_its_tower_from_vision_config() -> None:
    config = Phi3VConfig.from_file(TINY_MODEL_DIR / "config.json")

    assert config.vision.hidden_size == 32 and config.vision.num_hidden_layers == 2
    assert config.rope.original_max_positions == 2048
    assert config.rope.attention_scaling == pytest.approx(math.sqrt(17 / 11))


def test_longrope_is_accepted_under_both_names() -> None:
    raw = tiny_raw()
    raw["rope_scaling"]["type"] = "longrope"

    assert Phi3VConfig.from_dict(raw).rope == Phi3VConfig.from_dict(tiny_raw()).rope


def test_no_rope_scaling_means_plain_rope() -> None:
    raw = tiny_raw()
    raw["rope_scaling"] = None
    rope = Phi3VConfig.from_dict(raw).rope

    assert set(rope.short_factor) == set(rope.long_factor) == {1.0}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw.update(model_type="phi3"), "phi3_v"),
        (lambda raw: raw["rope_scaling"].update(type="yarn"), "rope_scaling"),
        (lambda raw: raw["rope_scaling"].update(short_factor=[1.0]), "entries"),
        (lambda raw: raw["embd_layer"].update(projection_cls="linear"), "projection_cls"),
        (lambda raw: raw["embd_layer"].update(hd_transform_order="zigzag"), "hd_transform_order"),
        (lambda raw: raw["img_processor"].update(num_img_tokens=100), "num_img_tokens"),
        (lambda raw: raw.pop("hidden_size"), "hidden_size"),
    ],
)
def test_what_cannot_be_run_is_refused_with_a_model_error(change: Any, message: str) -> None:
    raw = copy.deepcopy(tiny_raw())
    change(raw)

    with pytest.raises(ModelError, match=message):
        Phi3VConfig.from_dict(raw)


def test_an_unknown_tower_without_vision_config_is_refused() -> None:
    raw = tiny_raw()
    del raw["img_processor"]["vision_config"]
    raw["img_processor"]["model_name"] = "openai/clip-vit-base-patch32"

    with pytest.raises(ModelError, match="vision tower"):
        Phi3VConfig.from_dict(raw)


def test_preprocessor_config_defaults_when_the_file_is_absent(tmp_path: Path) -> None:
    assert PreprocessorConfig.from_file(tmp_path / "missing.json").num_crops == 16
    assert PreprocessorConfig.from_file(TINY_MODEL_DIR / "preprocessor_config.json").num_crops == 16


PHI35_TINY = REPO / "tests" / "data" / "phi35v-reference" / "model" / "config.json"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (REAL_CONFIG, "keep-cache"),  # Phi-3-vision-128k-instruct's own config
        (TINY_MODEL_DIR / "config.json", "keep-cache"),  # phi3v-tiny-random
        (PHI35_TINY, "recompute"),  # Phi-3.5-vision-instruct's config, tiny dims
    ],
)
def test_the_longrope_switch_behaviour_is_read_from_the_config(path: Path, expected: str) -> None:
    mode, reason = Phi3VConfig.from_file(path).longrope_switch()

    assert mode == expected
    assert "config.json" in reason


@pytest.mark.parametrize(
    ("name", "window", "expected"),
    [
        ("microsoft/Phi-3.5-vision-instruct", 131072, "recompute"),  # the name decides
        ("/models/Phi-3-vision-128k-instruct/", 262144, "keep-cache"),
        ("/home/me/finetuned", 262144, "recompute"),  # a saved fine-tune: Phi-3.5's window
        ("/home/me/finetuned", 131072, "keep-cache"),
        (None, None, "keep-cache"),
    ],
)
def test_a_renamed_checkpoint_is_told_by_its_sliding_window(
    name: str | None, window: int | None, expected: str
) -> None:
    raw = tiny_raw()
    raw["_name_or_path"], raw["sliding_window"] = name, window

    assert Phi3VConfig.from_dict(raw).longrope_switch()[0] == expected


def test_the_rope_factor_set_of_a_sequence_follows_its_length() -> None:
    rope = Phi3VConfig.from_file(TINY_MODEL_DIR / "config.json").rope

    assert (rope.factors_for(2048), rope.factors_for(2049)) == ("short", "long")
    assert rope.switches
    raw = tiny_raw()
    raw["rope_scaling"] = None
    assert not Phi3VConfig.from_dict(raw).rope.switches
