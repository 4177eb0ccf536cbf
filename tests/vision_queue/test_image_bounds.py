"""Structure bounds: a file whose structure would keep Pillow busy is refused before Pillow
opens it, and files within the bounds, however odd, still open.

The bounds are asserted by structure (how many segments, chunks, bytes a parser would
walk), never by wall time; docs/security.md has the measured times
(benchmarks/bench_hostile_images.py).
"""

from __future__ import annotations

import io
import os
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from vision_queue import image_bounds
from vision_queue.errors import ImageTooLarge, InvalidInput, TaskTimeout, UnsupportedImage
from vision_queue.images import (
    ImageLimits,
    decode_image,
    inspect_image,
    read_image_file,
    read_image_path,
)

LIMITS = ImageLimits(max_bytes=64 << 20, max_pixels=40_000_000)


def encode(fmt: str, size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(buffer, fmt)
    return buffer.getvalue()


JPEG = encode("JPEG")
PNG = encode("PNG")
GIF = encode("GIF")


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def jpeg_with(segments: bytes) -> bytes:
    """The small JPEG with `segments` inserted right after SOI."""
    return JPEG[:2] + segments + JPEG[2:]


def png_with(before_data: bytes = b"", after_data: bytes = b"") -> bytes:
    head, body, end = PNG[:33], PNG[33:-12], PNG[-12:]
    return head + before_data + body + after_data + end


@pytest.fixture
def pillow_must_not_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if Pillow is even asked to parse: the refusal must come from the walk."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("Pillow was asked to open a file past the structure bounds")

    monkeypatch.setattr(Image, "open", forbidden)


def refused(data: bytes) -> str:
    for check in (lambda: inspect_image(data, LIMITS), lambda: decode_image(data, LIMITS)):
        with pytest.raises(UnsupportedImage) as caught:
            check()
    return caught.value.message


# JPEG ------------------------------------------------------------------------------------


def test_jpeg_fill_bytes_past_the_cap_are_refused_unparsed(pillow_must_not_open: None):
    message = refused(jpeg_with(b"\xff" * (image_bounds.MAX_JPEG_FILL_BYTES + 1)))
    assert "fill bytes" in message


def test_jpeg_junk_between_segments_counts_as_fill(pillow_must_not_open: None):
    app0_end = 4 + struct.unpack(">H", JPEG[4:6])[0]
    junk = b"\x00" * (image_bounds.MAX_JPEG_FILL_BYTES + 1)
    assert "fill bytes" in refused(JPEG[:app0_end] + junk + JPEG[app0_end:])


@pytest.mark.parametrize("marker", [b"\xff\xfe", b"\xff\xe1", b"\xff\xdd"])  # COM, APP1, DRI
def test_millions_of_empty_jpeg_segments_are_refused_unparsed(
    marker: bytes, pillow_must_not_open: None
):
    segment = marker + b"\x00\x02"
    data = jpeg_with(segment * 5_000_000)  # 20 MB: over a minute in Pillow's loop
    assert "segments" in refused(data)


def test_jpeg_metadata_past_the_cap_is_refused(pillow_must_not_open: None):
    full = b"\xff\xe2\xff\xff" + b"\0" * 65533  # one maximal APP2 segment
    count = image_bounds.MAX_JPEG_METADATA_BYTES // 65535 + 1
    assert "metadata" in refused(jpeg_with(full * count))


def test_too_many_jpeg_scans_are_refused(pillow_must_not_open: None):
    scan = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
    assert "scans" in refused(jpeg_with(b"") + scan * (image_bounds.MAX_JPEG_SCANS + 1))


def test_a_jpeg_within_every_bound_still_opens():
    segments = (b"\xff\xfe\x00\x02") * (image_bounds.MAX_JPEG_HEADER_SEGMENTS - 10)
    data = jpeg_with(b"\xff" * 100 + segments)
    assert inspect_image(data, LIMITS).format == "JPEG"
    assert decode_image(data, LIMITS).size == (32, 32)


# PNG -------------------------------------------------------------------------------------


def test_millions_of_png_chunks_before_the_image_data_are_refused_unparsed(
    pillow_must_not_open: None,
):
    data = png_with(before_data=chunk(b"abCd", b"") * 1_700_000)  # 20 MB
    assert "before its image data" in refused(data)


def test_millions_of_png_chunks_after_the_image_data_are_refused_unparsed(
    pillow_must_not_open: None,
):
    # The header check alone would never walk these; the worker's decode would, in Python.
    data = png_with(after_data=chunk(b"abCd", b"") * (image_bounds.MAX_PNG_CHUNKS + 1))
    assert "chunks" in refused(data)


@pytest.mark.parametrize(
    ("kind", "cap"),
    [
        (b"tEXt", image_bounds.MAX_PNG_TEXT_CHUNKS),
        (b"zTXt", image_bounds.MAX_PNG_COMPRESSED_TEXT_CHUNKS),
    ],
)
def test_png_text_chunks_past_their_cap_are_refused(
    kind: bytes, cap: int, pillow_must_not_open: None
):
    payload = b"k\x00" + (b"\x00" + zlib.compress(b"v" * 1000) if kind == b"zTXt" else b"v")
    assert "text" in refused(png_with(before_data=chunk(kind, payload) * (cap + 1)))


def test_a_png_within_every_bound_still_opens():
    data = png_with(
        before_data=chunk(b"tEXt", b"k\x00v") * 10,
        after_data=chunk(b"abCd", b"") * 100,
    )
    assert inspect_image(data, LIMITS).format == "PNG"
    assert decode_image(data, LIMITS).size == (32, 32)


# GIF -------------------------------------------------------------------------------------


def test_a_gif_of_one_byte_sub_blocks_is_refused_unparsed(pillow_must_not_open: None):
    blocks = (image_bounds.GIF_BLOCK_ALLOWANCE + 2_000_000 // 64) * 2
    comment = b"\x21\xfe" + b"\x01x" * blocks + b"\x00"
    assert "blocks" in refused(GIF[:-1] + comment + b"\x3b")


def test_an_animated_gif_of_ordinary_frames_still_counts_them():
    frames = [Image.new("RGB", (8, 8), (i % 256, i // 256 * 80, 0)) for i in range(300)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=10)
    assert inspect_image(buffer.getvalue(), LIMITS).frames == 300


# The decode deadline ---------------------------------------------------------------------


def test_a_decode_past_the_task_deadline_stops_with_timeout():
    data = encode("PNG", (1024, 1024))
    with pytest.raises(TaskTimeout):
        decode_image(data, LIMITS, deadline=time.time() - 1)
    assert decode_image(data, LIMITS, deadline=time.time() + 3600).size == (1024, 1024)


# Local files that are not regular files --------------------------------------------------


def read_in_thread(path: Path) -> BaseException | bytes:
    """Read on a thread, so a regression (a blocking open) fails the test, not the run."""
    outcome: list[BaseException | bytes] = []

    def run() -> None:
        try:
            outcome.append(read_image_path(path, 1 << 20, field="images[0]"))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert outcome, f"reading {path} blocked"
    return outcome[0]


def test_fifos_sockets_devices_and_folders_are_refused_without_blocking(tmp_path: Path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # no writer: a plain open() would block forever
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    try:
        for path in (fifo, tmp_path / "sock", Path("/dev/zero"), tmp_path):
            outcome = read_in_thread(path)
            assert isinstance(outcome, InvalidInput), (path, outcome)
            assert outcome.field == "images[0]"
    finally:
        server.close()


def test_a_regular_file_is_read_up_to_the_cap(tmp_path: Path):
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    assert read_image_file(path, len(PNG)) == PNG
    with pytest.raises(ImageTooLarge):
        read_image_file(path, len(PNG) - 1)
    missing = read_in_thread(tmp_path / "missing.png")
    assert isinstance(missing, InvalidInput)
