"""Launches that stay in flight on the CPU, as on a GPU: the scheduler must wait for them.

On the CPU a runner's launch is done when it returns, so the scheduler reads each step's
tokens before it builds the next; wrapped here, a launch never says it is done and is
read only when the scheduler must wait for it, so the steps after a row's first are fed
tokens only the runner's device tensor holds (`UNKNOWN_TOKEN`), as with a GPU's queue.
"""

from __future__ import annotations

from typing import Any


class Unread:
    """A launch's tokens that never say they are done."""

    def __init__(self, tokens: Any) -> None:
        self._tokens = tokens

    def ready(self) -> bool:
        return False

    def tokens(self) -> list[int]:
        return list(self._tokens.tokens())

    def logprobs(self) -> list[Any]:
        return list(self._tokens.logprobs())


def keep_in_flight(runner: Any) -> None:
    for name in ("launch_decode", "launch_first_token"):
        launch = getattr(runner, name)
        setattr(runner, name, lambda *args, _launch=launch: Unread(_launch(*args)))
