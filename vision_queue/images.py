"""Image inspection and decoding, shared by the producer and the worker.

The producer inspects an image before queuing it (format, size, pixel count: header only);
the worker decodes it into the RGB picture the model sees. Both treat the bytes as hostile:

* only six formats are accepted, recognised by their magic bytes, and Pillow is told to try
  only the plugin for the sniffed format, so no other plugin (EPS runs Ghostscript, FITS,
  PSD...) ever parses the input;
* the byte cap is checked before anything is parsed, the pixel cap from the header before
  any pixel is decoded (decompression bombs), and Pillow's own bomb threshold is a hard
  limit here too;
* the work of walking the file's structure is bounded before Pillow walks it
  (`vision_queue.image_bounds`: JPEG segments and fill bytes, PNG chunks, GIF sub-blocks),
  and the worker's decode stops at the task's deadline;
* truncated or corrupt files are refused rather than padded with grey;
* every failure leaves as one of the documented coded errors: InvalidInput (bad base64),
  ImageTooLarge, UnsupportedImage. A fuzz test holds the decoder to that.

Colour handling matches the reference Phi-3-vision processor: EXIF orientation is applied,
then `.convert("RGB")`, so alpha is dropped rather than composited on white. 16-bit and
32-bit greyscale, which `.convert` would clip to white, are scaled to 8 bits first.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

from vision_queue.errors import (
    ImageTooLarge,
    InvalidInput,
    TaskTimeout,
    UnsupportedImage,
    VisionQueueError,
)
from vision_queue.image_bounds import MAX_GIF_FRAMES_WALKED, check_structure, gif_frames
from vision_queue.settings import Settings

# Pillow format names, in the order the error message lists them.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

# BITMAPCOREHEADER (12), BITMAPINFOHEADER (40) and its successors: the DIB header sizes
# Pillow's BMP plugin reads. "BM" alone is too weak a signature to hand text to a parser.
_BMP_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF

# Exceptions Pillow's plugins and codecs raise on malformed input (found by fuzzing and
# reading the plugins). Deliberately not bare `Exception`: a time limit raised into the
# decode (Celery's SoftTimeLimitExceeded derives from Exception) must not turn into
# "unsupported image".
_DECODER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError, "image file is truncated"
    SyntaxError,  # "broken PNG file", bad chunk CRC
    ValueError,  # includes struct-unpacking and conversion errors
    EOFError,
    TypeError,
    LookupError,  # IndexError, KeyError in tag and palette tables
    ArithmeticError,  # ZeroDivisionError, OverflowError from header fields
    RuntimeError,  # RecursionError from nested IFDs, NotImplementedError
    AttributeError,
    AssertionError,
    BufferError,
    struct.error,
)

# Animated images: counting stops here (only the first frame is ever decoded).
MAX_COUNTED_FRAMES = MAX_GIF_FRAMES_WALKED

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_DATA_URI = re.compile(
    r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),(?P<payload>.*)", re.DOTALL | re.IGNORECASE
)
_BASE64_WHITESPACE = re.compile(r"[ \t\r\n]+")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says.

    `format` is a Pillow format name from ALLOWED_FORMATS; `frames` is 1 for a still image,
    the frame (or page) count for an animated or multi-page one, at most MAX_COUNTED_FRAMES.
    """

    format: str
    width: int
    height: int
    frames: int


def sniff_format(data: bytes) -> str | None:
    """The format named by the file's magic bytes, or None when it is not an allowed one.

    The extension and any declared content type are never consulted: they are the
    attacker's to choose, the magic bytes are what a parser would act on.
    """
    head = bytes(data[:32])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in _TIFF_SIGNATURES:
        return "TIFF"
    if (
        head[:2] == b"BM"
        and len(head) >= 18
        and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES
    ):
        return "BMP"
    return None


def inspect_image(data: bytes, limits: ImageLimits) -> ImageInfo:
    """Format, size and frame count from the header; no pixel is decoded.

    Raises ImageTooLarge (bytes or pixels over the limits) or UnsupportedImage.
    """
    with _open(data, limits) as (image, fmt), _decoder_errors(fmt):
        frames = _count_frames(data, fmt, image)
        return ImageInfo(format=fmt, width=image.width, height=image.height, frames=frames)


def decode_image(
    data: bytes, limits: ImageLimits | None = None, *, deadline: float | None = None
) -> Image.Image:
    """Decode the first frame into an oriented RGB image, the way the model expects it.

    `deadline` (a `time.time()` value) stops the decode with TaskTimeout once passed: the
    decoder pulls its input in 64 KB reads, and each read checks the clock.
    Raises ImageTooLarge, UnsupportedImage or (with a deadline) TaskTimeout, nothing else.
    """
    if limits is None:
        limits = ImageLimits.from_settings(Settings())
    # Truncation attack / corrupt upload: with this flag on, Pillow pads a cut-off file
    # with grey and reports success. It is process-global, so assert it on every call.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with _open(data, limits, deadline) as (image, fmt), _decoder_errors(fmt):
        image.load()  # first frame only: `_open` never seeks
        oriented = ImageOps.exif_transpose(image)
        if oriented is None:  # only returned with in_place=True; keeps the types honest
            oriented = image
        rgb = _to_rgb(oriented)
        rgb.load()
        return rgb


