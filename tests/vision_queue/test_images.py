"""Image inspection and decoding: what the model gets, and what is refused before decoding."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageFile

from vision_queue.errors import ErrorCode, ImageTooLarge, InvalidInput, UnsupportedImage
from vision_queue.images import (
    ALLOWED_FORMATS,
    MAX_COUNTED_FRAMES,
    ImageInfo,
    ImageLimits,
    decode_base64_image,
    decode_image,
    inspect_image,
    read_image_path,
    shown_path,
    sniff_format,
)
from vision_queue.settings import Settings

# Bomb tests make Pillow warn before we refuse: expected, not worth a summary line.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

REFERENCE = Path(__file__).parents[1] / "data" / "phi3v-reference"
REFERENCE_IMAGES: dict[str, Any] = json.loads((REFERENCE / "cases.json").read_text())["images"]
LIMITS = ImageLimits.from_settings(Settings())


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_from_rows(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", raw)
        + png_chunk(b"IEND", b"")
    )


class ForbiddenCall(BaseException):
    """Raised past every handler in the code under test (it is not an Exception)."""


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any pixel decoder is created: a refusal must come from the header."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise ForbiddenCall("a pixel decoder was created")

    monkeypatch.setattr(Image, "_getdecoder", forbidden)


def rgb_of(image: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    pixel = image.getpixel(xy)
    assert isinstance(pixel, tuple)
    return (int(pixel[0]), int(pixel[1]), int(pixel[2]))


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# The reference ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFERENCE_IMAGES))
def test_decoding_reproduces_the_reference_processor_pixels(name: str) -> None:
    # Given an image the reference Phi-3-vision processor converted to RGB
    expected = REFERENCE_IMAGES[name]
    data = (REFERENCE / "images" / name).read_bytes()
    # When we decode it
    image = decode_image(data)
    # Then the H x W x 3 uint8 array is byte-identical
    assert image.mode == "RGB"
    assert list(image.size) == expected["size_wh"]
    assert hashlib.sha256(image.tobytes()).hexdigest() == expected["rgb_sha256"]


@pytest.mark.parametrize("name", sorted(REFERENCE_IMAGES))
def test_inspection_reads_format_and_size_from_the_header(name: str) -> None:
    expected = REFERENCE_IMAGES[name]
    info = inspect_image((REFERENCE / "images" / name).read_bytes(), LIMITS)
    width, height = expected["size_wh"]
    assert info == ImageInfo(expected["format"], width, height, frames=1)


def test_limits_come_from_settings() -> None:
    settings = Settings(max_image_bytes=1234, max_image_pixels=5678)
    assert ImageLimits.from_settings(settings) == ImageLimits(max_bytes=1234, max_pixels=5678)


# Formats ----------------------------------------------------------------------------------

SMALL = Image.new("RGB", (8, 6), (10, 200, 30))


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        ("PNG", encode(SMALL, "PNG")),
        ("JPEG", encode(SMALL, "JPEG")),
        ("WEBP", encode(SMALL, "WEBP")),
        ("GIF", encode(SMALL, "GIF")),
        ("BMP", encode(SMALL, "BMP")),
        ("TIFF", encode(SMALL, "TIFF")),
        ("TIFF", encode(SMALL, "TIFF", byteorder=">")),  # big-endian "MM"
    ],
)
def test_each_allowed_format_is_sniffed_and_decoded(fmt: str, data: bytes) -> None:
    assert sniff_format(data) == fmt
    assert inspect_image(data, LIMITS) == ImageInfo(fmt, 8, 6, 1)
    image = decode_image(data)
    assert (image.mode, image.size) == ("RGB", (8, 6))
    assert close_to(rgb_of(image, (3, 3)), (10, 200, 30), tolerance=16)


def test_the_allowlist_is_exactly_six_formats() -> None:
    assert set(ALLOWED_FORMATS) == {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"}


HOSTILE = {
    "zero bytes": b"",
    "html": b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
    "svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>',
    "random": bytes(range(7, 250, 3)) * 5,
    "eps": encode(SMALL, "EPS"),  # Ghostscript would run on it
    "postscript": b"%!PS\n/Helvetica findfont 12 scalefont setfont\nshowpage\n",
    "psd": b"8BPS\x00\x01"
    + b"\x00" * 6
    + b"\x00\x03"
    + struct.pack(">II", 6, 8)
    + b"\x00\x08\x00\x03",
    "fits": b"SIMPLE  =                    T".ljust(80)
    + b"BITPIX  =                    8".ljust(80),
    "pdf": b"%PDF-1.7\n1 0 obj << >> endobj\n",
    "ico": encode(SMALL, "ICO"),
    "jpeg2000": encode(SMALL, "JPEG2000"),
    "ppm": encode(SMALL, "PPM"),
    "bm then text": b"BM is how this sentence starts, not a bitmap header",
    "tiff typo": b"II\x2a\x01" + b"\x00" * 32,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_other_formats_are_refused_before_any_parser_sees_them(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_parsing(*args: object, **kwargs: object) -> None:
        raise ForbiddenCall("Pillow was asked to open a refused format")

    monkeypatch.setattr(Image, "open", no_parsing)
    data = HOSTILE[name]
    assert sniff_format(data) is None
    for call in (lambda: inspect_image(data, LIMITS), lambda: decode_image(data)):
        with pytest.raises(UnsupportedImage) as caught:
            call()
        assert caught.value.code is ErrorCode.UNSUPPORTED_IMAGE


def test_pillow_only_tries_the_sniffed_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    real_open = Image.open

    def spy(fp: Any, mode: Any = "r", formats: Any = None) -> Any:
        seen.append(formats)
        return real_open(fp, mode, formats)

    monkeypatch.setattr(Image, "open", spy)
    decode_image(encode(SMALL, "GIF"))
    assert seen == [["GIF"]]


def test_a_png_signature_on_other_bytes_is_unsupported() -> None:
    with pytest.raises(UnsupportedImage):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"<html>not really</html>" * 4)


# Corrupt and truncated data ------------------------------------------------------------------


def gradient(size: tuple[int, int] = (64, 48)) -> Image.Image:
    image = Image.new("RGB", size)
    image.putdata(
        [(x * 4 % 256, y * 5 % 256, (x + y) % 256) for y in range(size[1]) for x in range(size[0])]
    )
    return image


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
def test_truncated_images_are_unsupported_not_padded(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a file cut in half, and a process where someone switched truncated loading on
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(gradient(), fmt)
    with pytest.raises(UnsupportedImage):
        decode_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_a_png_with_a_bad_checksum_is_unsupported() -> None:
    data = bytearray(encode(gradient(), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF
    with pytest.raises(UnsupportedImage):
        decode_image(bytes(data))


# Size limits ------------------------------------------------------------------------------


def test_bytes_over_the_cap_are_refused_before_parsing(no_pixel_decoding: None) -> None:
    data = encode(SMALL, "PNG")
    small = ImageLimits(max_bytes=len(data) - 1, max_pixels=10**6)
    for call in (inspect_image, decode_image):
        with pytest.raises(ImageTooLarge) as caught:
            call(data, small)
        assert caught.value.code is ErrorCode.IMAGE_TOO_LARGE


def test_a_20000x20000_png_is_refused_from_its_header(no_pixel_decoding: None) -> None:
    # A 64-byte file that claims 400 megapixels
    data = png_from_rows(20000, 20000, 8, 2, zlib.compress(b"\x00" * 64))
    assert len(data) < 100
    with pytest.raises(ImageTooLarge):
        inspect_image(data, LIMITS)
    with pytest.raises(ImageTooLarge):
        decode_image(data)


def test_the_pixel_cap_is_ours_not_only_pillows(no_pixel_decoding: None) -> None:
    # 64 megapixels: under Pillow's own bomb threshold, over VQ_MAX_IMAGE_PIXELS (40M)
    data = png_from_rows(8000, 8000, 8, 0, zlib.compress(b"\x00" * 64))
    with pytest.raises(ImageTooLarge) as caught:
        decode_image(data)
    assert "8000x8000" in caught.value.message
    assert "40000000" in caught.value.message


def bomb_png() -> bytes:
    """100 megapixels of 1-bit zeros: 12.5 MB of rows that compress to about 12 KB."""
    row = b"\x00" * (1 + 10000 // 8)
    compressor = zlib.compressobj(9)
    raw = b"".join(compressor.compress(row) for _ in range(10000)) + compressor.flush()
    return png_from_rows(10000, 10000, 1, 0, raw)


BOMB = bomb_png()


def test_a_decompression_bomb_is_refused_before_decoding(no_pixel_decoding: None) -> None:
    assert len(BOMB) < 50_000
    with pytest.raises(ImageTooLarge):
        decode_image(BOMB)


def test_pillows_own_bomb_check_is_an_error_even_with_a_generous_cap(
    no_pixel_decoding: None,
) -> None:
    # The operator raised VQ_MAX_IMAGE_PIXELS past Pillow's MAX_IMAGE_PIXELS (89M)
    generous = ImageLimits(max_bytes=10**8, max_pixels=10**10)
    with pytest.raises(ImageTooLarge):
        decode_image(BOMB, generous)  # 100M pixels: Pillow only warns, we refuse
    with pytest.raises(ImageTooLarge):
        decode_image(png_from_rows(20000, 20000, 8, 2, zlib.compress(b"")), generous)


# Colour normalisation -------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    image = decode_image(data)
    assert image.mode == "RGB"
    assert close_to(rgb_of(image, (8, 8)), (255, 0, 0))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_not_clipped(fmt: str) -> None:
    # Given 16-bit grey levels 0, 1/256, 1/2 and full scale
    source = Image.new("I;16", (4, 1))
    source.putdata([0, 256, 32768, 65535])
    image = decode_image(encode(source, fmt))
    # Then they map to 8 bits by value / 257 (plain convert would make all but 0 white)
    assert [rgb_of(image, (x, 0)) for x in range(4)] == [
        (0, 0, 0),
        (1, 1, 1),
        (128, 128, 128),
        (255, 255, 255),
    ]


def test_palette_images_with_transparency_use_the_palette_colour() -> None:
    source = Image.new("P", (4, 4), 1)
    source.putpalette([0, 0, 0, 250, 20, 30] + [0, 0, 0] * 254)
    source.info["transparency"] = 1
    image = decode_image(encode(source, "PNG"))
    assert rgb_of(image, (0, 0)) == (250, 20, 30)


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("RGBA", (200, 50, 25, 0), (200, 50, 25)),  # fully transparent: colour kept, no white
        ("RGBA", (200, 50, 25, 128), (200, 50, 25)),
        ("LA", (10, 0), (10, 10, 10)),
        ("1", 1, (255, 255, 255)),
        ("L", 77, (77, 77, 77)),
    ],
)
def test_alpha_is_dropped_like_the_reference_processor(
    mode: str, color: Any, expected: tuple[int, int, int]
) -> None:
    image = decode_image(encode(Image.new(mode, (4, 4), color), "PNG"))
    assert rgb_of(image, (1, 1)) == expected


def test_an_animated_gif_decodes_its_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert inspect_image(data, LIMITS) == ImageInfo("GIF", 10, 10, 3)
    image = decode_image(data)
    assert image.mode == "RGB"
    assert rgb_of(image, (5, 5)) == (255, 0, 0)


def test_an_animated_webp_decodes_its_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert inspect_image(data, LIMITS).frames == 2
    assert rgb_of(decode_image(data), (5, 5)) == (255, 0, 0)


def many_page_tiff(pages: int, loop: bool = False) -> bytes:
    """A 1x1 greyscale TIFF whose IFD chain has `pages` entries (or loops on itself)."""
    tags = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 4, 1, 0), (277, 3, 1, 1), (278, 3, 1, 1), (279, 4, 1, 1)]  # fmt: skip
    entries = b"".join(struct.pack("<HHII", *tag) for tag in tags)
    size = 2 + len(entries) + 4
    chain = b"".join(
        struct.pack("<H", len(tags)) + entries
        + struct.pack("<I", 8 if loop else (8 + (i + 1) * size if i < pages - 1 else 0))
        for i in range(pages)
    )  # fmt: skip
    return b"II*\x00" + struct.pack("<I", 8) + chain


def many_frame_gif(frames: int) -> bytes:
    screen = b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00"
    return screen + frame * frames + b"\x3b"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (many_page_tiff(20_000), MAX_COUNTED_FRAMES),
        (many_page_tiff(1, loop=True), 1),
        (many_page_tiff(7), 7),
        (many_frame_gif(200_000), MAX_COUNTED_FRAMES),
        (many_frame_gif(3), 3),
    ],
    ids=["tiff 20000 pages", "tiff ifd loop", "tiff 7 pages", "gif 200000 frames", "gif 3"],
)
def test_frame_counting_is_capped_and_fast(data: bytes, expected: int) -> None:
    # Pillow's own TIFF page count is quadratic: 20,000 pages would take seconds
    started = time.monotonic()
    assert inspect_image(data, LIMITS).frames == expected
    assert time.monotonic() - started < 0.5
    assert decode_image(data).size == (1, 1)


def two_tone() -> Image.Image:
    """40x20: left half red, right half blue, as stored in the file."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    return image


