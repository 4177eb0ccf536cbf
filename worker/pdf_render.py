"""Rendering one PDF page to PNG, bounded: in a child process, at most so many pixels.

pdfium is not thread-safe and a hostile page can take unbounded time to draw (nested forms
drawing each other a billion times) or ask for a bitmap of gigabytes (a 200-inch page at
print resolution). So each page is drawn by `python -m worker.pdf_render` in its own
process, which the worker kills at VQ_DOCUMENT_PAGE_TIME_LIMIT_S; the scale is reduced so
the bitmap never exceeds VQ_MAX_IMAGE_PIXELS before anything is allocated.
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
from pathlib import Path

from vision_queue.errors import ImageTooLarge, InvalidDocument, TaskTimeout

_POINTS_PER_INCH = 72.0
# A page whose scaled bitmap would be smaller than this on a side is refused rather than
# drawn as a smear (an absurdly long, thin page).
_MIN_SIDE = 16


def page_scale(width_pt: float, height_pt: float, dpi: int, max_pixels: int) -> float:
    """The scale (pixels per point) to draw a page at: `dpi`, or less to fit `max_pixels`."""
    if not (width_pt > 0 and height_pt > 0 and math.isfinite(width_pt * height_pt)):
        raise InvalidDocument("the page has no size", field="document")
    scale = dpi / _POINTS_PER_INCH
    if width_pt * height_pt * scale * scale > max_pixels:
        scale = math.sqrt(max_pixels / (width_pt * height_pt)) * 0.999
    if min(width_pt, height_pt) * scale < _MIN_SIDE:
        raise ImageTooLarge(
            f"the page ({width_pt:.0f} x {height_pt:.0f} pt) cannot be drawn within "
            f"VQ_MAX_IMAGE_PIXELS={max_pixels}",
            field="document",
        )
    return scale


def render_page(pdf_path: str, index: int, dpi: int, max_pixels: int, time_limit_s: float) -> bytes:
    """Page `index` (0-based) of the PDF at `pdf_path` as PNG bytes; coded errors only."""
    with tempfile.TemporaryDirectory(prefix="vq-page-") as folder:
        out = str(Path(folder) / "page.png")
        command = [
            sys.executable,
            "-m",
            "worker.pdf_render",
            pdf_path,
            str(index),
            str(dpi),
            str(max_pixels),
            out,
        ]
        try:
            done = subprocess.run(  # our own module, fixed arguments
                command, capture_output=True, timeout=time_limit_s, check=False
            )
        except subprocess.TimeoutExpired:
            raise TaskTimeout(
                f"page {index + 1} took longer than VQ_DOCUMENT_PAGE_TIME_LIMIT_S="
                f"{time_limit_s:g}s to draw",
                field="document",
            ) from None
        if done.returncode != 0:
            reason = done.stderr.decode("utf-8", "replace").strip().splitlines()
            text = reason[-1][:300] if reason else f"exit status {done.returncode}"
            if text.startswith("image_too_large:"):
                raise ImageTooLarge(text.split(":", 1)[1].strip(), field="document")
            raise InvalidDocument(f"page {index + 1} could not be drawn ({text})", field="document")
        return Path(out).read_bytes()


def _main(argv: list[str]) -> int:
    import pypdfium2 as pdfium

    pdf_path, index, dpi, max_pixels, out = (
        argv[0],
        int(argv[1]),
        int(argv[2]),
        int(argv[3]),
        argv[4],
    )
    pdf = pdfium.PdfDocument(pdf_path)
    page = pdf[index]
    width, height = page.get_size()
    try:
        scale = page_scale(width, height, dpi, max_pixels)
    except ImageTooLarge as exc:
        print(f"image_too_large: {exc.message}", file=sys.stderr)
        return 3
    image = page.render(scale=scale).to_pil().convert("RGB")
    image.save(out, format="PNG")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
