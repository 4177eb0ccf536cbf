"""PDFs for the document tests, made by tools this project does not own.

* `chromium_pdf`: HTML printed to PDF by headless Chromium (skips when it is missing);
* `pillow_pdf`: pages drawn with Pillow and written by Pillow's PDF writer;
* `encrypted_pdf`: a PDF encrypted by qpdf (skips when it is missing);
* `raw_pdf`: a hand-assembled file, for the hostile shapes no tool writes on purpose
  (a 200-inch page, a page whose drawing never ends).
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageDraw


def chromium_pdf(html: str, folder: Path) -> bytes:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("headless Chromium is not installed")
    source, out = folder / "page.html", folder / "page.pdf"
    source.write_text(html, encoding="utf-8")
    subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={folder / 'profile'}",
            "--no-pdf-header-footer",
            f"--print-to-pdf={out}",
            source.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out.read_bytes()


def pillow_pdf(pages: int, size: tuple[int, int] = (320, 200)) -> bytes:
    images = []
    for number in range(1, pages + 1):
        image = Image.new("RGB", size, "white")
        ImageDraw.Draw(image).text((20, 20), f"Page {number} of {pages}", fill="black")
        images.append(image)
    out = io.BytesIO()
    images[0].save(out, format="PDF", save_all=True, append_images=images[1:], resolution=72.0)
    return out.getvalue()


def encrypted_pdf(
    plain: bytes,
    folder: Path,
    user_password: str = "secret",  # noqa: S107 - the test PDF's own
) -> bytes:
    binary = shutil.which("qpdf")
    if binary is None:
        pytest.skip("qpdf is not installed (scripts/setup.sh installs it)")
    source, out = folder / "plain.pdf", folder / "encrypted.pdf"
    source.write_bytes(plain)
    subprocess.run(
        [binary, "--encrypt", user_password, "owner-password", "256", "--", str(source), str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out.read_bytes()


def raw_pdf(pages: list[tuple[float, float, bytes]], extra: list[bytes] | None = None) -> bytes:
    """A PDF of pages (width pt, height pt, content stream); `extra` objects follow the
    pages, numbered from 3 + 2 * len(pages), for the content streams to name."""
    objects: list[bytes] = []
    first_page = 3
    kids = " ".join(f"{first_page + 2 * i} 0 R" for i in range(len(pages)))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    extra = extra or []
    extra_first = first_page + 2 * len(pages)
    xobjects = " ".join(f"/X{n} {extra_first + n} 0 R" for n in range(len(extra)))
    for index, (width, height, content) in enumerate(pages):
        contents = first_page + 2 * index + 1
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {width} {height}] "
            f"/Resources << /XObject << {xobjects} >> >> /Contents {contents} 0 R >>".encode()
        )
        objects.append(_stream(b"", content))
    objects.extend(extra)
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    out.write(
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    return out.getvalue()


def _stream(dictionary: bytes, data: bytes) -> bytes:
    return (
        b"<< " + dictionary + f" /Length {len(data)} >>\nstream\n".encode() + data + b"\nendstream"
    )


def endless_page_pdf(levels: int = 12, fanout: int = 10, plain_pages: int = 0) -> bytes:
    """`plain_pages` pages with a square, then one page that draws form X0, which draws X1
    `fanout` times, ...: fanout**levels rectangles (10**12 by default) from a few kilobytes."""
    extra_first = 3 + 2 * (plain_pages + 1)
    forms = []
    for level in range(levels):
        last = level == levels - 1
        body = b"0 0 1 1 re f" if last else f"/X{level + 1} Do ".encode() * fanout
        inner = "" if last else f"/XObject << /X{level + 1} {extra_first + level + 1} 0 R >>"
        form = f"/Type /XObject /Subtype /Form /BBox [0 0 612 792] /Resources << {inner} >>"
        forms.append(_stream(form.encode(), body))
    plain = [(300.0, 200.0, b"0 0 0 rg 10 10 100 50 re f")] * plain_pages
    return raw_pdf([*plain, (612.0, 792.0, b"/X0 Do")], forms)


def enormous_page_pdf() -> bytes:
    """One 200 x 200 inch page (the largest PDF allows), with a black square on it."""
    return raw_pdf([(14400, 14400, b"0 0 0 rg 1000 1000 5000 5000 re f")])


def drawing_children(pid: int) -> list[int]:
    """The PDF-drawing children (`vision_queue.pdf_render`) process `pid` has now (Linux)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"vision_queue.pdf_render" in cmdline:
                found.append(int(child))
    return found
