"""`producer`: submit vision jobs and follow them from the command line."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from producer.cli_output import (
    WaitReporter,
    describe_status,
    status_json,
    tasks_help,
    warn,
)
from producer.client import Client
from vision_queue.cli_support import CtrlC, add_version_option, quiet_pipe
from vision_queue.errors import (
    BrokerAuthenticationFailed,
    BrokerUnavailable,
    ImageTooLarge,
    InvalidInput,
    TaskFailed,
    UnknownTaskId,
    VisionQueueError,
    WaitTimeout,
)
from vision_queue.generation_options import MAX_CHOICES
from vision_queue.logprobs import MAX_TOP_LOGPROBS
from vision_queue.protocol import Priority, TaskName
from vision_queue.results import Result, ResultError
from vision_queue.settings import SettingsError
from vision_queue.streams import raise_if_failed

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_WAIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl+C

_EPILOG = """\
exit codes:
  0  success
  1  the task failed (its error code and message are printed)
  2  usage error or invalid input (nothing was queued)
  3  Redis unusable: unreachable (after a short bounded retry), refusing the
     password (fix REDIS_URL), or out of memory
  4  timed out waiting for the result
  130 interrupted (Ctrl+C) while waiting: the task keeps running

environment: REDIS_URL (or VQ_BROKER_URL / VQ_RESULT_BACKEND_URL), VQ_QUEUE, ...
(see docs/settings.md for every setting)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"producer: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    epilog = tasks_help() + "\n" + _EPILOG  # every command's --help states the task rules
    parser = _Parser(
        prog="producer",
        description="Queue Phi-3-vision jobs and read their results.",
        epilog=epilog,
        formatter_class=formatter,
    )
    add_version_option(parser)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    submit = commands.add_parser(
        "submit", help="queue a job", epilog=epilog, formatter_class=formatter
    )
    submit.add_argument(
        "--task",
        required=True,
        choices=[t.value for t in TaskName],
        help="what to do with the images (the task rules below)",
    )
    submit.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH_OR_URL",
        help="image file, http(s) URL, or - for the bytes on stdin; repeat for several images",
    )
    submit.add_argument(
        "--document",
        metavar="PDF_PATH_OR_URL",
        help="a PDF file or http(s) URL instead of images (ocr, describe, ask): one job, its "
        "pages run in parallel",
    )
    submit.add_argument(
        "--max-failed-pages",
        type=int,
        default=0,
        metavar="N",
        help="with --document: the job still succeeds when at most N pages failed (default 0)",
    )
    submit.add_argument("--prompt", help="your question (ask needs it; the others refuse it)")
    submit.add_argument(
        "--max-new-tokens", type=int, help="generation budget (capped per task, see below)"
    )
    submit.add_argument("--num-crops", type=int, help="HD crops per image (1..16)")
    submit.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); up to 2 samples"
    )
    submit.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (0..1]")
    submit.add_argument("--seed", type=int, help="sampling seed: same seed, same text")
    submit.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="end the text before TEXT (repeat, up to 4 times)",
    )
    submit.add_argument(
        "--n",
        type=_int_from(1, MAX_CHOICES),
        metavar="N",
        help=f"choices (1..{MAX_CHOICES}) from one prefill: the result lists them under "
        "`choices` (sample with --temperature and --seed to make them differ)",
    )
    submit.add_argument(
        "--logprobs",
        type=_int_from(0, MAX_TOP_LOGPROBS),
        nargs="?",
        const=0,
        metavar="K",
        help="each generated token's log probability in the result (`logprobs`), with its "
        f"K most likely alternatives (0..{MAX_TOP_LOGPROBS}, default 0); --json shows them",
    )
    shape = submit.add_mutually_exclusive_group()
    shape.add_argument(
        "--json-schema",
        metavar="FILE",
        help="answer in JSON that validates against the JSON schema in FILE ('-': stdin)",
    )
    shape.add_argument("--json-object", action="store_true", help="answer in a JSON object")
    submit.add_argument(
        "--priority",
        choices=[p.value for p in Priority],
        default=Priority.NORMAL.value,
        help="high tasks run before normal (default) before low",
    )
    _add_wait_options(submit)

    status = commands.add_parser(
        "status", help="show a task's state", epilog=epilog, formatter_class=formatter
    )
    status.add_argument("id", help="the task's id, as submit printed it")
    status.add_argument("--json", action="store_true", help="print one JSON object")

    result = commands.add_parser(
        "result", help="print a task's result", epilog=epilog, formatter_class=formatter
    )
    result.add_argument("id", help="the task's id, as submit printed it")
    _add_wait_options(result)

    cancel = commands.add_parser(
        "cancel",
        help="cancel a queued or running task (exit 1 if it had already finished)",
        epilog=epilog,
        formatter_class=formatter,
    )
    cancel.add_argument("id", help="the task's id, as submit printed it")

    serve = commands.add_parser(
        "serve",
        help="run the HTTP gateway (OpenAI-compatible and task APIs)",
        description="Serve the HTTP gateway; needs the `gateway` extra "
        "(pip install 'vision-queue[gateway]'). API keys: VQ_API_KEYS.",
        epilog=epilog,
        formatter_class=formatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--workers", type=int, default=1, help="gateway processes (they share only Redis)"
    )
    return parser


