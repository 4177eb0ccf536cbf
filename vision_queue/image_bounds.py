"""Bounds on the work a parser does for an image's structure, checked before Pillow runs.

Pillow walks a JPEG's markers and a PNG's chunks in Python, one at a time, and keeps
every metadata segment it meets. Valid-looking files can therefore cost far more than
their size suggests (measured on the 2-core development machine, Pillow 12, before these
bounds): a 20 MB JPEG of 0xFF fill bytes took 68 s to open, one of five million empty
APP1 segments 95 s and 615 MB, a PNG of 1.7 million empty chunks before its image data
80 s and 178 MB. Both the producer's header check and the worker's decode open files,
so both run `check_structure` first: it walks the same structure with `bytes.find` and
`struct`, counting, and refuses a file past any cap below as UnsupportedImage. The caps
sit far above what encoders write (a few dozen segments, chunks of 8 KB and more), so no
ordinary image meets them; docs/security.md has the figures with them in place.
"""

from __future__ import annotations

import struct

from vision_queue.errors import UnsupportedImage

# JPEG, before the first scan (all of it Pillow's Python loop): segments, fill or junk
# bytes between them, and bytes of APPn/COM metadata (Pillow keeps a copy of each).
MAX_JPEG_HEADER_SEGMENTS = 512
MAX_JPEG_FILL_BYTES = 4096
MAX_JPEG_METADATA_BYTES = 4 * 1024 * 1024
# JPEG scans in the whole file: each progressive scan is one more pass of the decoder
# over every coefficient. Encoders write about ten; libjpeg-turbo's tools suggest a
# limit of a few hundred for untrusted input.
MAX_JPEG_SCANS = 256

# PNG: chunks before the image data (parsed at open), chunks in the whole file (the
# decoder reads each IDAT, and every chunk after it, in Python), and text chunks, whose
# content Pillow keeps (a compressed one may inflate to 1 MB).
MAX_PNG_HEADER_CHUNKS = 256
MAX_PNG_CHUNKS = 20_000
MAX_PNG_TEXT_CHUNKS = 64
MAX_PNG_COMPRESSED_TEXT_CHUNKS = 8

# GIF: data sub-blocks walked, in Python, here and by Pillow for extensions: a fixed
# allowance plus one per 64 bytes (encoders write 255-byte blocks). Frames walked at most.
GIF_BLOCK_ALLOWANCE = 4096
GIF_BYTES_PER_BLOCK = 64
MAX_GIF_FRAMES_WALKED = 1000

_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI
_JPEG_EOI = 0xD9
_JPEG_SOS = 0xDA
_JPEG_METADATA = frozenset({*range(0xE0, 0xF0), 0xFE})  # APPn, COM
_PNG_TEXT = frozenset({b"tEXt", b"zTXt", b"iTXt"})
_PNG_COMPRESSED = frozenset({b"zTXt", b"iTXt", b"iCCP"})


def check_structure(data: bytes, fmt: str) -> None:
    """Raise UnsupportedImage when walking the file's structure would cost too much."""
    if fmt == "JPEG":
        _check_jpeg(data)
    elif fmt == "PNG":
        _check_png(data)
    elif fmt == "GIF":
        gif_frames(data, MAX_GIF_FRAMES_WALKED)


