"""What the official checkpoint files say, read into typed values and checked.

The checkpoint's `config.json` has `model_type: phi3_v` and sections transformers does
not know (`embd_layer`, `img_processor`); `preprocessor_config.json` holds the crop count
and CLIP normalisation. Anything this implementation cannot run is refused here with a
ModelError, before a single weight is read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vision_queue.errors import ModelError

# The real checkpoint's config does not describe its CLIP tower: the Hub code hard-codes
# ViT-L/14 at 336 px. Small test checkpoints spell their tower out in
# `img_processor.vision_config`; these are the values when that key is absent.
CLIP_VIT_L14_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_CLIP_NAME = "openai/clip-vit-large-patch14-336"

# CLIP's normalisation, used when a checkpoint has no preprocessor_config.json.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# What a row does when its sequence first grows past `original_max_position_embeddings`
# while decoding (docs/model.md, "The LongRoPE switch"): Phi-3-vision's code keeps the keys
# it cached under the short factors; Phi-3.5-vision's code drops its cache and recomputes
# the whole sequence with the long factors.
LongRopeSwitch = Literal["keep-cache", "recompute"]
LONGROPE_SWITCHES: tuple[LongRopeSwitch, ...] = ("keep-cache", "recompute")
RopeFactors = Literal["short", "long"]
# Phi-3.5-vision's config.json: sliding_window 262144 (Phi-3-vision's is 131072).
_PHI35_SLIDING_WINDOW = 262144

END_TOKEN_ID = 32007  # <|end|>: the chat turn ends
ENDOFTEXT_TOKEN_ID = 32000  # <|endoftext|>: the tokenizer's eos


@dataclass(frozen=True)
class RopeConfig:
    """LongRoPE ("su") parameters; plain RoPE is the case where both factor lists are 1."""

    theta: float
    head_dim: int
    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_positions: int
    max_positions: int

    @property
    def attention_scaling(self) -> float:
        """cos/sin are scaled by sqrt(1 + ln(max/orig) / ln(orig)) once the context was extended."""
        scale = self.max_positions / self.original_max_positions
        if scale <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(scale) / math.log(self.original_max_positions))

    def factors_for(self, length: int) -> RopeFactors:
        """The factor set a forward call over a `length`-position sequence rotates with."""
        return "long" if length > self.original_max_positions else "short"

    @property
    def switches(self) -> bool:
        """Whether the factor sets differ, so a sequence crossing the switch sees a change."""
        differ = self.short_factor != self.long_factor
        return differ and self.original_max_positions < self.max_positions


@dataclass(frozen=True)
class VisionTowerConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    projection_dim: int
    hidden_act: str
    layer_norm_eps: float

    @property
    def grid(self) -> int:
        """Patches per side of one crop (24 for ViT-L/14 at 336 px)."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ImageEmbeddingConfig:
    hd_transform_order: str  # "sub_glb" or "glb_sub"
    image_dim_out: int  # CLIP feature width
    num_img_tokens: int  # tokens per crop after the 2x2 merge (144)
    layer_idx: int  # which CLIP hidden state feeds the projection (-2)


