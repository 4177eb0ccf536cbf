"""`worker`: run a GPU worker, answer one request without the queue, or check health.

worker run --model PATH_OR_ID [--device cuda:0] [--queues gpu] [--name NAME] [--max-batch N]
worker infer --model PATH_OR_ID --task describe --image photo.jpg [--json]
worker health --live | --ready [--name NAME | --health-file PATH]
worker dead-letters [--limit N]   # messages refused at the door: metadata, never bytes
worker settings            # every setting (secrets masked), who reads it, must it match
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import NoReturn

from vision_queue.cli_support import add_version_option, quiet_pipe
from vision_queue.setting_fields import readers_text, same_text
from vision_queue.settings import Settings, SettingsError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"worker: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="worker", description="Phi-3-vision GPU worker for vision-queue.")
    add_version_option(parser)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="load the model, then consume tasks from Redis")
    run.add_argument("--model", help="local folder or Hugging Face id (default VQ_MODEL)")
    run.add_argument("--device", help="cuda:N, cpu or auto (default VQ_DEVICE)")
    run.add_argument("--dtype", help="bfloat16, float16, float32 or auto (default VQ_DTYPE)")
    run.add_argument(
        "--queues", help="queue to consume, its three priority lists (default VQ_QUEUE)"
    )
    run.add_argument(
        "--name",
        help="worker node name (default VQ_WORKER_NAME, else gpu-<device>@host; a second "
        "worker on the same device and host is gpu-<device>-2@host)",
    )
    run.add_argument(
        "--health-file",
        help="heartbeat file (default VQ_HEALTH_FILE, else named after the worker in the "
        "temp dir); the log shows it",
    )
    run.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = off")
    run.add_argument(
        "--max-batch", type=int,
        help="requests run at once, decoded together (default VQ_MAX_BATCH: 1 on CPU, 16 on CUDA)",
    )

    infer = commands.add_parser(
        "infer", help="answer one request without the queue", add_help=False
    )
    infer.add_argument("rest", nargs=argparse.REMAINDER)

    health = commands.add_parser("health", help="exit 0 if the worker is live / ready")
    mode = health.add_mutually_exclusive_group(required=True)
    mode.add_argument("--live", action="store_true", help="process and heartbeat running")
    mode.add_argument("--ready", action="store_true", help="live, model loaded, broker reachable")
    which = health.add_mutually_exclusive_group()
    which.add_argument(
        "--name", help="worker node name (default: every worker running on this host)"
    )
    which.add_argument("--health-file", help="the heartbeat file `worker run` logged")

    dead = commands.add_parser(
        "dead-letters", help="list messages the workers refused (metadata only, newest first)"
    )
    dead.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")

    commands.add_parser(
        "settings",
        help="print every setting as THIS shell's environment gives it (secrets masked, "
        "unset = default), the processes that read it and whether every host must give it "
        "the same value; not a running worker's values (run it in that worker's container)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return quiet_pipe(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
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
        settings = Settings.from_env(None, reader="worker", **_overrides(args))
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
    _print_settings(settings)
    return 0


def _print_settings(settings: Settings) -> None:
    """Every setting as NAME=value (secrets masked), after the processes that read it and
    whether every host must give it the same value (docs/settings.md: the same columns).

    The values are this process's environment's: a running worker may have been started
    with others, so the first line (a `#` comment) says where they come from."""
    environ = os.environ
    names = [f.metadata["env"] for f in fields(settings)]
    set_here = sum(1 for name in names if name in environ)
    print(
        f"# the values of this shell's environment ({set_here} of {len(names)} set, the rest "
        "at their defaults), not those of a running worker; for a worker's own, run this "
        "where it runs (docker compose exec worker-0 worker settings)"
    )
    masked = settings.masked()
    rows = [("read by", "same", "setting")]
    for f in fields(settings):
        env = f.metadata["env"]
        rows.append((readers_text(f), same_text(f), f"{env}={masked[env]}"))
    width = max(len(readers) for readers, _, _ in rows)
    for readers, same, text in rows:
        print(f"{readers:<{width}}  {same:<4}  {text}")


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
        "health_file": getattr(args, "health_file", None),
        "metrics_port": getattr(args, "metrics_port", None),
        "max_batch": getattr(args, "max_batch", None),
    }
    return {key: value for key, value in pairs.items() if value is not None}


def _health(settings: Settings, args: argparse.Namespace) -> int:
    """Check the worker named (--name, --health-file or their settings), else every worker
    running on this host: one line each, exit 0 only if all pass."""
    from worker.health import (
        check_live,
        check_ready,
        health_file_path,
        pointed_health_files,
        read_health,
    )
    from worker.identity import health_dir, running_health_files

    if settings.worker_name or settings.health_file:
        paths = [health_file_path(settings, settings.worker_name)]
    else:
        # Workers with the default heartbeat file, and those pointing to theirs elsewhere.
        paths = list(dict.fromkeys([*running_health_files(), *pointed_health_files()]))
        if not paths:
            print(
                f"no worker running on this host (no live heartbeat file in {health_dir()}); "
                "start one with `worker run`, or pass --name / --health-file",
                file=sys.stderr,
            )
            return 1
    failed = 0
    for path in paths:
        if args.live:
            ok, reason = check_live(path, settings.heartbeat_interval_s)
        else:
            ok, reason = check_ready(path, settings)
        worker = (read_health(path) or {}).get("worker") or path
        who = f"{worker}: " if len(paths) > 1 else ""
        print(who + reason, file=sys.stdout if ok else sys.stderr)
        failed += not ok
    return 1 if failed else 0


def _dead_letters(settings: Settings, limit: int) -> int:
    import time

    import redis

    from vision_queue.outages import broker_error
    from vision_queue.protocol import DEAD_LETTER_KEY
    from vision_queue.redis_connect import redis_client
    from worker.broker.dead_letters import read_dead_letters

    try:
        entries = read_dead_letters(redis_client(settings), limit)
    except redis.RedisError as exc:
        # The producer's wording: a refused password names the setting to fix.
        print(f"worker: {broker_error(settings, settings.effective_broker_url, exc)}",
              file=sys.stderr)
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
