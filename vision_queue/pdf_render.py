"""Rendering one PDF page to PNG, bounded: in a child process, in time, pixels and memory.

pdfium is not thread-safe and a hostile page can take unbounded time to draw (nested forms
drawing each other a billion times, which also grows pdfium's memory by hundreds of MB a
second) or ask for a bitmap of gigabytes (a 200-inch page at print resolution). So the
pages are drawn by `python -m vision_queue.pdf_render` in a child process, which reports
each page as it is done and

* is killed once one page takes longer than VQ_DOCUMENT_PAGE_TIME_LIMIT_S;
* draws at a scale reduced so the bitmap never exceeds VQ_MAX_IMAGE_PIXELS, before
  anything is allocated;
* may use at most VQ_DOCUMENT_PAGE_MEMORY_BYTES of address space (RLIMIT_AS): a page that
  needs more stops the child, and the page fails coded;
* exits as soon as its parent does (its stdin is a pipe only the parent holds): a worker
  killed mid-document leaves no orphan drawing on.
"""

from __future__ import annotations

import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vision_queue.errors import ImageTooLarge, InvalidDocument, TaskTimeout, VisionQueueError

_POINTS_PER_INCH = 72.0
# A page whose scaled bitmap would be smaller than this on a side is refused rather than
# drawn as a smear (an absurdly long, thin page).
_MIN_SIDE = 16
# Starting the child (Python, pdfium) counts apart from the first page's drawing time.
_START_ALLOWANCE_S = 10.0
# The child's own address space before it draws (Python, Pillow, pdfium: about 150 MB
# measured), with room to spare ...
_CHILD_BASE_BYTES = 256 * 1024**2
# ... and per pixel of the bitmap: pdfium's 4-byte BGRA, Pillow's RGB copy, PNG encoding.
_BYTES_PER_PIXEL = 16


def least_page_memory(max_pixels: int) -> int:
    """The smallest VQ_DOCUMENT_PAGE_MEMORY_BYTES that can draw a page at `max_pixels`."""
    return _CHILD_BASE_BYTES + _BYTES_PER_PIXEL * max_pixels


@dataclass(frozen=True)
class PageLimits:
    """How a page is drawn: at `dpi`, in at most `max_pixels`, `time_limit_s` and
    `memory_bytes` (the whole child's address space). From settings:
    `vision_queue.documents.page_limits`."""

    dpi: int
    max_pixels: int
    time_limit_s: float
    memory_bytes: int


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


# Told each page (1-based number, PNG bytes or its coded error) as soon as it is drawn.
PageCallback = Callable[[int, "bytes | VisionQueueError"], None]


def render_pages(
    pdf_path: str,
    pages: int,
    limits: PageLimits,
    on_page: PageCallback | None = None,
) -> list[bytes | VisionQueueError]:
    """Every page of the PDF at `pdf_path` as PNG bytes, or the coded error it failed with.

    One child process draws the pages in order, reporting each on a line; a page that takes
    longer than the time limit gets its child killed (that page fails with `timeout`), one
    that stops the child (its memory bound) fails with `invalid_document`, and a new child
    goes on from the next page. `on_page` hears of each page as it is drawn (while the
    child draws the next), so a caller can put it to work at once."""
    out: list[bytes | VisionQueueError] = []
    with tempfile.TemporaryDirectory(prefix="vq-pages-") as folder:
        while len(out) < pages:
            out.extend(_render_from(pdf_path, len(out), pages, limits, folder, on_page))
    return out


def render_page(pdf_path: str, index: int, limits: PageLimits) -> bytes:
    """Page `index` (0-based) as PNG bytes; coded errors only."""
    with tempfile.TemporaryDirectory(prefix="vq-page-") as folder:
        page = _render_from(pdf_path, index, index + 1, limits, folder)[0]
    if isinstance(page, VisionQueueError):
        raise page
    return page