@pytest.mark.parametrize(
    ("orientation", "size", "red_at", "blue_at"),
    [
        (1, (40, 20), (5, 10), (35, 10)),  # as stored
        (3, (40, 20), (35, 10), (5, 10)),  # rotated 180
        (6, (20, 40), (10, 5), (10, 35)),  # displayed rotated 90 clockwise: left goes on top
        (8, (20, 40), (10, 35), (10, 5)),  # rotated 90 anticlockwise: left goes to the bottom
    ],
)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied(
    fmt: str,
    orientation: int,
    size: tuple[int, int],
    red_at: tuple[int, int],
    blue_at: tuple[int, int],
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(two_tone(), fmt, exif=exif.tobytes(), quality=95)
    image = decode_image(data)
    assert image.size == size
    assert close_to(rgb_of(image, red_at), (255, 0, 0), tolerance=40)
    assert close_to(rgb_of(image, blue_at), (0, 0, 255), tolerance=40)


def test_inspection_never_decodes_pixels(no_pixel_decoding: None) -> None:
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF"):
        assert inspect_image(encode(gradient(), fmt), LIMITS).width == 64


# Base64 -----------------------------------------------------------------------------------

PNG_BYTES = encode(SMALL, "PNG")
B64 = base64.b64encode(PNG_BYTES).decode()


@pytest.mark.parametrize(
    "text",
    [
        B64,
        f"data:image/png;base64,{B64}",
        f"DATA:Image/PNG;BASE64,{B64}",
        f"data:image/webp;charset=binary;base64,{B64}",  # the type is not trusted anyway
        "\n".join(B64[i : i + 76] for i in range(0, len(B64), 76)),  # MIME line wrapping
        f"  {B64}\r\n",
    ],
)
def test_base64_and_data_uris_decode_to_the_bytes(text: str) -> None:
    assert decode_base64_image(text, field="images[0]") == PNG_BYTES


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        B64[:-2] + "!!",  # outside the alphabet: refused, not skipped
        B64.rstrip("="),  # missing padding
        B64 + "A",  # stray character after the padding
        B64.replace("+", "-").replace("/", "_") + "-_",  # URL-safe alphabet
        "data:text/html;base64," + B64,
        "data:image/png," + B64,  # not base64
        "data:image/png;base64",  # no comma
        "data:;base64," + B64,
        "données",
        "data:image/png;base64,",
    ],
)
def test_bad_base64_is_invalid_input_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        decode_base64_image(text, field="images[1]")
    assert caught.value.field == "images[1]"
    assert caught.value.code is ErrorCode.INVALID_INPUT


