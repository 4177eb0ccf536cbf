"""`worker infer`: answer one request with a local engine, no queue involved.

    worker infer --model PATH_OR_ID --task describe --image photo.jpg [--json]
    python -m worker.infer_cli --task ask --prompt "What is 2+2?" --device cpu

The request is checked by the same rules as the queue (`vision_queue.schemas.check_request`),
and its images read and decoded before the model loads, so a bad request fails at once.
URLs go through the worker's SSRF-guarded fetcher; local files are read directly.

Exit codes: 0 answered; 1 the model failed to load or to generate; 2 bad arguments or
input (wrong image count for the task, unreadable image, unknown task...), with a
one-line reason on stderr.

Cold start: run as a program (`main()` without arguments) the process pauses Python's
cyclic garbage collector for its whole life and ends with `os._exit` once stdout, stderr
and the log are flushed. Importing torch allocates millions of long-lived objects, which
the collector would otherwise scan repeatedly while they load and once more at exit,
about a second of a few seconds' run; a one-shot process frees everything at exit anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from PIL import Image

from vision_queue.errors import VisionQueueError
from vision_queue.images import ImageLimits, decode_image
from vision_queue.protocol import TaskName
from vision_queue.schemas import ImageRef, ImageSource, TaskOptions, TaskRequest, check_request
from vision_queue.settings import Settings, SettingsError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


class UsageError(Exception):
    """Bad arguments or input: exit 2 with this one-line message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    tasks = ", ".join(task.value for task in TaskName)
    parser = _Parser(
        prog="worker infer",
        description="Answer one request with Phi-3-vision, without the queue.",
        epilog="Exit codes: 0 answered, 1 model failure, 2 bad arguments or input.",
    )
    parser.add_argument(
        "--model", help="local checkpoint folder or Hugging Face id (default VQ_MODEL)"
    )
    parser.add_argument("--task", required=True, help=f"one of: {tasks}")
    parser.add_argument(
        "--image", action="append", default=[], metavar="FILE_OR_URL",
        help="image file or http(s) URL; repeat for several images (in order)",
    )
    parser.add_argument("--prompt", help="the question (ask only; other tasks use fixed prompts)")
    parser.add_argument(
        "--max-new-tokens", type=int, help="token budget (default: the task's cap)"
    )
    parser.add_argument(
        "--num-crops", type=int, help="HD crops per image, 1..16 (default: the checkpoint's)"
    )
    parser.add_argument(
        "--device", default="auto", type=_device, help="cpu, cuda, cuda:N or auto"
    )
    parser.add_argument("--dtype", default="auto", choices=_DTYPES, help="compute dtype")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the text"
    )
    return parser


def _device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not cpu, cuda, cuda:N or auto")
    return value


def infer_main(argv: list[str]) -> int:
    began = time.perf_counter()
    try:
        args = build_parser().parse_args(argv)
        settings = Settings.from_env(reader="worker")
        request = _task_request(args, settings)
        fetch_began = time.perf_counter()
        images = [_load_image(ref, settings) for ref in request.images]
        fetch_s = time.perf_counter() - fetch_began
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (UsageError, SettingsError, VisionQueueError) as exc:
        print(f"worker infer: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE

    _configure_logging(settings.log_level)
    # Imported only now: torch and the model stack are not needed to reject a request.
    from worker.inference.engine import Engine, EngineConfig, GenerationRequest

    try:
        engine = Engine.load(EngineConfig(
            model=args.model or settings.model, device=args.device, dtype=args.dtype,
            num_crops=args.num_crops or settings.default_num_crops or None,
            longrope_switch=settings.longrope_switch,
        ))
        result = engine.generate(GenerationRequest(
            prompt=request.effective_prompt(), images=images,
            max_new_tokens=request.max_new_tokens(settings), num_crops=args.num_crops,
        ))
    except VisionQueueError as exc:
        print(f"worker infer: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE if exc.code.value == "invalid_input" else EXIT_FAILED

    if args.json:
        output = _output(request, result, engine.model_id, engine.device, fetch_s, began)
        print(json.dumps(output, ensure_ascii=False))
    else:
        print(result.text)
    return EXIT_OK


def _task_request(args: argparse.Namespace, settings: Settings) -> TaskRequest:
    try:
        task = TaskName(args.task)
    except ValueError:
        known = ", ".join(task.value for task in TaskName)
        raise UsageError(f"unknown task {args.task!r} (known: {known})") from None
    refs = tuple(_image_ref(value) for value in args.image)
    request = TaskRequest(
        task=task, images=refs, prompt=args.prompt,
        options=TaskOptions(max_new_tokens=args.max_new_tokens, num_crops=args.num_crops),
    )
    check_request(request, settings)  # the queue's own rules, so both paths agree
    return request


def _image_ref(value: str) -> ImageRef:
    if urlsplit(value).scheme in ("http", "https"):
        return ImageRef(ImageSource.URL, value)
    return ImageRef(ImageSource.PATH, value)


def _load_image(ref: ImageRef, settings: Settings) -> Image.Image:
    if ref.source is ImageSource.URL:
        from worker.fetch import fetch_image_bytes

        data = fetch_image_bytes(ref.ref, settings)
    else:
        path = Path(ref.ref).expanduser()
        try:
            with path.open("rb") as file:
                data = file.read(settings.max_image_bytes + 1)
        except OSError as exc:
            raise UsageError(f"cannot read image {ref.ref}: {exc.strerror or exc}") from None
        if len(data) > settings.max_image_bytes:
            raise UsageError(
                f"image {ref.ref} is larger than VQ_MAX_IMAGE_BYTES={settings.max_image_bytes}"
            )
    try:
        return decode_image(data, ImageLimits.from_settings(settings))
    except VisionQueueError as exc:
        raise UsageError(f"image {ref.describe()}: {exc.message}") from None


def _output(
    request: TaskRequest, result: Any, model: str, device: str, fetch_s: float, began: float
) -> dict[str, Any]:
    """The shape of `producer result --json` (a task that never queued: no id, no wait, no
    worker), plus the token ids, so an answer can be checked against a reference exactly."""
    return {
        "id": "",
        "task": request.task.value,
        "state": "SUCCESS",
        "text": result.text,
        "model": model,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "cached_tokens": result.cached_tokens,
        },
        "finish_reason": result.finish_reason,
        "timings": {
            "queued": 0.0,
            "fetch": round(fetch_s, 4),
            "preprocess": round(result.preprocess_s, 4),
            "generate": round(result.prefill_s + result.decode_s, 4),
            "total": round(time.perf_counter() - began, 4),  # model loading included
        },
        "worker": "",
        "device": device,
        "token_ids": result.token_ids,
    }


def _configure_logging(level: str) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=level.upper(), stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )


def _one_line(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, VisionQueueError) else str(exc)
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """With `argv` (tests, callers): answer and return the exit code. Without: the program."""
    if argv is None:
        run_program(sys.argv[1:])
    return infer_main(list(argv))


def run_program(argv: list[str]) -> NoReturn:
    """The one-shot process: collector paused throughout, no teardown at exit."""
    gc.disable()
    exit_now(infer_main(argv))


def exit_now(code: int) -> NoReturn:
    """End the process with `code` once output and logs are flushed, skipping teardown.

    Interpreter shutdown would run a final collection over the torch heap and tear every
    module down, a second or more, for memory the operating system frees anyway.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to save
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())

