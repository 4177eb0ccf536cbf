"""`producer`: submit vision jobs and follow them from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from producer.client import Client, TaskStatus
from producer.contract import Priority, TaskName
from producer.errors import (
    BrokerUnavailable,
    TaskFailed,
    UnknownTaskId,
    VisionQueueError,
    WaitTimeout,
)
from producer.settings import SettingsError

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_WAIT_TIMEOUT = 4

_EPILOG = """\
exit codes:
  0  success
  1  the task failed (its error code and message are printed)
  2  usage error or invalid input (nothing was queued)
  3  Redis unusable: unreachable (after a short bounded retry), refusing the
     password (fix REDIS_URL), or out of memory
  4  timed out waiting for the result

environment: REDIS_URL (or VQ_BROKER_URL / VQ_RESULT_BACKEND_URL), VQ_QUEUE, ...
(see docs/settings.md for every setting)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"producer: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="producer",
        description="Queue Phi-3-vision jobs and read their results.",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    submit = commands.add_parser(
        "submit", help="queue a job", epilog=_EPILOG, formatter_class=formatter
    )
    submit.add_argument("--task", required=True, choices=[t.value for t in TaskName])
    submit.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH_OR_URL",
        help="image file or http(s) URL; repeat for several images",
    )
    submit.add_argument("--prompt", help="your question (the ask task only)")
    submit.add_argument("--max-new-tokens", type=int, help="generation budget (capped per task)")
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
        "--priority",
        choices=[p.value for p in Priority],
        default=Priority.NORMAL.value,
        help="high tasks run before normal (default) before low",
    )
    _add_wait_options(submit)

    status = commands.add_parser(
        "status", help="show a task's state", epilog=_EPILOG, formatter_class=formatter
    )
    status.add_argument("id")
    status.add_argument("--json", action="store_true", help="print one JSON object")

    result = commands.add_parser(
        "result", help="print a task's result", epilog=_EPILOG, formatter_class=formatter
    )
    result.add_argument("id")
    _add_wait_options(result)

    cancel = commands.add_parser(
        "cancel", help="cancel a queued or running task", epilog=_EPILOG, formatter_class=formatter
    )
    cancel.add_argument("id")

    serve = commands.add_parser(
        "serve",
        help="run the HTTP gateway (OpenAI-compatible and task APIs)",
        description="Serve the HTTP gateway; needs the `gateway` extra "
        "(pip install 'vision-queue[gateway]'). API keys: VQ_API_KEYS.",
        epilog=_EPILOG,
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
        "--timeout", type=float, metavar="S", help="give up waiting after S seconds"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    except BrokerUnavailable as exc:
        return _fail(EXIT_UNREACHABLE, str(exc))
    except UnknownTaskId as exc:
        return _fail(EXIT_USAGE, str(exc))
    except WaitTimeout as exc:
        return _fail(EXIT_WAIT_TIMEOUT, str(exc))
    except KeyboardInterrupt:
        return _fail(130, "interrupted (the task keeps running; `producer cancel ID` stops it)")


def _submit(client: Client, args: argparse.Namespace) -> int:
    handle = client.submit(
        args.task,
        args.image,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        num_crops=args.num_crops,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        priority=args.priority,
    )
    if not (args.wait or args.stream):
        print(json.dumps({"id": handle.id}) if args.json else handle.id)
        return EXIT_OK
    return _print_result(client, handle.id, args)


def _status(client: Client, args: argparse.Namespace) -> int:
    status = client.status(args.id)
    if args.json:
        print(
            json.dumps(
                {
                    "id": status.id,
                    "state": status.state,
                    "tokens": status.tokens,
                    "worker": status.worker,
                }
            )
        )
    else:
        print(_describe(status))
    return EXIT_OK


def _result(client: Client, args: argparse.Namespace) -> int:
    return _print_result(client, args.id, args)


def _cancel(client: Client, args: argparse.Namespace) -> int:
    client.cancel(args.id)
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
    if args.stream:
        return _print_stream(client, task_id, args)
    progress = _Progress(enabled=args.wait and sys.stderr.isatty())
    result = client.result(task_id, wait=args.wait, timeout=args.timeout, on_status=progress)
    progress.finish()
    if result is None:
        status = client.status(task_id)
        print(
            json.dumps({"id": task_id, "state": status.state}) if args.json else _describe(status)
        )
        return EXIT_OK
    failed = result["state"] != "SUCCESS"
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    elif failed:
        error = result.get("error", {})
        print(
            f"task {task_id} failed: {error.get('code')}: {error.get('message')}", file=sys.stderr
        )
    else:
        print(result.get("text", ""))
    return EXIT_TASK_FAILED if failed else EXIT_OK


def _print_stream(client: Client, task_id: str, args: argparse.Namespace) -> int:
    """Text as it arrives (or NDJSON events with --json); exit code as for --wait."""
    if args.json:
        for event in client.stream_events(task_id):
            line = {"cursor": event.cursor, "kind": event.kind, "seq": event.seq}
            line.update({"text": event.text} if event.kind == "delta" else {"result": event.result})
            print(json.dumps(line, ensure_ascii=False), flush=True)
            if event.failed:
                return EXIT_TASK_FAILED
        return EXIT_OK
    try:
        for text in client.stream(task_id):
            sys.stdout.write(text)
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


class _Progress:
    """One rewritten status line on a terminal: queued, running (tokens so far), done."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = ""

    def __call__(self, status: TaskStatus) -> None:
        if not self.enabled:
            return
        line = _describe(status)
        if line != self._last:
            sys.stderr.write("\r\x1b[2K" + line)
            sys.stderr.flush()
            self._last = line

    def finish(self) -> None:
        if self.enabled and self._last:
            sys.stderr.write("\n")


def _describe(status: TaskStatus) -> str:
    if status.state in ("PENDING", "RECEIVED"):
        return f"{status.id}: queued"
    if status.state in ("STARTED", "PROGRESS"):
        where = f" on {status.worker}" if status.worker else ""
        return f"{status.id}: running{where}, {status.tokens} tokens so far"
    if status.state == "RETRY":
        return f"{status.id}: waiting to retry"
    return f"{status.id}: done ({status.state})"


def _fail(code: int, message: str) -> int:
    print(f"producer: {message}", file=sys.stderr)
    return code


_COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "submit": _submit,
    "status": _status,
    "result": _result,
    "cancel": _cancel,
}

if __name__ == "__main__":
    sys.exit(main())