@dataclass(frozen=True)
class Phi3VConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    hidden_act: str
    rope: RopeConfig
    vision: VisionTowerConfig
    image: ImageEmbeddingConfig
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_file(cls, path: Path) -> Phi3VConfig:
        return cls.from_dict(_read_json(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Phi3VConfig:
        if raw.get("model_type") != "phi3_v":
            raise ModelError(
                f"config.json has model_type {raw.get('model_type')!r}; this worker serves "
                "Phi-3-vision checkpoints (model_type phi3_v)"
            )
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            config = cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                hidden_act=str(raw.get("hidden_act", "silu")),
                rope=_rope_config(raw, hidden // heads),
                vision=_vision_config(raw.get("img_processor") or {}),
                image=_image_config(raw),
                raw=raw,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"config.json is missing or has a bad value: {exc}") from exc
        config._check()
        return config

    def longrope_switch(self) -> tuple[LongRopeSwitch, str]:
        """The behaviour at the LongRoPE switch this checkpoint's own code has, and why.

        The files carry no code, so the model is told by its config: `_name_or_path` names
        it ("Phi-3.5-vision-instruct", "Phi-3-vision-128k-instruct"; a fine-tune saved
        elsewhere may hold a local path instead), else Phi-3.5's `sliding_window` 262144.
        Anything else keeps Phi-3-vision's behaviour, as every release before Phi-3.5 did.
        """
        name = str(self.raw.get("_name_or_path") or "")
        base = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
        if "phi-3.5-vision" in base:
            return "recompute", f"config.json names {name!r} (Phi-3.5-vision)"
        if "phi-3-vision" in base:
            return "keep-cache", f"config.json names {name!r} (Phi-3-vision)"
        window = self.raw.get("sliding_window")
        if window == _PHI35_SLIDING_WINDOW:
            return "recompute", f"config.json has Phi-3.5-vision's sliding_window {window}"
        return "keep-cache", "config.json shows no sign of Phi-3.5-vision"

    def _check(self) -> None:
        merged = self.vision.grid // 2
        if self.vision.grid % 2 or merged * merged != self.image.num_img_tokens:
            raise ModelError(
                f"img_processor.num_img_tokens {self.image.num_img_tokens} does not match a "
                f"{self.vision.grid}x{self.vision.grid} patch grid merged 2x2"
            )
        if self.vision.hidden_size != self.image.image_dim_out:
            raise ModelError("img_processor.image_dim_out differs from the CLIP tower's width")
        depth = self.vision.num_hidden_layers
        if not -depth <= self.image.layer_idx <= depth:
            raise ModelError(f"img_processor.layer_idx {self.image.layer_idx} is out of range")


def _rope_config(raw: dict[str, Any], head_dim: int) -> RopeConfig:
    max_positions = int(raw.get("max_position_embeddings", 4096))
    original = int(raw.get("original_max_position_embeddings") or max_positions)
    scaling = raw.get("rope_scaling")
    half = head_dim // 2
    if scaling is None:
        short = long = (1.0,) * half
    else:
        kind = scaling.get("type") or scaling.get("rope_type")
        # "su" is the checkpoint's old name for what transformers now calls "longrope".
        if kind not in ("su", "longrope"):
            raise ModelError(f"rope_scaling type {kind!r} is not supported (only su/longrope)")
        short = tuple(float(x) for x in scaling["short_factor"])
        long = tuple(float(x) for x in scaling["long_factor"])
        if len(short) != half or len(long) != half:
            raise ModelError(f"rope_scaling factor lists must have head_dim/2 = {half} entries")
    return RopeConfig(
        theta=float(raw.get("rope_theta", 10000.0)),
        head_dim=head_dim,
        short_factor=short,
        long_factor=long,
        original_max_positions=original,
        max_positions=max_positions,
    )


def _vision_config(img_processor: dict[str, Any]) -> VisionTowerConfig:
    if img_processor.get("name", "clip_vision_model") != "clip_vision_model":
        raise ModelError(f"image processor {img_processor.get('name')!r} is not supported")
    given = img_processor.get("vision_config")
    if given is None and img_processor.get("model_name", _CLIP_NAME) != _CLIP_NAME:
        raise ModelError(
            f"vision tower {img_processor.get('model_name')!r} is not described in config.json "
            f"and is not {_CLIP_NAME}"
        )
    values = {**CLIP_VIT_L14_336, **(given or {})}
    return VisionTowerConfig(**{name: values[name] for name in CLIP_VIT_L14_336})


def _image_config(raw: dict[str, Any]) -> ImageEmbeddingConfig:
    embd = raw.get("embd_layer") or {}
    img = raw.get("img_processor") or {}
    expected = {
        "embedding_cls": "image",
        "projection_cls": "mlp",
        "use_hd_transform": True,
        "with_learnable_separator": True,
    }
    for key, value in expected.items():
        if embd.get(key) != value:
            raise ModelError(
                f"embd_layer.{key} = {embd.get(key)!r} is not supported ({value!r} is)"
            )
    order = embd.get("hd_transform_order", "glb_sub")
    if order not in ("sub_glb", "glb_sub"):
        raise ModelError(f"embd_layer.hd_transform_order {order!r} is not supported")
    if img.get("type_feature", "patch") != "patch":
        raise ModelError("only img_processor.type_feature 'patch' (no class token) is supported")
    return ImageEmbeddingConfig(
        hd_transform_order=order,
        image_dim_out=int(img.get("image_dim_out", CLIP_VIT_L14_336["hidden_size"])),
        num_img_tokens=int(img.get("num_img_tokens", 144)),
        layer_idx=int(img.get("layer_idx", -2)),
    )


@dataclass(frozen=True)
class PreprocessorConfig:
    num_crops: int = 16
    image_mean: tuple[float, float, float] = _CLIP_MEAN
    image_std: tuple[float, float, float] = _CLIP_STD

    @classmethod
    def from_file(cls, path: Path) -> PreprocessorConfig:
        if not path.is_file():
            return cls()
        raw = _read_json(path)
        try:
            return cls(
                num_crops=int(raw.get("num_crops", 16)),
                image_mean=_triple(raw.get("image_mean", _CLIP_MEAN)),
                image_std=_triple(raw.get("image_std", _CLIP_STD)),
            )
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{path.name} has a bad value: {exc}") from exc


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return data
