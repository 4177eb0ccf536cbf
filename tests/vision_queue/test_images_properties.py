"""Properties of the decode path under hostile input, and a short fixed-budget fuzz run.

The contract being fuzzed: whatever the bytes, `inspect_image` and `decode_image` either
succeed (an RGB image within the limits) or raise UnsupportedImage / ImageTooLarge, never
anything else. Runs are derandomized so CI is reproducible; the example counts keep the
whole module to about half a minute on two cores.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vision_queue.errors import ImageTooLarge, InvalidInput, UnsupportedImage
from vision_queue.images import (
    ALLOWED_FORMATS,
    ImageLimits,
    decode_base64_image,
    decode_image,
    inspect_image,
    sniff_format,
)

# Pillow warns about the corruption it meets (bad tags, invalid APNG) before we refuse it.
pytestmark = [
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

# Small limits keep a mutated header from asking for a long (if harmless) decode.
LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20)
DOCUMENTED = (UnsupportedImage, ImageTooLarge)
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def gradient(mode: str = "RGB", size: tuple[int, int] = (16, 12)) -> Image.Image:
    image = Image.new("RGB", size)
    image.putdata([(x * 16, y * 20, (x + y) * 8) for y in range(size[1]) for x in range(size[0])])
    return image.convert(mode)


def sixteen_bit() -> Image.Image:
    image = Image.new("I;16", (16, 12))
    image.putdata([(x * 4000 + y * 97) % 65536 for y in range(12) for x in range(16)])
    return image


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(gradient(), "JPEG", exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    frames = [gradient(), gradient().rotate(90), gradient().rotate(180)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40)


# Valid files in every format and several modes: the starting points for mutation.
SEEDS: dict[str, bytes] = {
    "png rgb": encode(gradient(), "PNG"),
    "png interlaced": encode(gradient(), "PNG", interlace=1),
    "png palette+transparency": encode(gradient("P"), "PNG", transparency=3),
    "png 16-bit grey": encode(sixteen_bit(), "PNG"),
    "png la": encode(gradient("LA"), "PNG"),
    "png 1-bit": encode(gradient("1"), "PNG"),
    "apng": animated("PNG"),
    "jpeg": encode(gradient(), "JPEG"),
    "jpeg progressive": encode(gradient(), "JPEG", progressive=True),
    "jpeg grey": encode(gradient("L"), "JPEG"),
    "jpeg cmyk": encode(gradient("CMYK"), "JPEG"),
    "jpeg exif": exif_rotated(),
    "gif": encode(gradient("P"), "GIF"),
    "gif animated": animated("GIF"),
    "webp lossy": encode(gradient(), "WEBP"),
    "webp lossless rgba": encode(gradient("RGBA"), "WEBP", lossless=True),
    "webp animated": animated("WEBP"),
    "tiff raw": encode(gradient(), "TIFF"),
    "tiff lzw": encode(gradient(), "TIFF", compression="tiff_lzw"),
    "tiff deflate": encode(gradient(), "TIFF", compression="tiff_adobe_deflate"),
    "tiff packbits big-endian": encode(
        gradient("L"), "TIFF", compression="packbits", byteorder=">"
    ),
    "tiff 16-bit grey": encode(sixteen_bit(), "TIFF"),
    "tiff cmyk": encode(gradient("CMYK"), "TIFF"),
    "tiff multipage": animated("TIFF"),
    "bmp rgb": encode(gradient(), "BMP"),
    "bmp palette": encode(gradient("P"), "BMP"),
    "bmp 1-bit": encode(gradient("1"), "BMP"),
}
INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)


def assert_documented_outcome(data: bytes) -> None:
    try:
        image = decode_image(data, LIMITS)
    except DOCUMENTED:
        pass
    else:
        assert image.mode == "RGB"
        assert 0 < image.width * image.height <= LIMITS.max_pixels
    try:
        info = inspect_image(data, LIMITS)
    except DOCUMENTED:
        return
    assert info.format in ALLOWED_FORMATS
    assert info.frames >= 1
    assert 0 < info.width * info.height <= LIMITS.max_pixels


def test_every_seed_is_a_valid_image() -> None:
    for name, data in SEEDS.items():
        assert decode_image(data, LIMITS).mode == "RGB", name


@settings(FUZZ, max_examples=300)
@given(st.binary(max_size=4096))
def test_any_bytes_give_an_rgb_image_or_a_documented_error(data: bytes) -> None:
    assert_documented_outcome(data)


SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"RIFF\x00\x01\x00\x00WEBPVP8 ",
    b"RIFF\x00\x01\x00\x00WEBPVP8L",
    b"RIFF\x00\x01\x00\x00WEBPVP8X",
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00",
    b"BM\x00\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00\x28\x00\x00\x00",
)


@settings(FUZZ, max_examples=1500)
@given(st.sampled_from(SIGNATURES), st.binary(max_size=2048))
def test_random_bodies_behind_a_real_signature_reach_the_parser_safely(
    signature: bytes, body: bytes
) -> None:
    data = signature + body
    assert sniff_format(data) is not None
    assert_documented_outcome(data)


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        kind = draw(st.sampled_from(["flip", "interesting", "insert", "delete", "truncate"]))
        at = draw(st.integers(min_value=0, max_value=max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif kind == "interesting" and data:
            width = draw(st.sampled_from([1, 2, 4]))
            data[at : at + width] = bytes([draw(st.sampled_from(INTERESTING))]) * width
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(min_value=1, max_value=64))]
        else:
            del data[at:]
    return bytes(data)


@settings(FUZZ, max_examples=8000)
@given(mutated_images())
def test_mutated_valid_images_give_an_rgb_image_or_a_documented_error(data: bytes) -> None:
    assert_documented_outcome(data)


@settings(FUZZ, max_examples=300)
@given(st.binary(min_size=1, max_size=512))
def test_base64_round_trips(data: bytes) -> None:
    text = base64.b64encode(data).decode()
    assert decode_base64_image(text) == data
    assert decode_base64_image("data:image/png;base64," + text) == data


@settings(FUZZ, max_examples=300)
@given(st.text(max_size=200))
def test_any_text_gives_bytes_or_invalid_input(text: str) -> None:
    try:
        decode_base64_image(text, field="images[0]")
    except InvalidInput as error:
        assert error.field == "images[0]"