def decode_base64_image(text: str, *, field: str = "images", max_bytes: int | None = None) -> bytes:
    """Bytes from raw base64 or a `data:image/...;base64,` URI; strict.

    Characters outside the base64 alphabet are an error rather than skipped (ASCII
    whitespace, as in line-wrapped base64, is the only thing removed). Raises
    InvalidInput(field=field), or ImageTooLarge when the decoded size would exceed
    `max_bytes` (checked before decoding, so a huge string is not expanded first).
    """
    if not isinstance(text, str):
        raise InvalidInput("image must be a base64 string", field=field)
    payload = text.strip()
    if payload[:5].lower() == "data:":
        match = _DATA_URI.fullmatch(payload)
        if match is None:
            raise InvalidInput("malformed data: URI", field=field)
        params = [p.strip().lower() for p in match["params"].split(";") if p.strip()]
        if not match["type"].strip().lower().startswith("image/"):
            raise InvalidInput("data: URI must have an image/* media type", field=field)
        if "base64" not in params:
            raise InvalidInput("data: URI must be base64-encoded (;base64,)", field=field)
        payload = match["payload"]
    payload = _BASE64_WHITESPACE.sub("", payload)
    if not payload:
        raise InvalidInput("image data is empty", field=field)
    if max_bytes is not None and (len(payload) // 4) * 3 - 2 > max_bytes:
        raise ImageTooLarge(f"image is larger than the limit of {max_bytes} bytes", field=field)
    try:
        data = base64.b64decode(payload.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidInput("image is not valid base64", field=field) from None
    if not data:
        raise InvalidInput("image data is empty", field=field)
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLarge(
            f"image is {len(data)} bytes, more than the limit of {max_bytes}", field=field
        )
    return data


def read_image_file(
    path: str | os.PathLike[str],
    max_bytes: int,
    *,
    nofollow: bool = False,
    field: str | None = None,
) -> bytes:
    """The bytes of a regular file, at most `max_bytes`; shared by the client and the worker.

    Opened with O_NONBLOCK, then checked with fstat, so a FIFO, a device, a socket or a
    directory is refused without blocking in open() or read() (a FIFO with no writer
    blocks a plain open forever; /dev/zero never ends). `nofollow` refuses a symlink as
    the last component. Raises ImageTooLarge, or OSError (missing, unreadable, not a
    regular file: strerror says which) for the caller to word as its own error.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if nofollow:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(0, "not a regular file")
        if info.st_size > max_bytes:
            raise ImageTooLarge(
                f"{Path(path).name} has {info.st_size} bytes, more than the limit of {max_bytes}",
                field=field,
            )
        chunks: list[bytes] = []
        left = max_bytes + 1  # the file may grow after fstat
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise ImageTooLarge(
            f"{shown_path(path)} is more than the limit of {max_bytes} bytes", field=field
        )
    return data


def read_image_path(path: str | os.PathLike[str], max_bytes: int, *, field: str) -> bytes:
    """`read_image_file` for a producer: a file it cannot read is InvalidInput naming `field`."""
    try:
        return read_image_file(path, max_bytes, field=field)
    except OSError as exc:
        reason = exc.strerror or "unreadable"
        raise InvalidInput(f"cannot read {shown_path(path)}: {reason}", field=field) from None


def shown_path(path: str | os.PathLike[str], limit: int = 200) -> str:
    """A path as the caller gave it, folder included, for an error message; a very long one
    keeps its end (the file's name and nearest folders), which is what tells it apart."""
    text = os.fspath(path)
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


# Internals ------------------------------------------------------------------------------


class _DeadlineReader(io.BytesIO):
    """In-memory bytes whose every read first checks the task's deadline."""

    def __init__(self, data: bytes, deadline: float) -> None:
        super().__init__(data)
        self._deadline = deadline

    def read(self, size: int | None = -1) -> bytes:
        if time.time() > self._deadline:
            raise TaskTimeout("decoding the image ran past the task's VQ_TASK_TIME_LIMIT_S")
        return super().read(size)


@contextmanager
def _open(
    data: bytes, limits: ImageLimits, deadline: float | None = None
) -> Iterator[tuple[ImageFile.ImageFile, str]]:
    """Open (header only) after the byte cap, the sniff and the structure bounds; enforce
    the pixel cap."""
    size = len(data)
    if size > limits.max_bytes:
        raise ImageTooLarge(f"image is {size} bytes, more than the limit of {limits.max_bytes}")
    if size == 0:
        raise UnsupportedImage("image is empty")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImage("not a PNG, JPEG, WebP, GIF, BMP or TIFF image")
    check_structure(data, fmt)
    stream = io.BytesIO(data) if deadline is None else _DeadlineReader(data, deadline)
    with _decoder_errors(fmt):
        # Plugin confusion: only the sniffed format's parser may look at the bytes.
        image = Image.open(stream, formats=[fmt])
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise UnsupportedImage(f"{fmt} image has no pixels ({width}x{height})")
        # Decompression bomb: refuse from the header, before a single pixel is decoded.
        if width * height > limits.max_pixels:
            raise ImageTooLarge(
                f"image is {width}x{height} pixels, more than the limit of "
                f"{limits.max_pixels} pixels"
            )
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that. Refuse there too, even
        # when VQ_MAX_IMAGE_PIXELS is set higher. (Turning the warning into an error with
        # warnings.catch_warnings would change process-wide state, which is not thread-safe.)
        if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
            raise ImageTooLarge(f"{fmt} image refused as a decompression bomb")
        yield image, fmt


@contextmanager
def _decoder_errors(fmt: str) -> Iterator[None]:
    """Map whatever a parser raises on hostile bytes to a coded error."""
    try:
        yield
    except VisionQueueError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{fmt} image refused as a decompression bomb") from exc
    except MemoryError as exc:
        raise ImageTooLarge(f"{fmt} image needs more memory than is available") from exc
    except _DECODER_ERRORS as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UnsupportedImage(f"{fmt} image is corrupt or truncated ({reason})") from exc


def _count_frames(data: bytes, fmt: str, image: Image.Image) -> int:
    """Frames in the file, at most MAX_COUNTED_FRAMES, without decoding any of them.

    PNG (acTL), WebP (ANIM) and JPEG (MPO) state the count in a header. GIF and TIFF do
    not, and Pillow's `n_frames` walks every frame, quadratically for TIFF (a 20 MB TIFF
    of 180,000 empty pages takes minutes): CPU exhaustion in the producer's web backend.
    Those two are walked here instead, linearly and with a cap.
    """
    if fmt == "GIF":
        return gif_frames(data, MAX_COUNTED_FRAMES)
    if fmt == "TIFF":
        return _tiff_frames(data)
    return max(1, min(int(getattr(image, "n_frames", 1)), MAX_COUNTED_FRAMES))


def _tiff_frames(data: bytes) -> int:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 8-byte counts and offsets
    frames = 0
    seen: set[int] = set()
    try:
        offset = struct.unpack_from(order + ("Q" if big else "I"), data, 8 if big else 4)[0]
        # IFD chain; `seen` stops a chain that loops back on itself.
        while offset and offset not in seen and frames < MAX_COUNTED_FRAMES:
            seen.add(offset)
            if big:
                count = struct.unpack_from(order + "Q", data, offset)[0]
                frames += 1
                offset = struct.unpack_from(order + "Q", data, offset + 8 + 20 * count)[0]
            else:
                count = struct.unpack_from(order + "H", data, offset)[0]
                frames += 1
                offset = struct.unpack_from(order + "I", data, offset + 2 + 12 * count)[0]
    except struct.error:
        pass  # the chain runs off the end of the file: count what was there
    return max(frames, 1)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _to_8bit_gray(image)
    elif image.mode == "La":  # premultiplied; Pillow converts it to RGB only through LA
        image = image.convert("LA")
    # Plain convert: alpha dropped, palette expanded, CMYK inverted as Pillow does; this is
    # exactly what the reference processor does, so the model sees the same pixels.
    return image.convert("RGB")


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """Scale high-bit-depth greyscale to 0..255; `.convert("L")` would clip it to white."""
    if image.mode in _SIXTEEN_BIT_MODES:
        image = image.convert("I")  # point() does not take the big-endian I;16B
        low, high = 0.0, 65535.0
    else:
        # Mode I / F carry no bit depth: 8-bit data stays, 16-bit range scales by 1/257,
        # anything else is stretched from its own minimum to its maximum.
        extrema = image.getextrema()
        low, high = float(extrema[0]), float(extrema[1])  # type: ignore[arg-type]
        if low >= 0 and high <= 255:
            low, high = 0.0, 255.0
        elif low >= 0 and high <= 65535:
            low, high = 0.0, 65535.0
    span = (high - low) or 1.0
    scale = 255.0 / span
    offset = 0.5 - low * scale  # +0.5: round to nearest, Pillow truncates
    scaled = image.point(lambda v: v * scale + offset)
    return scaled.convert("L")
