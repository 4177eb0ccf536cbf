"""The processor: chat template, image tags, HD transform sizes, crops bit-identical to the
original processor's, tokenisation, decoding."""

from __future__ import annotations

import json

import jinja2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from phi3v_reference import IMAGES_DIR
from PIL import Image
from support.workers import TINY_MODEL

from benchmarks.original_preprocess import preprocess as original_preprocess
from vision_queue.errors import InvalidInput
from vision_queue.images import decode_image
from vision_queue.schemas import ChatMessage, Role
from worker.inference.engine import Engine
from worker.model.processor import chat_text, crops_of, hd_transform


def image(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def test_chat_text_is_the_model_card_format() -> None:
    assert chat_text("Compare.", 2) == (
        "<|user|>\n<|image_1|>\n<|image_2|>\nCompare.<|end|>\n<|assistant|>\n"
    )
    assert chat_text("Hi", 0) == "<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_a_conversation_renders_as_the_checkpoints_chat_template() -> None:
    # Given a system message, an earlier exchange with one image and a follow-up with two,
    conversation = (
        ChatMessage(Role.SYSTEM, "Answer briefly."),
        ChatMessage(Role.USER, "What is this?", 1),
        ChatMessage(Role.ASSISTANT, "A red square."),
        ChatMessage(Role.USER, "Which of these match it?", 2),
    )
    # when rendered, it equals the checkpoint's own Jinja template over the same turns, with
    # the images numbered across the conversation and placed before each turn's text.
    template = json.loads((TINY_MODEL / "tokenizer_config.json").read_text())["chat_template"]
    environment = jinja2.Environment(autoescape=False)  # noqa: S701 (plain text, not HTML)
    reference = environment.from_string(template).render(
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "<|image_1|>\nWhat is this?"},
            {"role": "assistant", "content": "A red square."},
            {"role": "user", "content": "<|image_2|>\n<|image_3|>\nWhich of these match it?"},
        ],
        add_generation_prompt=True,
    )
    assert chat_text(conversation, 3) == reference
    assert reference.endswith("<|end|>\n<|assistant|>\n")


def test_a_single_user_turn_renders_like_a_plain_prompt() -> None:
    assert chat_text((ChatMessage(Role.USER, "Compare.", 2),), 2) == chat_text("Compare.", 2)


def test_a_conversation_must_show_every_image_once() -> None:
    with pytest.raises(InvalidInput) as caught:
        chat_text((ChatMessage(Role.USER, "Compare.", 1),), 2)
    assert caught.value.field == "messages"


def test_a_prompt_carrying_an_image_tag_is_refused() -> None:
    with pytest.raises(InvalidInput) as caught:
        chat_text("look at <|image_1|>", 1)
    assert caught.value.field == "prompt"


@pytest.mark.parametrize(
    ("size", "num_crops", "tokens"),
    [
        ((640, 480), 16, 1921),  # numbers from the architecture notes
        ((1920, 1080), 16, 2353),
        ((1000, 1000), 16, 2509),
        ((400, 300), 4, 757),
        ((800, 400), 1, 313),
    ],
)
def test_image_token_counts(size: tuple[int, int], num_crops: int, tokens: int) -> None:
    hd = hd_transform(image(*size), num_crops, 336)

    assert hd.num_tokens(144) == tokens
    assert hd.rows * hd.cols <= num_crops
    assert hd.pixels.shape[0] % 336 == 0 and hd.pixels.shape[1] % 336 == 0


def test_portrait_images_are_transformed_as_transposed_landscapes() -> None:
    landscape = hd_transform(image(900, 400), 16, 336)
    portrait = hd_transform(image(400, 900), 16, 336)

    assert (portrait.rows, portrait.cols) == (landscape.cols, landscape.rows)


def test_padding_is_white_and_centred() -> None:
    hd = hd_transform(image(672, 100, (0, 0, 0)), 2, 336)  # 672x100 -> 672x100 in 336 rows

    column = hd.pixels[:, 10, 0]
    assert column[0] == 255 and column[-1] == 255
    top = int((column == 0).argmax())
    bottom = len(column) - int((column[::-1] == 0).argmax())
    assert abs(top - (len(column) - bottom)) <= 1  # same white margin above and below


def test_an_extreme_strip_still_gives_one_row_of_crops() -> None:
    hd = hd_transform(image(5000, 2), 16, 336)

    assert hd.rows == 1 and hd.cols >= 1


