"""Hostile image structures: time and memory of the producer's check and the worker's decode.

Each case is a ~20 MB file (the default VQ_MAX_IMAGE_BYTES) built to make a parser walk a
long structure: fill bytes and empty segments in a JPEG, millions of chunks in a PNG,
1-byte sub-blocks in a GIF, a huge tag array in a TIFF, and files sitting just under each
cap of `vision_queue.image_bounds`. Every case runs in a fresh child process, which reports
the wall time of `inspect_image` (producer) and `decode_image` (worker) and how much its
peak RSS grew, so one case's memory never hides another's.

    python benchmarks/bench_hostile_images.py            # all cases
    python benchmarks/bench_hostile_images.py png_chunks_after_data
    python benchmarks/bench_hostile_images.py --no-bounds    # the same, bounds switched off

Not a timed test: the figures go to docs/security.md by hand.
"""

from __future__ import annotations

import io
import json
import platform
import resource
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB20 = 20 * 1024 * 1024


def _small(fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 120, 200)).save(buffer, fmt)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_parts() -> tuple[bytes, bytes, bytes]:
    """(signature + IHDR, IDAT chunk(s), IEND) of a small valid PNG."""
    data = _small("PNG")
    head, rest = data[:33], data[33:]
    return head, rest[:-12], rest[-12:]


def jpeg_fill_bytes() -> bytes:
    data = _small("JPEG")
    return data[:2] + b"\xff" * MB20 + data[2:]


def jpeg_empty_com_segments() -> bytes:
    data = _small("JPEG")
    return data[:2] + b"\xff\xfe\x00\x02" * (MB20 // 4) + data[2:]


def jpeg_empty_app1_segments() -> bytes:
    data = _small("JPEG")
    return data[:2] + b"\xff\xe1\x00\x02" * (MB20 // 4) + data[2:]


def jpeg_metadata_at_cap() -> bytes:
    """Accepted: 63 APP2 segments of 64 KB, just under 4 MiB of metadata."""
    data = _small("JPEG")
    segment = b"\xff\xe2\xff\xff" + b"\x00" * 65533
    return data[:2] + segment * 63 + data[2:]


def png_chunks_before_data() -> bytes:
    head, body, end = _png_parts()
    return head + _chunk(b"abCd", b"") * (MB20 // 12) + body + end


def png_chunks_after_data() -> bytes:
    head, body, end = _png_parts()
    return head + body + _chunk(b"abCd", b"") * (MB20 // 12) + end


def png_text_chunks() -> bytes:
    head, body, end = _png_parts()
    return head + _chunk(b"tEXt", b"k\x00v") * (MB20 // 15) + body + end


def png_data_chunks_at_cap() -> bytes:
    """Accepted: the image data split into 1-byte IDAT chunks, just under 20,000 chunks."""
    import random

    width = 128
    noise = random.Random(7).randbytes(width * width * 3)  # incompressible: ~49 KB of data
    rows = b"".join(b"\x00" + noise[y * width * 3 : (y + 1) * width * 3] for y in range(width))
    stream = zlib.compress(rows, 9)
    pieces = [stream[i : i + 1] for i in range(len(stream) - 1)] + [stream[-1:]]
    pieces = [*pieces[:19_980], b"".join(pieces[19_980:])]  # the rest in the last chunk
    ihdr = struct.pack(">IIBBBBB", width, width, 8, 2, 0, 0, 0)
    head = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    return head + b"".join(_chunk(b"IDAT", piece) for piece in pieces) + _chunk(b"IEND", b"")


def gif_one_byte_sub_blocks() -> bytes:
    data = _small("GIF")
    comment = b"\x21\xfe" + b"\x01x" * (MB20 // 2) + b"\x00"
    return data[:-1] + comment + b"\x3b"


def tiff_huge_tag() -> bytes:
    """A 64x64 strip TIFF whose first IFD carries one LONG tag of five million values."""
    count = MB20 // 4
    pixels = b"\x80" * (64 * 64)
    entries = [
        (256, 3, 1, 64),  # width
        (257, 3, 1, 64),  # height
        (258, 3, 1, 8),  # bits per sample
        (262, 3, 1, 1),  # black is zero
        (273, 4, 1, 8),  # strip offset
        (277, 3, 1, 1),  # samples per pixel
        (278, 3, 1, 64),  # rows per strip
        (279, 4, 1, len(pixels)),  # strip byte count
        (65000, 4, count, 0),  # private tag, value offset patched below
    ]
    ifd_at = 8 + len(pixels)
    array_at = ifd_at + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, n, value in entries:
        ifd += struct.pack("<HHII", tag, kind, n, array_at if tag == 65000 else value)
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_at) + pixels + ifd + b"\x00" * (4 * count)


CASES: dict[str, Callable[[], bytes]] = {
    "jpeg_fill_bytes": jpeg_fill_bytes,
    "jpeg_empty_com_segments": jpeg_empty_com_segments,
    "jpeg_empty_app1_segments": jpeg_empty_app1_segments,
    "jpeg_metadata_at_cap": jpeg_metadata_at_cap,
    "png_chunks_before_data": png_chunks_before_data,
    "png_chunks_after_data": png_chunks_after_data,
    "png_text_chunks": png_text_chunks,
    "png_data_chunks_at_cap": png_data_chunks_at_cap,
    "gif_one_byte_sub_blocks": gif_one_byte_sub_blocks,
    "tiff_huge_tag": tiff_huge_tag,
}


def _measure(name: str, side: str, bounds: bool) -> dict[str, object]:
    """Runs in the child: build the case, then time one side and its peak RSS growth."""
    from vision_queue import image_bounds, images
    from vision_queue.errors import VisionQueueError
    from vision_queue.images import ImageLimits, decode_image, inspect_image

    if not bounds:  # what Pillow alone costs: the figures before image_bounds existed
        images.check_structure = lambda data, fmt: None  # type: ignore[assignment]
        image_bounds.GIF_BLOCK_ALLOWANCE = 1 << 40

    data = CASES[name]()
    limits = ImageLimits(max_bytes=MB20 + 1024 * 1024, max_pixels=40_000_000)
    call = inspect_image if side == "inspect" else decode_image
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    try:
        call(data, limits)
        outcome = "accepted"
    except VisionQueueError as exc:
        outcome = exc.code.value
    seconds = time.perf_counter() - began
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {
        "bytes": len(data),
        "outcome": outcome,
        "seconds": round(seconds, 4),
        "rss_growth_mb": round(grown_kb / 1024, 1),
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        print(json.dumps(_measure(argv[1], argv[2], bounds=argv[3] == "bounds")))
        return 0
    bounds = "--no-bounds" not in argv
    names = [arg for arg in argv if not arg.startswith("--")] or list(CASES)
    print(
        f"# {platform.machine()} {platform.python_version()}, {time.strftime('%Y-%m-%d')}, "
        f"bounds {'on' if bounds else 'off'}"
    )
    print("| case | MB | producer check | worker decode |")
    print("| --- | --- | --- | --- |")
    for name in names:
        cells = []
        size = 0
        for side in ("inspect", "decode"):
            done = subprocess.run(
                [sys.executable, __file__, "--child", name, side, "bounds" if bounds else "off"],
                capture_output=True,
                text=True,
                check=True,
                timeout=1800,
            )
            row = json.loads(done.stdout)
            size = int(row["bytes"])
            cells.append(
                f"{row['outcome']} in {float(row['seconds']) * 1000:.0f} ms, "
                f"+{row['rss_growth_mb']} MB"
            )
        print(f"| {name} | {size / 1e6:.1f} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
