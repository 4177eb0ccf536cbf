"""`worker`: run a GPU worker, answer one request without the queue, or check health.

worker run --model PATH_OR_ID [--device cuda:0] [--queues gpu] [--name NAME]
worker infer --model PATH_OR_ID --task describe --image photo.jpg [--json]
worker health --live | --ready [--name NAME]
worker dead-letters [--limit N]   # messages refused at the door: metadata, never bytes
worker settings            # every setting, secrets masked
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from producer.settings import Settings, SettingsError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"worker: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="worker", description="Phi-3-vision GPU worker for vision-queue.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="load the model, then consume tasks from Redis")
    run.add_argument("--model", help="local folder or Hugging Face id (default VQ_MODEL)")
    run.add_argument("--device", help="cuda:N, cpu or auto (default VQ_DEVICE)")
    run.add_argument("--dtype", help="bfloat16, float16, float32 or auto (default VQ_DTYPE)")
    run.add_argument(
        "--queues", help="queue to consume, its three priority lists (default VQ_QUEUE)"
    )
    run.add_argument(
        "--name", help="worker node name (default VQ_WORKER_NAME or gpu-<device>@host)"
    )
    run.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = off")

    infer = commands.add_parser(
        "infer", help="answer one request without the queue", add_help=False
    )
    infer.add_argument("rest", nargs=argparse.REMAINDER)

    health = commands.add_parser("health", help="exit 0 if the worker is live / ready")
    mode = health.add_mutually_exclusive_group(required=True)
    mode.add_argument("--live", action="store_true", help="process and heartbeat running")
    mode.add_argument("--ready", action="store_true", help="live, model loaded, broker reachable")
    health.add_argument("--name", help="worker node name (when several share a host)")

    dead = commands.add_parser(
        "dead-letters", help="list messages the workers refused (metadata only, newest first)"
    )
    dead.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")

    commands.add_parser("settings", help="print every setting (secrets masked)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["infer"]:
        # The one-shot command parses its own options (shared with `python -m worker.infer_cli`).
        from worker.infer_cli import infer_main, run_program

        if as_program:
            run_program(argv[1:])  # exits without interpreter teardown (see worker.infer_cli)
        return infer_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env(None, **_overrides(args))
    except SettingsError as exc:
        print(f"worker: invalid settings: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if args.command == "run":
        _pause_collector_until_consuming()
        from worker.runner import configure_logging, run_worker

        configure_logging(settings.log_level)
        return run_worker(settings)
    if args.command == "health":
        return _health(settings, args)
    if args.command == "dead-letters":
        return _dead_letters(settings, args.limit)
    for name, value in settings.masked().items():
        print(f"{name}={value}")
    return 0


def _pause_collector_until_consuming() -> None:
    """No cyclic garbage collection while torch, the model and Celery load.

    Startup allocates the long-lived heap (modules, the model's Python objects); the
    collector would rescan it again and again as it grows. Once the consumer is up, that
    heap is moved out of the collector's sight (`gc.freeze`) and collection resumes for
    what tasks allocate.
    """
    import gc

    from celery.signals import worker_ready

    def resume(**_: object) -> None:
        gc.freeze()
        gc.enable()

    gc.disable()
    worker_ready.connect(resume, weak=False)


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    pairs = {
        "model": getattr(args, "model", None),
        "device": getattr(args, "device", None),
        "dtype": getattr(args, "dtype", None),
        "queue": getattr(args, "queues", None),
        "worker_name": getattr(args, "name", None),
        "metrics_port": getattr(args, "metrics_port", None),
    }
    return {key: value for key, value in pairs.items() if value is not None}


def _health(settings: Settings, args: argparse.Namespace) -> int:
    from worker.health import check_live, check_ready, default_worker_name, health_file_path

    name = settings.worker_name or default_worker_name(settings.device)
    path = health_file_path(settings, name)
    if args.live:
        ok, reason = check_live(path, settings.heartbeat_interval_s)
    else:
        ok, reason = check_ready(path, settings)
    print(reason, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _dead_letters(settings: Settings, limit: int) -> int:
    import time

    import redis

    from producer.contract import DEAD_LETTER_KEY
    from producer.redis_connect import redis_client
    from producer.settings import mask_url
    from worker.dead_letters import read_dead_letters

    try:
        entries = read_dead_letters(redis_client(settings), limit)
    except redis.RedisError as exc:
        url = mask_url(settings.effective_broker_url)
        print(f"worker: Redis at {url} is unreachable: {type(exc).__name__}", file=sys.stderr)
        return 3
    for entry in entries:
        at = entry.get("at")
        when = (
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
            if isinstance(at, (int, float))
            else "?"
        )
        print(
            f"{when} worker={entry.get('worker')} queue={entry.get('queue')} "
            f"code={entry.get('code')} id={entry.get('task_id') or '-'} "
            f"task={entry.get('task') or '-'} size={entry.get('size')} "
            f"content_type={entry.get('content_type')!r}: {entry.get('reason')}"
        )
    noun = "entry" if len(entries) == 1 else "entries"
    print(f"{len(entries)} {noun} (newest first) in {DEAD_LETTER_KEY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
