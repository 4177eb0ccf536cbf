"""A PDF given by URL: refused addresses before anything is queued, the worker's guarded
download with the document's byte cap, and the checks on the bytes it got.

The downloads here are real HTTP from a server on loopback (allow-listed by host:port, as
a deployment allow-lists an internal host); the address refusals never open a socket.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.http_server import LocalServer, Route, serve
from support.pdfs import pillow_pdf

from producer.documents import document_url, prepare_document
from producer.submission import SubmitRequest
from vision_queue.documents import check_pdf, document_message, parse_document
from vision_queue.errors import ImageFetchFailed, InvalidDocument, InvalidInput
from vision_queue.images import ImageLimits
from vision_queue.protocol import Priority
from vision_queue.schemas import ImageSource, TaskRequest
from vision_queue.settings import Settings
from worker.documents import fetch_document

pytestmark = pytest.mark.timeout(60)

PDF = pillow_pdf(2)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    routes = {
        "/report.pdf": Route(body=PDF, content_type="application/pdf"),
        "/big.pdf": Route(body=PDF + b" " * 5000, content_type="application/pdf"),
        "/moved.pdf": Route(404, b"gone"),
        "/broken.pdf": Route(503, b"try later"),
        "/cat.pdf": Route(body=b"GIF89a not a pdf at all"),
    }
    with serve(routes, port=0) as local:
        yield local


def settings_for(server: LocalServer, **fields: object) -> Settings:
    return Settings.from_env(
        {}, allowed_private_hosts=f"127.0.0.1:{server.port}", fetch_timeout_s=10, **fields
    )


def test_the_worker_downloads_the_pdf_and_counts_its_pages(server):
    settings = settings_for(server)
    data = fetch_document(server.url("/report.pdf"), settings)
    assert data == PDF and check_pdf(data, settings) == 2
    assert server.requests == ["/report.pdf"]


def test_a_pdf_over_the_document_byte_cap_is_an_invalid_document(server):
    # The image cap is far below the PDF's size: the document's own cap is the one applied.
    settings = settings_for(server, document_max_bytes=len(PDF) + 100, max_image_bytes=10)
    assert fetch_document(server.url("/report.pdf"), settings) == PDF
    with pytest.raises(InvalidDocument, match="VQ_DOCUMENT_MAX_BYTES"):
        fetch_document(server.url("/big.pdf"), settings)


def test_a_missing_pdf_is_permanent_and_a_5xx_transient(server):
    settings = settings_for(server)
    with pytest.raises(ImageFetchFailed) as missing:
        fetch_document(server.url("/moved.pdf"), settings)
    assert not missing.value.transient and missing.value.field == "document"
    with pytest.raises(ImageFetchFailed) as broken:
        fetch_document(server.url("/broken.pdf"), settings)
    assert broken.value.transient


def test_downloaded_bytes_that_are_not_a_pdf_are_refused_by_the_pdf_checks(server):
    settings = settings_for(server)
    data = fetch_document(server.url("/cat.pdf"), settings)
    with pytest.raises(InvalidDocument, match="not a PDF"):
        check_pdf(data, settings)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/report.pdf",
        "http://10.0.0.7/report.pdf",
        "http://127.0.0.1:9/report.pdf",
        "http://[::1]/report.pdf",
        "http://localhost/report.pdf",
    ],
)
def test_internal_addresses_are_refused_before_anything_is_queued(url):
    settings = Settings.from_env({})
    with pytest.raises(ImageFetchFailed) as refused:
        document_url(url, settings)
    assert refused.value.field == "document" and not refused.value.transient


def test_a_url_document_is_queued_with_its_url_and_no_page_count():
    settings = Settings.from_env({})
    url = "https://docs.example/report.pdf"
    draft, data, pages = prepare_document(
        SubmitRequest("ocr", ()), url, 0, settings, ImageLimits.from_settings(settings)
    )
    assert data is None and pages == 0
    request = TaskRequest(draft.task, draft.images, draft.prompt, draft.options)
    parsed = parse_document(document_message(request, pages, Priority.NORMAL, 0), settings)
    assert (parsed.pdf.source, parsed.pdf.ref, parsed.pages) == (ImageSource.URL, url, 0)


def test_a_url_document_still_takes_only_the_document_tasks():
    settings = Settings.from_env({})
    with pytest.raises(InvalidInput, match="compare"):
        prepare_document(
            SubmitRequest("compare", ()),
            "https://docs.example/report.pdf",
            0,
            settings,
            ImageLimits.from_settings(settings),
        )
