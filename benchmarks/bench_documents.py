"""Documents: a 6-page PDF as one job (pages in parallel) vs its six pages one after another.

A real redis-server and a real `worker run` with VQ_MAX_BATCH=4 on the CPU (tiny
checkpoint). Both arms go through the whole document path (client check, staging, the
worker's drawing in a child process, page tasks, the join):

* sequential: six one-page documents, each submitted after the previous one ended;
* document: one six-page document (its pages share batch rows).

    python benchmarks/bench_documents.py                # 6 pages, 200 new tokens, 3 runs
    python benchmarks/bench_documents.py --pages 6 --new-tokens 96 --num-crops 4 --threads 2

Target (issue #23): the document at least 2x faster than the pages one after another.
Figures in docs/benchmarks.md. Not a timed test.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def pdf_pages(pages: int) -> list[bytes]:
    """`pages` one-page PDFs and, last, one PDF of all of them (Pillow's PDF writer)."""
    from PIL import Image, ImageDraw

    images = []
    for number in range(1, pages + 1):
        image = Image.new("RGB", (600, 400), "white")
        ImageDraw.Draw(image).text((30, 30), f"Page {number}: quarterly figures", fill="black")
        images.append(image)
    singles = []
    for image in images:
        out = io.BytesIO()
        image.save(out, format="PDF")
        singles.append(out.getvalue())
    out = io.BytesIO()
    images[0].save(out, format="PDF", save_all=True, append_images=images[1:])
    return [*singles, out.getvalue()]


def timeline(client: object, doc: dict, ones: list[dict]) -> None:
    """When each page of `doc` started and ended, in seconds after the document's submit
    (a page's request carries the document's submit time, so its `queued` is that offset),
    and, for the one-page documents of the last sequential run, how long their page took
    to start and to generate."""
    for one in ones:
        page = dict(client.result(one["pages"][0]["id"]) or {})  # type: ignore[attr-defined]
        t = page.get("timings", {})
        print(
            f"  one-page document: page started {t.get('queued', 0):.3f} s, generate "
            f"{t.get('generate', 0):.3f} s, document ended {one['timings']['total']:.3f} s"
        )
    started = doc["timings"]["queued"]
    print(f"  document: started {started:.3f} s, ended {doc['timings']['total']:.3f} s")
    for page in doc["pages"]:
        result = dict(client.result(page["id"]) or {})  # type: ignore[attr-defined]
        t = result.get("timings", {})
        print(
            f"  page {page['page']}: started {t.get('queued', 0):.3f} s, preprocess "
            f"{t.get('preprocess', 0):.3f} s, generate {t.get('generate', 0):.3f} s, ended "
            f"{t.get('queued', 0) + t.get('total', 0):.3f} s, "
            f"{page['usage']['completion_tokens']} tokens"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pages", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the worker")
    parser.add_argument("--num-crops", type=int, default=1, help="VQ_NUM_CROPS of the worker")
    parser.add_argument(
        "--timeline", action="store_true", help="print the last document's page timings"
    )
    args = parser.parse_args()

    from support.redis_server import RedisServer
    from support.workers import WorkerProcess

    from producer.client import Client
    from vision_queue.settings import Settings

    caps = f"describe=16,ocr={args.new_tokens},compare=16,ask=64"
    *singles, whole = pdf_pages(args.pages)
    with tempfile.TemporaryDirectory() as folder, RedisServer(Path(folder)) as server:
        env = {
            "VQ_MAX_BATCH": str(args.batch),
            "VQ_MAX_NEW_TOKENS_CAPS": caps,
            "VQ_DOCUMENT_DPI": "72",
            "VQ_NUM_CROPS": str(args.num_crops),
            "OMP_NUM_THREADS": str(args.threads),
        }
        settings = Settings.from_env(None, redis_url=server.url, max_new_tokens_caps=caps)
        with WorkerProcess(server.url, Path(folder), **env), Client(settings) as client:

            def run(document: bytes) -> dict:
                handle = client.submit("ocr", document=document, max_new_tokens=args.new_tokens)
                result = client.result(handle.id, wait=True, timeout=900)
                assert result is not None and result["state"] == "SUCCESS", result
                return dict(result)

            run(singles[0])  # warm-up
            sequential, parallel = [], []
            for _ in range(args.runs):
                began = time.perf_counter()
                ones = [run(single) for single in singles]
                sequential.append(time.perf_counter() - began)
                tokens = sum(one["usage"]["completion_tokens"] for one in ones)
                began = time.perf_counter()
                result = run(whole)
                parallel.append(time.perf_counter() - began)
                assert len(result["pages"]) == args.pages
                print(
                    f"run: sequential {sequential[-1]:.2f} s ({tokens} tokens), document "
                    f"{parallel[-1]:.2f} s ({result['usage']['completion_tokens']} tokens)",
                    flush=True,
                )
            if args.timeline:
                timeline(client, result, ones)
    seq, doc = statistics.median(sequential), statistics.median(parallel)
    print(
        f"{args.pages} pages, VQ_MAX_BATCH={args.batch}, {args.new_tokens} new tokens each: "
        f"one after another {seq:.2f} s, one document {doc:.2f} s: {seq / doc:.2f}x faster "
        f"(median of {args.runs})"
    )


if __name__ == "__main__":
    main()
