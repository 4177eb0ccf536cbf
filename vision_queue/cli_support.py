"""What both command lines (`producer`, `worker`) share: `--version`, quiet pipes, Ctrl+C.

A command whose reader goes away (`producer result ID | head -1`, `worker settings | head`)
ends the way a shell tool killed by SIGPIPE does: silently, exit status 141, no traceback
and no "Exception ignored" line when the interpreter flushes stdout on its way out.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from types import FrameType
from typing import Any

DISTRIBUTION = "vision-queue"
# What a shell reports for a process killed by SIGPIPE (128 + 13).
EXIT_CLOSED_PIPE = 141


def package_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def add_version_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--version",
        action="version",
        version=f"{parser.prog} ({DISTRIBUTION}) {package_version()}",
        help="print the version and exit",
    )


def quiet_pipe(run: Callable[[], int]) -> int:
    """`run()`'s exit status, or EXIT_CLOSED_PIPE without a word once stdout's reader is gone."""
    try:
        code = run()
        sys.stdout.flush()  # inside the guard: a late failure is a closed pipe too
        return code
    except SystemExit as exc:  # argparse's --help/--version/usage errors end here
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
            return EXIT_CLOSED_PIPE
        raise exc
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_CLOSED_PIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (stdout replaced in-process)
        pass


class CtrlC:
    """Ctrl+C during a wait ends the command, whatever Python does with the interrupt.

    The first SIGINT raises KeyboardInterrupt as Python's own handler does, for the caller's
    clean exit through `report`. Python ignores (after printing) a KeyboardInterrupt that
    lands inside a finalizer, such as a Redis pipeline's `__del__`, and the wait would then
    go on forever; so if the command still runs `grace_s` after the first SIGINT, or at a
    second one, it reports and exits at once.
    """

    def __init__(self, message: str, code: int, grace_s: float = 5.0) -> None:
        self.message, self.code, self.grace_s = message, code, grace_s
        self._reported = threading.Lock()
        self._interrupted = False
        self._previous: Any = None

    def __enter__(self) -> CtrlC:
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is None:  # interrupted: stay, so a second Ctrl+C during cleanup ends it now
            signal.signal(signal.SIGINT, self._previous)

    def report(self) -> int:
        """Say it once (the caller's clean exit and the fallback never both do)."""
        if self._reported.acquire(blocking=False):
            print(f"producer: {self.message}", file=sys.stderr, flush=True)
        return self.code

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._interrupted:
            self._exit_now()
        self._interrupted = True
        fallback = threading.Timer(self.grace_s, self._exit_now)
        fallback.daemon = True
        fallback.start()
        raise KeyboardInterrupt

    def _exit_now(self) -> None:
        self.report()
        os._exit(self.code)