def gif_frames(data: bytes, max_frames: int) -> int:
    """Frames in a GIF (at most `max_frames`), walking its blocks without decoding.

    Refuses a file of more sub-blocks than its size justifies: twenty million 1-byte
    sub-blocks would keep this loop, and Pillow's, busy for seconds.
    """
    pos = 13  # "GIF89a" and the logical screen descriptor
    if len(data) > 10 and data[10] & 0x80:
        pos += 3 << ((data[10] & 7) + 1)  # global colour table
    frames = 0
    budget = [GIF_BLOCK_ALLOWANCE + len(data) // GIF_BYTES_PER_BLOCK]
    while pos < len(data) and frames < max_frames:
        block = data[pos]
        if block == 0x2C:  # image descriptor: one frame
            frames += 1
            flags = data[pos + 9] if pos + 9 < len(data) else 0
            pos += 10
            if flags & 0x80:
                pos += 3 << ((flags & 7) + 1)  # local colour table
            pos = _skip_gif_sub_blocks(data, pos + 1, budget)  # +1: LZW minimum code size
        elif block == 0x21:  # extension: label, then sub-blocks
            pos = _skip_gif_sub_blocks(data, pos + 2, budget)
        else:  # trailer, or garbage Pillow would stop at too
            break
    return max(frames, 1)


def _skip_gif_sub_blocks(data: bytes, pos: int, budget: list[int]) -> int:
    while pos < len(data):
        budget[0] -= 1
        if budget[0] < 0:
            raise UnsupportedImage("GIF image has more data blocks than its size allows")
        size = data[pos]
        pos += 1 + size
        if size == 0:
            break
    return pos


def _refuse(fmt: str, what: str, cap: int) -> UnsupportedImage:
    return UnsupportedImage(f"{fmt} image has more than {cap} {what}; refused unparsed")


def _check_jpeg(data: bytes) -> None:
    """Walk SOI .. first SOS like Pillow's JpegImagePlugin._open does, counting."""
    # Inside entropy-coded data an 0xFF is always followed by 0x00 or RSTn, so every
    # FF DA pair is a scan (or lies in metadata: an over-count, which only errs safe).
    if data.count(b"\xff\xda") > MAX_JPEG_SCANS:
        raise _refuse("JPEG", "scans", MAX_JPEG_SCANS)
    size = len(data)
    pos = 2  # after SOI
    segments = fill = metadata = 0
    while pos < size:
        if data[pos] != 0xFF:
            # Junk between segments: Pillow steps over it one byte at a time.
            found = data.find(b"\xff", pos)
            step = (found if found >= 0 else size) - pos
            fill += step
            pos += step
        elif pos + 1 < size and data[pos + 1] in (0xFF, 0x00):
            fill += 1  # fill byte, or a stray escaped FF: one loop turn each in Pillow
            pos += 1
        else:
            if pos + 1 >= size:
                return  # truncated: Pillow's own error says so
            marker = data[pos + 1]
            segments += 1
            if segments > MAX_JPEG_HEADER_SEGMENTS:
                raise _refuse("JPEG", "segments before its image data", MAX_JPEG_HEADER_SEGMENTS)
            if marker in (_JPEG_EOI, _JPEG_SOS):
                return  # header done (EOI here is Pillow's error to report)
            if marker in _JPEG_STANDALONE:
                pos += 2
                continue
            if pos + 4 > size:
                return
            length = struct.unpack_from(">H", data, pos + 2)[0]
            if marker in _JPEG_METADATA:
                metadata += length
                if metadata > MAX_JPEG_METADATA_BYTES:
                    raise _refuse("JPEG", "bytes of metadata", MAX_JPEG_METADATA_BYTES)
            pos += 2 + max(length, 2)
        if fill > MAX_JPEG_FILL_BYTES:
            raise _refuse("JPEG", "fill bytes between segments", MAX_JPEG_FILL_BYTES)


def _check_png(data: bytes) -> None:
    """Walk the chunk list from the signature to IEND, counting."""
    size = len(data)
    pos = 8
    chunks = text = compressed = 0
    seen_image_data = False
    while pos + 8 <= size:
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise _refuse("PNG", "chunks", MAX_PNG_CHUNKS)
        if kind in (b"IDAT", b"fdAT"):
            seen_image_data = True
        elif not seen_image_data and chunks > MAX_PNG_HEADER_CHUNKS:
            raise _refuse("PNG", "chunks before its image data", MAX_PNG_HEADER_CHUNKS)
        if kind in _PNG_TEXT:
            text += 1
            if text > MAX_PNG_TEXT_CHUNKS:
                raise _refuse("PNG", "text chunks", MAX_PNG_TEXT_CHUNKS)
        if kind in _PNG_COMPRESSED:
            compressed += 1
            if compressed > MAX_PNG_COMPRESSED_TEXT_CHUNKS:
                raise _refuse(
                    "PNG", "compressed text or profile chunks", MAX_PNG_COMPRESSED_TEXT_CHUNKS
                )
        if kind == b"IEND":
            return
        pos += 12 + length  # length, type, data, CRC