def test_non_rgb_images_are_converted() -> None:
    hd = hd_transform(Image.new("L", (500, 400), 90), 4, 336)

    assert hd.pixels.ndim == 3 and hd.pixels.shape[2] == 3


def test_every_text_chunk_starts_with_bos(cpu_engine: Engine) -> None:
    processor = cpu_engine.processor
    encoded = processor.encode(chat_text("Same?", 2), [image(336, 336), image(336, 336)], 1)
    ids = encoded.input_ids

    assert ids[0] == 1
    for span in encoded.spans:
        after = span.start + span.length
        assert ids[after] == 1  # BOS again right after each image
        assert set(ids[span.start : after]) == {-(span.index + 1)}


@pytest.mark.parametrize(
    ("text", "count", "field"),
    [
        ("<|user|>\n<|image_1|>\nHi", 2, "images"),  # fewer tags than images
        ("<|image_1|><|image_1|>", 2, "prompt"),  # a number twice
        ("<|image_2|><|image_3|>", 2, "prompt"),  # not numbered from 1
        ("<|image_0|>", 1, "prompt"),
    ],
)
def test_bad_tag_numbering_is_invalid_input(
    cpu_engine: Engine, text: str, count: int, field: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        cpu_engine.processor.encode(text, [image(336, 336)] * count)
    assert caught.value.field == field


def test_tags_in_any_order_place_each_image_at_its_own_tag(cpu_engine: Engine) -> None:
    small, large = image(336, 336), image(1000, 500)
    encoded = cpu_engine.processor.encode("<|image_2|>x<|image_1|>", [small, large], 4)

    first, second = encoded.spans
    assert second.start < first.start  # image 2's tokens come first in the text
    assert encoded.input_ids[second.start] == -2
    assert second.length == encoded.images[1].num_tokens(144)


@pytest.mark.parametrize("num_crops", [0, 17])
def test_num_crops_out_of_range_is_invalid_input(cpu_engine: Engine, num_crops: int) -> None:
    with pytest.raises(InvalidInput) as caught:
        cpu_engine.processor.encode(chat_text("x", 1), [image(336, 336)], num_crops)
    assert caught.value.field == "num_crops"


def test_default_num_crops_comes_from_preprocessor_config(cpu_engine: Engine) -> None:
    encoded = cpu_engine.processor.encode(chat_text("x", 1), [image(640, 480)])

    assert cpu_engine.processor.preprocessor.num_crops == 16
    assert encoded.spans[0].length == 1921


def test_stop_ids_are_end_and_endoftext(cpu_engine: Engine) -> None:
    assert cpu_engine.processor.stop_token_ids == {32007, 32000}


def test_decoding_drops_special_tokens_and_unknown_ids(cpu_engine: Engine) -> None:
    processor = cpu_engine.processor
    hello = processor.tokenizer.encode("Hello world", add_special_tokens=False).ids

    assert processor.decode([*hello, 32007]) == "Hello world"
    assert processor.decode([*hello, 32050]) == "Hello world"  # rows with no tokenizer entry


# Crops: bit-identical to the original processor ------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def assert_same_crops_as_the_original(images: list[Image.Image], num_crops: int) -> None:
    pixel_values, used = original_preprocess(images, num_crops, CLIP_MEAN, CLIP_STD)
    hd_images = [hd_transform(im, num_crops, 336) for im in images]

    crops = crops_of(hd_images, CLIP_MEAN, CLIP_STD).split([hd.num_crops_used for hd in hd_images])

    for index, image_crops in enumerate(crops):
        assert used[index] == image_crops.shape[0]
        assert torch.equal(image_crops, pixel_values[index, : used[index]])  # every bit


@pytest.mark.parametrize("num_crops", [1, 4, 16])
def test_the_reference_images_give_the_original_crops_exactly(num_crops: int) -> None:
    images = [decode_image(path.read_bytes()) for path in sorted(IMAGES_DIR.iterdir())]

    assert_same_crops_as_the_original(images, num_crops)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    st.integers(1, 1400),
    st.integers(1, 1400),
    st.integers(1, 16),
    st.sampled_from(["RGB", "L", "RGBA", "P"]),
    st.integers(0, 2**32 - 1),
)
def test_any_image_gives_the_original_crops_exactly(
    width: int, height: int, num_crops: int, mode: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(noise).convert(mode)

    assert_same_crops_as_the_original([image.convert("RGB")], num_crops)
