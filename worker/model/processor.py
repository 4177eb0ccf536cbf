"""Prompt and image preprocessing for Phi-3-vision, without torchvision.

The checkpoint's own processor imports torchvision, whose PyPI builds are CUDA-linked and
fail next to a CPU-only torch. This module reproduces its output with PIL, numpy and torch:

* HD transform: the image (transposed if portrait) is resized with PIL bilinear to
  `scale * 336` wide, `scale` being the largest with `scale * ceil(scale / ratio) <= num_crops`,
  then padded with white, centred, to a multiple of 336 high. (The original calls
  torchvision's `resize` on a PIL image with its default interpolation, which is PIL's
  bilinear; that reproduces the reference pixel values bit for bit.)
* Crops: normalised with the CLIP mean/std, a global view made by bicubic interpolation
  (torch, no antialias, as the original) followed by the 336x336 tiles in row-major order.
  Only the crops an image uses are produced; the original's zero padding up to
  `num_crops + 1` never reaches the model's output. The values are bit-identical to the
  original's, for about a third of its time: the normalisation is one lookup in a table
  of the original's own arithmetic, the white padding is never materialised, and the
  crops are written once, into one buffer for all of a prompt's images (the original
  makes about six full-size temporaries per image; see benchmarks/bench_preprocess.py).
* Tokens: the text is split at `<|image_N|>` tags, every chunk is tokenised on its own with
  a leading BOS (so BOS also follows each image), and each tag becomes `-N` repeated once
  per image token.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from vision_queue.errors import InvalidInput, ModelError
from vision_queue.schemas import ChatMessage, Role
from worker.model.config import (
    END_TOKEN_ID,
    ENDOFTEXT_TOKEN_ID,
    Phi3VConfig,
    PreprocessorConfig,
)

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
_IMAGE_TAG_SPLIT = re.compile(r"<\|image_\d+\|>")
MAX_NUM_CROPS = 16


def chat_text(prompt: str | Sequence[ChatMessage], num_images: int) -> str:
    """Phi-3's chat format: `<|role|>\n` + image tags + text + `<|end|>\n` per turn.

    A plain prompt is one user turn showing every image (the model card's single-turn
    form). A conversation renders each turn in order, its images (tagged `<|image_N|>`,
    numbered across the whole conversation) before its text, and ends with the
    `<|assistant|>\n` the model answers after, as the checkpoint's chat template does.
    """
    turns = [ChatMessage(Role.USER, prompt, num_images)] if isinstance(prompt, str) else prompt
    shown = sum(turn.images for turn in turns)
    if shown != num_images:
        raise InvalidInput(
            f"the messages show {shown} image(s) but there are {num_images}", field="messages"
        )
    parts: list[str] = []
    number = 0
    for index, turn in enumerate(turns):
        if IMAGE_TAG.search(turn.text):
            raise InvalidInput(
                "prompt must not contain image tags; the template places them",
                field="prompt" if isinstance(prompt, str) else f"messages[{index}]",
            )
        tags = "".join(f"<|image_{number + i}|>\n" for i in range(1, turn.images + 1))
        number += turn.images
        parts.append(f"<|{turn.role.value}|>\n{tags}{turn.text}<|end|>\n")
    return "".join(parts) + "<|assistant|>\n"


@dataclass(frozen=True)
class HDImage:
    """An image after the HD transform, kept as the resize produced it (no padding copy).

    `resized` is the RGB uint8 resize of the landscape form; the full image is it padded
    with white rows (`top` above, up to a multiple of the crop size), transposed back
    when the original was portrait. Both sides of the full image are crop multiples.
    """

    resized: np.ndarray  # [new_height, new_width, 3] uint8, landscape form
    top: int
    padded_height: int
    transposed: bool
    crop_size: int

    @property
    def height(self) -> int:
        return int(self.resized.shape[1]) if self.transposed else self.padded_height

    @property
    def width(self) -> int:
        return self.padded_height if self.transposed else int(self.resized.shape[1])

    @property
    def rows(self) -> int:
        return self.height // self.crop_size

    @property
    def cols(self) -> int:
        return self.width // self.crop_size

    @property
    def num_crops_used(self) -> int:
        """The global view plus every tile."""
        return 1 + self.rows * self.cols

    @property
    def pixels(self) -> np.ndarray:
        """The full padded image, [height, width, 3] uint8 (built on demand)."""
        pixels = np.full((self.padded_height, self.resized.shape[1], 3), 255, dtype=np.uint8)
        pixels[self.top : self.top + self.resized.shape[0]] = self.resized
        return np.ascontiguousarray(pixels.transpose(1, 0, 2)) if self.transposed else pixels

    def num_tokens(self, tokens_per_crop: int) -> int:
        """Tiles and global view, a row separator per feature row, one global separator."""
        side = math.isqrt(tokens_per_crop)
        return (self.rows * self.cols + 1) * tokens_per_crop + 1 + (self.rows + 1) * side


def hd_transform(image: Image.Image, num_crops: int, crop_size: int) -> HDImage:
    """Resize to fit at most `num_crops` tiles and pad to whole tiles (see module docstring)."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    transposed = image.width < image.height
    if transposed:
        # Work on the landscape form, as the original does: PIL resizes in two passes
        # with rounding in between, so transposing later would change the pixels.
        image = image.transpose(Image.Transpose.TRANSPOSE)
    ratio = image.width / image.height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_width = scale * crop_size
    new_height = max(1, int(new_width / ratio))  # an extreme strip would round to 0 rows
    resized = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    padded_height = math.ceil(new_height / crop_size) * crop_size
    return HDImage(
        resized=np.asarray(resized, dtype=np.uint8),
        top=(padded_height - new_height) // 2,
        padded_height=padded_height,
        transposed=transposed,
        crop_size=crop_size,
    )