def _render_from(
    pdf_path: str,
    first: int,
    end: int,
    limits: PageLimits,
    folder: str,
    on_page: PageCallback | None = None,
) -> list[bytes | VisionQueueError]:
    """Pages first..end-1 from one child, stopping after the first page that runs late."""
    command = [sys.executable, "-m", "vision_queue.pdf_render", pdf_path, str(first), str(end)]
    command += [str(limits.dpi), str(limits.max_pixels), str(limits.memory_bytes), folder]
    child = subprocess.Popen(  # our own module, fixed arguments
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert child.stdout is not None and child.stdin is not None
    out: list[bytes | VisionQueueError] = []
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            for index in range(first, end):
                # The first page's limit also covers the child's start (imports).
                limit = limits.time_limit_s + (_START_ALLOWANCE_S if index == first else 0.0)
                if not selector.select(timeout=limit):
                    late = TaskTimeout(
                        f"page {index + 1} took longer than VQ_DOCUMENT_PAGE_TIME_LIMIT_S="
                        f"{limits.time_limit_s:g}s to draw",
                        field="document",
                    )
                    out.append(late)
                    if on_page is not None:
                        on_page(index + 1, late)
                    return out
                line = child.stdout.readline().decode("utf-8", "replace").strip()
                died = not line  # then the next child goes on from the next page
                out.append(
                    _stopped(index, child, limits) if died else _page_outcome(line, index, folder)
                )
                if on_page is not None:
                    on_page(index + 1, out[-1])
                if died:
                    return out
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()
    return out


def _stopped(index: int, child: subprocess.Popen[bytes], limits: PageLimits) -> VisionQueueError:
    """The error of a page whose child ended without reporting it."""
    try:
        code = child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        code = None
    how = "the renderer stopped"
    if code is not None and code < 0:
        try:
            how += f" ({signal.Signals(-code).name})"
        except ValueError:
            how += f" (signal {-code})"
    return InvalidDocument(
        f"page {index + 1} could not be drawn: {how}; a page that needs more than "
        f"VQ_DOCUMENT_PAGE_MEMORY_BYTES={limits.memory_bytes} to draw stops it",
        field="document",
    )


def _page_outcome(line: str, index: int, folder: str) -> bytes | VisionQueueError:
    if line == "ok":
        path = Path(folder) / f"page-{index}.png"
        data = path.read_bytes()
        path.unlink()
        return data
    if line.startswith("image_too_large:"):
        return ImageTooLarge(line.split(":", 1)[1].strip(), field="document")
    reason = line.split(":", 1)[1].strip() if ":" in line else "the renderer stopped"
    return InvalidDocument(f"page {index + 1} could not be drawn ({reason})", field="document")


def _exit_with_parent() -> None:
    """Exit at once when the parent does: its end of our stdin closes, the read returns.

    A thread, because pypdfium2's calls release the GIL while pdfium draws."""

    def watch() -> None:
        sys.stdin.buffer.read()
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _bound_memory(memory_bytes: int) -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ImportError, ValueError, OSError):
        # Not POSIX, or RLIMIT_AS not enforceable here (macOS): time and pixel bounds only.
        return


def _main(argv: list[str]) -> int:
    _exit_with_parent()
    pdf_path, first, end, dpi, max_pixels, memory_bytes = argv[0], *map(int, argv[1:6])
    folder = argv[6]
    _bound_memory(memory_bytes)
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(pdf_path)
    for index in range(first, end):
        try:
            page = pdf[index]
            width, height = page.get_size()
            scale = page_scale(width, height, dpi, max_pixels)
            image = page.render(scale=scale).to_pil().convert("RGB")
            image.save(Path(folder) / f"page-{index}.png", format="PNG")
            line = "ok"
        except ImageTooLarge as exc:
            line = f"image_too_large: {exc.message}"
        except MemoryError:
            line = "error: the page needs more than VQ_DOCUMENT_PAGE_MEMORY_BYTES to draw"
        except Exception as exc:  # one page's fault; the next page is drawn
            line = f"error: {type(exc).__name__}: {str(exc)[:200]}"
        sys.stdout.write(line.replace("\n", " ") + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
