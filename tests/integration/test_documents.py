"""PDF documents on a real worker: one job of page tasks, one result, partial failure, cancel.

The PDFs come from tools this project does not own (headless Chromium, Pillow's PDF writer,
qpdf) or are hand-assembled hostile files (tests/support/pdfs.py).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support.http_server import IMAGE_HOST, Route, serve
from support.pdfs import (
    chromium_pdf,
    drawing_children,
    encrypted_pdf,
    endless_page_pdf,
    pillow_pdf,
)
from support.workers import WorkerProcess, base_env, run_cli, wait_until_generating

from producer import AsyncClient, Client
from producer.idempotency import IdempotencyConflict
from vision_queue.documents import DOCUMENT_KEY
from vision_queue.errors import InvalidDocument
from vision_queue.pdf_render import least_page_memory
from vision_queue.settings import Settings
from vision_queue.streams import StreamEvent

pytestmark = pytest.mark.timeout(300)

LONG = 100_000
CAPS = f"describe=16,ocr=16,compare=16,ask={LONG}"
WORKER_ENV = {
    "VQ_ALLOWED_PRIVATE_HOSTS": IMAGE_HOST,  # PDFs by URL from the tests' loopback server
    "VQ_DOCUMENT_PAGE_TIME_LIMIT_S": "3",
    # The endless page grows pdfium's memory (about 0.5 GB/s here): far enough that the
    # time limit stops it first on any machine, so its page fails `timeout` every time.
    "VQ_DOCUMENT_PAGE_MEMORY_BYTES": str(8 * 1024**3),
    "VQ_DOCUMENT_DPI": "72",
    "VQ_MAX_NEW_TOKENS_CAPS": CAPS,
    "VQ_TASK_TIME_LIMIT_S": "120",
}


@pytest.fixture(scope="module")
def doc_worker(module_redis, tmp_path_factory) -> Iterator[WorkerProcess]:
    with WorkerProcess(module_redis.url, tmp_path_factory.mktemp("doc-worker"), **WORKER_ENV) as w:
        yield w


@pytest.fixture
def doc_client(module_redis, doc_worker) -> Iterator[Client]:
    settings = Settings.from_env(
        {}, redis_url=module_redis.url, connect_timeout_s=3.0, max_new_tokens_caps=CAPS
    )
    with Client(settings) as client:
        yield client


def page_ids(client: Client, doc_id: str) -> list[str]:
    raw = redis.Redis.from_url(client.settings.effective_broker_url).hget(
        DOCUMENT_KEY.format(doc_id=doc_id), "ids"
    )
    return json.loads(raw) if raw else []


def test_a_pdf_printed_by_chromium_becomes_one_job_of_pages(doc_client: Client, tmp_path):
    html = (
        "<h1>Quarterly report</h1><p>Revenue grew 12 percent.</p>"
        '<div style="page-break-after: always"></div><h1>Outlook</h1><p>Stable.</p>'
    )
    handle = doc_client.submit("ocr", document=chromium_pdf(html, tmp_path))
    result = doc_client.result(handle.id, wait=True, timeout=240)
    assert result is not None and result["state"] == "SUCCESS", result
    doc = dict(result)
    pages = doc["pages"]
    assert [page["page"] for page in pages] == [1, 2]
    assert all(page["state"] == "SUCCESS" for page in pages)
    # Each page ran as a task of its own, under its own id.
    ids = page_ids(doc_client, handle.id)
    assert [page["id"] for page in pages] == ids and handle.id not in ids
    assert doc["usage"]["completion_tokens"] == sum(
        page["usage"]["completion_tokens"] for page in pages
    )
    assert doc["text"] == pages[0]["text"] + "\n\n--- page 2 ---\n\n" + pages[1]["text"]
    status = doc_client.status(handle.id)
    assert (status.state, status.pages_done, status.pages_total) == ("SUCCESS", 2, 2)


def test_partial_failure_is_explicit(doc_client: Client):
    # Page 2 draws forms nested 10**12 times: its drawing is stopped at the time limit.
    document = endless_page_pdf(plain_pages=1)
    allowed = doc_client.submit("ocr", document=document, max_failed_pages=1)
    strict = doc_client.submit("ocr", document=document)
    ok = doc_client.result(allowed.id, wait=True, timeout=240)
    failed = doc_client.result(strict.id, wait=True, timeout=240)
    assert ok is not None and ok["state"] == "SUCCESS", ok
    assert [page["state"] for page in dict(ok)["pages"]] == ["SUCCESS", "FAILURE"]
    assert dict(ok)["pages"][1]["error"]["code"] == "timeout"
    assert failed is not None and failed["state"] == "FAILURE"
    assert failed["error"]["code"] == "document_failed"
    assert [page["state"] for page in dict(failed)["pages"]] == ["SUCCESS", "FAILURE"]


def test_cancelling_a_document_cancels_its_running_and_queued_pages(doc_client: Client):
    handle = doc_client.submit(
        "ask", document=pillow_pdf(3), prompt="Tell a very long story.", max_new_tokens=LONG
    )
    deadline = time.monotonic() + 120
    while not page_ids(doc_client, handle.id):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ids = page_ids(doc_client, handle.id)
    wait_until_generating(doc_client, ids[0], timeout_s=120)
    assert doc_client.status(handle.id).pages_total == 3
    cancelled_at = time.monotonic()
    doc_client.cancel(handle.id)
    result = doc_client.result(handle.id, wait=True, timeout=60)
    assert time.monotonic() - cancelled_at < 20
    assert result is not None and result["state"] == "FAILURE"
    assert result["error"]["code"] == "cancelled"
    pages = dict(result)["pages"]
    assert len(pages) == 3 and all(page["state"] == "CANCELLED" for page in pages)
    # The running page kept what it generated before the cancel.
    assert pages[0]["usage"]["completion_tokens"] > 0
    for page_id in ids:
        page = doc_client.result(page_id)
        assert page is not None and page["error"]["code"] == "cancelled"


def test_hostile_pdfs_are_refused_before_anything_is_queued(doc_client: Client, tmp_path):
    queue = redis.Redis.from_url(doc_client.settings.effective_broker_url)
    before = queue.llen(doc_client.settings.queue)
    for bad in (b"not a pdf", pillow_pdf(2)[:-200], encrypted_pdf(pillow_pdf(1), tmp_path)):
        with pytest.raises(InvalidDocument):
            doc_client.submit("ocr", document=bad)
    small = Settings.from_env({}, redis_url=doc_client.settings.redis_url, document_max_pages=2)
    with Client(small) as other, pytest.raises(InvalidDocument, match="MAX_PAGES=2"):
        other.submit("ocr", document=pillow_pdf(3))
    assert queue.llen(doc_client.settings.queue) == before


def test_the_cli_runs_a_document_and_shows_its_pages(module_redis, doc_worker, tmp_path):
    env = base_env(module_redis.url, VQ_MAX_NEW_TOKENS_CAPS=CAPS)
    path = tmp_path / "report.pdf"
    path.write_bytes(pillow_pdf(2))
    done = run_cli(
        "producer",
        ["submit", "--task", "ocr", "--document", str(path), "--wait", "--json"],
        env,
        timeout_s=240,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [page["page"] for page in result["pages"]] == [1, 2]
    status = run_cli("producer", ["status", result["id"], "--json"], env)
    assert json.loads(status.stdout)["pages_total"] == 2
    streamed = run_cli(
        "producer",
        [
            *("submit", "--task", "ask", "--prompt", "Hi", "--max-new-tokens", "8"),
            *("--document", str(path), "--stream"),
        ],
        env,
        timeout_s=240,
    )
    # The pages' texts arrive interleaved, each run of text headed by its page.
    assert streamed.returncode == 0, streamed.stderr
    assert "[page 1] " in streamed.stdout and "[page 2] " in streamed.stdout
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(pillow_pdf(2)[:-200])
    refused = run_cli("producer", ["submit", "--task", "ocr", "--document", str(bad)], env)
    assert refused.returncode == 2 and "invalid_document" in refused.stderr


def test_a_worker_killed_mid_document_loses_no_page(tmp_path):
    from support.redis_server import RedisServer

    env = {**WORKER_ENV, "VQ_LEASE_TTL_S": "2"}
    with RedisServer(tmp_path / "redis") as server:
        settings = Settings.from_env(
            {}, redis_url=server.url, connect_timeout_s=3.0, max_new_tokens_caps=CAPS
        )
        with Client(settings) as client:
            first = WorkerProcess(server.url, tmp_path / "a", **env).start()
            try:
                handle = client.submit(
                    "ask", document=pillow_pdf(2), prompt="Tell a story.", max_new_tokens=1500
                )
                deadline = time.monotonic() + 120
                while not page_ids(client, handle.id):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                wait_until_generating(client, page_ids(client, handle.id)[0], timeout_s=120)
            finally:
                first.signal(signal.SIGKILL)
                first.wait()
            with WorkerProcess(server.url, tmp_path / "b", **env) as second:
                result = client.result(handle.id, wait=True, timeout=280)
                assert result is not None and result["state"] == "SUCCESS", result
                pages = dict(result)["pages"]
                assert [page["state"] for page in pages] == ["SUCCESS", "SUCCESS"]
                # The page the first worker was generating ran again on the second.
                assert pages[0]["worker"] == second.name


def test_a_worker_killed_while_drawing_resumes_the_document_under_the_same_pages(tmp_path):
    from support.redis_server import RedisServer

    env = {**WORKER_ENV, "VQ_LEASE_TTL_S": "2"}
    with RedisServer(tmp_path / "redis") as server:
        settings = Settings.from_env(
            {}, redis_url=server.url, connect_timeout_s=3.0, max_new_tokens_caps=CAPS
        )
        record = redis.Redis.from_url(server.url)
        with Client(settings) as client:
            # Given a worker that has queued page 1 and is still drawing page 2 (whose
            # drawing never ends; the page time limit is far away)
            first = WorkerProcess(
                server.url, tmp_path / "a", **{**env, "VQ_DOCUMENT_PAGE_TIME_LIMIT_S": "60"}
            ).start()
            try:
                handle = client.submit(
                    "ocr", document=endless_page_pdf(plain_pages=1), max_failed_pages=1
                )
                key = DOCUMENT_KEY.format(doc_id=handle.id)
                deadline = time.monotonic() + 120
                while not record.hexists(key, "digest:1"):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                ids = page_ids(client, handle.id)
            finally:
                # When it dies there
                first.signal(signal.SIGKILL)
                first.wait()
            # Then the next worker takes the document again, draws what was never drawn,
            # and queues the pages under the ids the first one chose: one result, each
            # page once.
            with WorkerProcess(server.url, tmp_path / "b", **env):
                result = client.result(handle.id, wait=True, timeout=240)
            assert result is not None and result["state"] == "SUCCESS", result.get("error")
            pages = dict(result)["pages"]
            assert [page["id"] for page in pages] == ids == page_ids(client, handle.id)
            assert [page["state"] for page in pages] == ["SUCCESS", "FAILURE"]
            assert pages[1]["error"]["code"] == "timeout"


def test_a_pdf_by_url_is_downloaded_by_the_worker_and_checked_there(module_redis, doc_worker):
    settings = Settings.from_env(
        {}, redis_url=module_redis.url, max_new_tokens_caps=CAPS, allowed_private_hosts=IMAGE_HOST
    )
    routes = {
        "/report.pdf": Route(body=pillow_pdf(2), content_type="application/pdf"),
        "/cat.pdf": Route(body=b"GIF89a this is no PDF", content_type="application/pdf"),
        "/gone.pdf": Route(404, b"not here"),
    }
    with serve(routes) as server, Client(settings) as client:
        good = client.submit("ocr", document=server.url("/report.pdf"))
        fake = client.submit("ocr", document=server.url("/cat.pdf"))
        gone = client.submit("ocr", document=server.url("/gone.pdf"))
        result = client.result(good.id, wait=True, timeout=240)
        assert result is not None and result["state"] == "SUCCESS", result.get("error")
        assert [page["page"] for page in dict(result)["pages"]] == [1, 2]
        # The checks that a client runs on bytes it holds, the worker runs on the download.
        refused = client.result(fake.id, wait=True, timeout=60)
        assert refused is not None and refused["state"] == "FAILURE"
        assert refused["error"]["code"] == "invalid_document"
        assert "not a PDF" in refused["error"]["message"]
        missing = client.result(gone.id, wait=True, timeout=60)
        assert missing is not None and missing["error"]["code"] == "image_fetch_failed"
        assert server.requests.count("/report.pdf") == 1


def test_each_pages_text_streams_on_the_documents_events_marked_with_its_page(
    doc_client: Client,
):
    handle = doc_client.submit(
        "ask", document=pillow_pdf(3), prompt="Read this page aloud.", max_new_tokens=24
    )
    events = list(doc_client.stream_events(handle.id))
    deltas, ends = events[:-1], events[-1:]
    # One stream for the document, numbered without gaps (the follower refuses gaps), that
    # ends once, after every page's text.
    assert [event.kind for event in ends] == ["end"] and all(e.kind == "delta" for e in deltas)
    assert [event.seq for event in events] == list(range(len(events)))
    result = doc_client.result(handle.id)
    assert result is not None and result["state"] == "SUCCESS", result.get("error")
    assert ends[0].result is not None and ends[0].result["text"] == result["text"]
    pages = dict(result)["pages"]
    assert {event.page for event in deltas} == {1, 2, 3}
    for page in pages:
        streamed = "".join(e.text for e in deltas if e.page == page["page"])
        assert streamed == page["text"] and page["usage"]["completion_tokens"] > 0


def test_the_async_client_follows_a_documents_stream_from_a_cursor(doc_client: Client):
    handle = doc_client.submit(
        "ask", document=pillow_pdf(2), prompt="Read this page aloud.", max_new_tokens=16
    )
    result = doc_client.result(handle.id, wait=True, timeout=240)
    assert result is not None and result["state"] == "SUCCESS", result.get("error")
    everything = list(doc_client.stream_events(handle.id))

    async def resume() -> list[StreamEvent]:
        async with AsyncClient(doc_client.settings) as client:
            return [event async for event in client.stream_events(handle.id, everything[0].cursor)]

    resumed = asyncio.run(resume())
    assert resumed == everything[1:] and resumed[-1].kind == "end"
    assert {event.page for event in resumed[:-1]} <= {1, 2}
    assert all(event.page is not None for event in resumed[:-1])


def test_an_idempotency_key_queues_a_document_once(doc_client: Client, tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(pillow_pdf(1))
    first = doc_client.submit("ocr", document=path, idempotency_key="scan-7")
    # The same request again (the bytes this time, not the path): the same document.
    again = doc_client.submit("ocr", document=path.read_bytes(), idempotency_key="scan-7")
    assert again.id == first.id

    async def from_async_client() -> str:
        async with AsyncClient(doc_client.settings) as client:
            return (await client.submit("ocr", document=path, idempotency_key="scan-7")).id

    assert asyncio.run(from_async_client()) == first.id
    with pytest.raises(IdempotencyConflict):
        doc_client.submit("ocr", document=pillow_pdf(2), idempotency_key="scan-7")
    with pytest.raises(IdempotencyConflict):
        doc_client.submit("ocr", document=path, max_failed_pages=1, idempotency_key="scan-7")
    result = doc_client.result(first.id, wait=True, timeout=240)
    assert result is not None and result["state"] == "SUCCESS", result.get("error")
    assert dict(result)["pages_total"] == 1


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_a_worker_draws_at_most_its_share_of_documents_at_once(module_redis, tmp_path):
    # Given a worker with three rows that draws one PDF at a time, and three documents at
    # once whose page grows its drawing child until the memory bound stops it
    env = {
        **WORKER_ENV,
        "VQ_QUEUE": "renders",
        "VQ_MAX_BATCH": "3",
        "VQ_DOCUMENT_RENDERS": "1",
        "VQ_MAX_IMAGE_PIXELS": "1000000",
        "VQ_DOCUMENT_PAGE_MEMORY_BYTES": str(least_page_memory(1_000_000)),
        "VQ_DOCUMENT_PAGE_TIME_LIMIT_S": "60",
    }
    settings = Settings.from_env(
        {}, redis_url=module_redis.url, queue="renders", max_image_pixels=1_000_000,
        connect_timeout_s=3.0,
    )
    with WorkerProcess(module_redis.url, tmp_path, **env) as worker, Client(settings) as client:
        assert worker.process is not None
        handles = [client.submit("ocr", document=endless_page_pdf()) for _ in range(3)]
        most, results = 0, {}
        deadline = time.monotonic() + 240
        while len(results) < 3:
            assert time.monotonic() < deadline
            most = max(most, len(drawing_children(worker.process.pid)))
            for handle in handles:
                if handle.id not in results and (done := client.result(handle.id)) is not None:
                    results[handle.id] = done
            time.sleep(0.02)
    # Then each document fails on its page's coded error, and never were two drawn at once
    for result in results.values():
        assert result["state"] == "FAILURE" and result["error"]["code"] == "document_failed"
        assert result["pages"][0]["error"]["code"] == "invalid_document"
    assert most == 1