def test_oversized_base64_is_refused_before_decoding() -> None:
    with pytest.raises(ImageTooLarge) as caught:
        decode_base64_image("QUFB" * 1000, field="images[0]", max_bytes=100)
    assert caught.value.field == "images[0]"
    assert decode_base64_image("QUFB" * 10, max_bytes=30) == b"AAA" * 10


def test_decoded_base64_goes_through_the_same_checks() -> None:
    text = base64.b64encode(os.urandom(64)).decode()
    with pytest.raises(UnsupportedImage):
        decode_image(decode_base64_image(text))


def test_every_error_carries_a_stable_code() -> None:
    errors: list[Callable[[], object]] = [
        lambda: decode_image(b""),
        lambda: decode_image(png_from_rows(20000, 20000, 8, 2, b"")),
        lambda: decode_base64_image("%%%"),
    ]
    codes = set()
    for call in errors:
        with pytest.raises((UnsupportedImage, ImageTooLarge, InvalidInput)) as caught:
            call()
        codes.add(caught.value.to_dict()["code"])
    assert codes == {"unsupported_image", "image_too_large", "invalid_input"}


def test_a_path_that_cannot_be_read_is_named_with_its_folder(tmp_path: Path) -> None:
    # Two files of one name in different folders: the error must say which one.
    missing = tmp_path / "scans" / "2026" / "page.png"
    with pytest.raises(InvalidInput) as raised:
        read_image_path(missing, 1024, field="images[0]")
    assert str(missing) in raised.value.message
    assert raised.value.field == "images[0]"


def test_a_very_long_path_keeps_its_end_in_the_error() -> None:
    long = "/" + "d" * 500 + "/scans/page.png"
    shown = shown_path(long)
    assert len(shown) == 200 and shown.endswith("/scans/page.png")