@functools.lru_cache(maxsize=8)
def normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[3, 256] float32: what ToTensor + Normalize make of byte value v in channel c.

    Computed with the very torch operations the original applies to every pixel
    (`float().div(255)`, then `sub(mean)`, then `div(std)`, each correctly rounded), so a
    lookup gives bit-identical values in one pass instead of four.
    """
    values = torch.arange(256, dtype=torch.uint8).float().div(255).expand(3, 256)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1)
    table = ((values - mean_t) / std_t).numpy()
    table.setflags(write=False)
    return table


def image_crops(
    hd: HDImage, mean: Sequence[float], std: Sequence[float], out: torch.Tensor | None = None
) -> torch.Tensor:
    """[1 + rows*cols, 3, crop, crop] float32 on the CPU: the global view, then the tiles.

    One table lookup normalises the image (padding rows get the table's white), the
    global view is the original's bicubic interpolation of it, and the tiles are copied
    straight into `out` (e.g. a slice of one buffer for all of a prompt's images).
    """
    size = hd.crop_size
    table = normalisation_table(tuple(mean), tuple(std))
    normalised = np.empty((3, hd.height, hd.width), dtype=np.float32)
    top, rows = hd.top, hd.resized.shape[0]
    for channel in range(3):
        plane = normalised[channel].T if hd.transposed else normalised[channel]
        plane[:top] = table[channel, 255]
        plane[top + rows :] = table[channel, 255]
        plane[top : top + rows] = table[channel][hd.resized[:, :, channel]]
    chw = torch.from_numpy(normalised)
    crops = torch.empty(hd.num_crops_used, 3, size, size) if out is None else out
    crops[0] = torch.nn.functional.interpolate(
        chw.unsqueeze(0), size=(size, size), mode="bicubic", align_corners=False
    )[0]
    crops[1:].view(hd.rows, hd.cols, 3, size, size).copy_(
        chw.view(3, hd.rows, size, hd.cols, size).permute(1, 3, 0, 2, 4)
    )
    return crops


def crops_of(
    images: Sequence[HDImage],
    mean: Sequence[float],
    std: Sequence[float],
    pin_memory: bool = False,
) -> torch.Tensor:
    """Every image's crops, in order, written into one [total, 3, crop, crop] buffer."""
    counts = [hd.num_crops_used for hd in images]
    size = images[0].crop_size if images else 0
    crops = torch.empty(sum(counts), 3, size, size, pin_memory=pin_memory)
    for hd, part in zip(images, crops.split(counts), strict=True):
        image_crops(hd, mean, std, out=part)
    return crops


@dataclass(frozen=True)
class ImageSpan:
    """Where image `index` (0-based) sits in the prompt."""

    index: int
    start: int
    length: int


@dataclass(frozen=True)
class EncodedPrompt:
    input_ids: list[int]  # image positions hold -N for image N (1-based), as the original
    spans: tuple[ImageSpan, ...]  # ordered by image index
    images: tuple[HDImage, ...]

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


class Phi3VProcessor:
    """Turns (text with image tags, images) into token ids and HD images; decodes output ids."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        preprocessor: PreprocessorConfig,
        *,
        crop_size: int,
        tokens_per_crop: int,
        bos_token_id: int | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.crop_size = crop_size
        self.tokens_per_crop = tokens_per_crop
        self.bos_token_id = bos_token_id
        self.stop_token_ids = frozenset(
            (
                _token_id(tokenizer, "<|end|>", END_TOKEN_ID),
                _token_id(tokenizer, "<|endoftext|>", ENDOFTEXT_TOKEN_ID),
            )
        )

    @classmethod
    def from_dir(cls, folder: Path, config: Phi3VConfig) -> Phi3VProcessor:
        tokenizer_file = folder / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise ModelError(f"cannot load {tokenizer_file}: {exc}") from exc
        return cls(
            tokenizer,
            PreprocessorConfig.from_file(folder / "preprocessor_config.json"),
            crop_size=config.vision.image_size,
            tokens_per_crop=config.image.num_img_tokens,
            bos_token_id=_bos_token_id(tokenizer, folder / "tokenizer_config.json"),
        )

    def encode(
        self,
        text: str,
        images: Sequence[Image.Image],
        num_crops: int | None = None,
        transformed: Sequence[HDImage | None] = (),
    ) -> EncodedPrompt:
        """Validate the tags against the images, transform the images, build the ids.

        `transformed` holds images already through the HD transform with this crop count
        (the image cache's), None where not."""
        numbers = [int(tag) for tag in IMAGE_TAG.findall(text)]
        _check_tags(numbers, len(images))
        crops = self.preprocessor.num_crops if num_crops is None else num_crops
        if images and not 1 <= crops <= MAX_NUM_CROPS:
            raise InvalidInput(
                f"num_crops must be between 1 and {MAX_NUM_CROPS}", field="num_crops"
            )
        known = list(transformed) + [None] * (len(images) - len(transformed))
        hd_images = tuple(
            hd if hd is not None else hd_transform(image, crops, self.crop_size)
            for image, hd in zip(images, known, strict=True)
        )

        ids: list[int] = []
        starts: dict[int, int] = {}
        for position, chunk in enumerate(_IMAGE_TAG_SPLIT.split(text)):
            if self.bos_token_id is not None:
                ids.append(self.bos_token_id)
            ids.extend(self.tokenizer.encode(chunk, add_special_tokens=False).ids)
            if position < len(numbers):
                number = numbers[position]
                starts[number] = len(ids)
                ids.extend([-number] * hd_images[number - 1].num_tokens(self.tokens_per_crop))
        spans = tuple(
            ImageSpan(index, starts[index + 1], hd.num_tokens(self.tokens_per_crop))
            for index, hd in enumerate(hd_images)
        )
        return EncodedPrompt(input_ids=ids, spans=spans, images=hd_images)

    def crops(self, prompt: EncodedPrompt, pin_memory: bool = False) -> torch.Tensor:
        """Normalised crops of all the prompt's images, in order, in one CPU float32 tensor.

        `pin_memory` (CUDA hosts) lets the device thread copy them without waiting.
        """
        mean, std = self.preprocessor.image_mean, self.preprocessor.image_std
        return crops_of(prompt.images, mean, std, pin_memory)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated ids; special tokens dropped, no clean-up of spaces."""
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))


def _check_tags(numbers: list[int], num_images: int) -> None:
    if len(numbers) != num_images:
        raise InvalidInput(
            f"the text has {len(numbers)} image tag(s) for {num_images} image(s)", field="images"
        )
    if sorted(numbers) != list(range(1, num_images + 1)):
        raise InvalidInput(
            "image tags must be <|image_1|> .. <|image_N|>, each exactly once", field="prompt"
        )


def _token_id(tokenizer: Tokenizer, content: str, fallback: int) -> int:
    found = tokenizer.token_to_id(content)
    return fallback if found is None else int(found)


def _bos_token_id(tokenizer: Tokenizer, config_file: Path) -> int | None:
    """BOS from tokenizer_config.json (`add_bos_token`, `bos_token`); `<s>` when absent."""
    settings: dict[str, object] = {}
    if config_file.is_file():
        try:
            settings = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {config_file}: {exc}") from exc
    if not settings.get("add_bos_token", True):
        return None
    token = settings.get("bos_token", "<s>")
    if isinstance(token, dict):
        token = token.get("content", "<s>")
    found = tokenizer.token_to_id(str(token))
    if found is None:
        raise ModelError(f"the tokenizer has no BOS token {token!r}")
    return int(found)
