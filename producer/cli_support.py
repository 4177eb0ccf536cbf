"""What both command lines (`producer`, `worker`) share: `--version` and quiet pipes.

A command whose reader goes away (`producer result ID | head -1`, `worker settings | head`)
ends the way a shell tool killed by SIGPIPE does: silently, exit status 141, no traceback
and no "Exception ignored" line when the interpreter flushes stdout on its way out.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

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