def _add_wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true", help="wait until the task finishes")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="print the text as it is generated (with --json: one JSON object per event)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="S",
        help="wait (implies --wait) and give up after S seconds; not with --stream",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _int_from(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high`, else a usage error naming it."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text[:40]!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {value}")
        return value

    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    return quiet_pipe(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "timeout", None) is not None:
        if args.stream:
            parser.error("--timeout applies to --wait; a --stream ends when the task does")
        args.wait = True  # a deadline on a wait nobody asked for would be ignored silently
    if args.command == "serve":
        return _serve(args)
    try:
        with Client() as client:
            return _COMMANDS[args.command](client, args)
    except SettingsError as exc:
        return _fail(EXIT_USAGE, f"invalid settings: {exc}")
    except VisionQueueError as exc:
        where = f" ({exc.field})" if exc.field else ""
        return _fail(EXIT_USAGE, f"{exc.code.value}{where}: {exc.message}")
    except BrokerAuthenticationFailed as exc:
        return _fail(EXIT_UNREACHABLE, f"authentication error: {exc}")
    except BrokerUnavailable as exc:
        return _fail(EXIT_UNREACHABLE, str(exc))
    except UnknownTaskId as exc:
        return _fail(EXIT_USAGE, str(exc))
    except WaitTimeout as exc:
        return _fail(EXIT_WAIT_TIMEOUT, str(exc))
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted")


def _submit(client: Client, args: argparse.Namespace) -> int:
    handle = client.submit(
        args.task,
        _images(args.image, client.settings.max_image_bytes),
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        num_crops=args.num_crops,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        priority=args.priority,
        response_format=_response_format(args),
        logprobs=args.logprobs is not None,
        top_logprobs=args.logprobs,
        n=args.n,
        document=args.document,
        max_failed_pages=args.max_failed_pages,
    )
    if not (args.wait or args.stream):
        print(json.dumps({"id": handle.id}) if args.json else handle.id)
        return EXIT_OK
    return _print_result(client, handle.id, args)


def _response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    """`--json-schema FILE` (its name is the file's stem) or `--json-object`."""
    if args.json_object:
        return {"type": "json_object"}
    if args.json_schema is None:
        return None
    path = Path(args.json_schema)
    try:
        text = sys.stdin.read() if args.json_schema == "-" else path.read_text("utf-8")
        schema = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(
            f"--json-schema {args.json_schema[-200:]}: not a readable JSON file ({exc})",
            field="response_format",
        ) from None
    name = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:64] or "response"
    schema_format = {"name": name, "schema": schema, "strict": True}
    return {"type": "json_schema", "json_schema": schema_format}


def _images(values: Sequence[str], max_bytes: int) -> list[str | bytes]:
    """`--image` values; `-` stands for the bytes on stdin (once: stdin is read once),
    read up to the byte cap and no further: an endless pipe is refused, not buffered."""
    if list(values).count("-") > 1:
        raise InvalidInput("--image - reads stdin, which holds one image", field="images")
    images: list[str | bytes] = []
    for index, value in enumerate(values):
        if value != "-":
            images.append(value)
            continue
        data = sys.stdin.buffer.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ImageTooLarge(
                f"stdin (--image -) holds more than the limit of {max_bytes} bytes "
                "(VQ_MAX_IMAGE_BYTES)",
                field=f"images[{index}]",
            )
        images.append(data)
    return images


def _status(client: Client, args: argparse.Namespace) -> int:
    status = client.status(args.id)
    if args.json:
        print(json.dumps(status_json(status)))
    else:
        result = client.result(args.id) if status.done else None
        print(describe_status(status, result))
    return EXIT_OK


def _result(client: Client, args: argparse.Namespace) -> int:
    return _print_result(client, args.id, args)


def _cancel(client: Client, args: argparse.Namespace) -> int:
    if not client.cancel(args.id):
        status = client.status(args.id)
        outcome = "succeeded" if status.state == "SUCCESS" else "failed"
        return _fail(
            EXIT_TASK_FAILED, f"task {args.id} had already finished ({outcome}): nothing to cancel"
        )
    print(f"cancel requested for {args.id}")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    try:
        from producer.gateway.server import serve
    except ImportError as exc:
        return _fail(
            EXIT_USAGE,
            f"the gateway needs the gateway extra (pip install 'vision-queue[gateway]'): {exc}",
        )
    try:
        serve(args.host, args.port, workers=args.workers)
    except SettingsError as exc:
        return _fail(EXIT_USAGE, f"invalid settings: {exc}")
    return EXIT_OK


def _print_result(client: Client, task_id: str, args: argparse.Namespace) -> int:
    if not (args.wait or args.stream):
        return _print_outcome(task_id, client.result(task_id), client, args)
    reporter = WaitReporter(
        client.live_workers, client.settings.queue, show_progress=sys.stderr.isatty()
    )
    ctrl_c = CtrlC(
        f"interrupted: task {task_id} keeps running; "
        f"`producer cancel {task_id}` stops it, `producer result {task_id} --wait` "
        "waits again",
        EXIT_INTERRUPTED,
    )
    try:
        with ctrl_c:
            if args.stream:
                return _print_stream(client, task_id, args, reporter)
            result = client.result(task_id, wait=True, timeout=args.timeout, on_status=reporter)
    except KeyboardInterrupt:
        reporter.finish()
        return ctrl_c.report()
    finally:
        reporter.finish()
    return _print_outcome(task_id, result, client, args)


def _print_outcome(
    task_id: str, result: Result | None, client: Client, args: argparse.Namespace
) -> int:
    if result is None:
        status = client.status(task_id)
        print(json.dumps(status_json(status)) if args.json else describe_status(status))
        return EXIT_OK
    failed = result["state"] != "SUCCESS"
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    elif failed:
        error = result.get("error") or ResultError(code="model_error", message="")
        print(f"task {task_id} failed: {error['code']}: {error['message']}", file=sys.stderr)
    elif result.get("choices"):
        for choice in result.get("choices") or []:
            print(f"[choice {choice['index']}] {choice['text']}")
    else:
        print(result.get("text", ""))
    return EXIT_TASK_FAILED if failed else EXIT_OK


def _print_stream(
    client: Client, task_id: str, args: argparse.Namespace, reporter: WaitReporter
) -> int:
    """Text as it arrives (or NDJSON events with --json); exit code as for --wait."""
    if client.status(task_id).state == "PENDING":
        reporter.check_workers()
    if args.json:
        for event in client.stream_events(task_id):
            line = {"cursor": event.cursor, "kind": event.kind, "seq": event.seq}
            line.update({"text": event.text} if event.kind == "delta" else {"result": event.result})
            line.update(event.marks())
            print(json.dumps(line, ensure_ascii=False), flush=True)
            if event.failed:
                return EXIT_TASK_FAILED
        return EXIT_OK
    try:
        page: int | None = None
        choice: int | None = None
        for event in client.stream_events(task_id):
            raise_if_failed(event)
            if event.kind != "delta":
                continue
            if event.page is not None and event.page != page:
                # A document's pages arrive interleaved: say whose text follows.
                sys.stdout.write(("" if page is None else "\n") + f"[page {event.page}] ")
                page = event.page
            if event.choice is not None and event.choice != choice:
                # So do a task's choices (--n).
                sys.stdout.write(("" if choice is None else "\n") + f"[choice {event.choice}] ")
                choice = event.choice
            sys.stdout.write(event.text)
            sys.stdout.flush()
    except TaskFailed as failure:
        print(flush=True)
        error = failure.result.get("error", {})
        print(
            f"task {task_id} failed: {error.get('code')}: {error.get('message')}", file=sys.stderr
        )
        return EXIT_TASK_FAILED
    print(flush=True)
    return EXIT_OK


def _fail(code: int, message: str) -> int:
    warn(message)
    return code


_COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "submit": _submit,
    "status": _status,
    "result": _result,
    "cancel": _cancel,
}

if __name__ == "__main__":
    sys.exit(main())
