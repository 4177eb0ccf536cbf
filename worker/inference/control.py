"""How the caller of one generation steers it and watches it: one object per run.

The engine calls these methods on the request's own thread (never the device thread),
so a slow or raising method delays or stops only its own request. What a method raises
(Cancelled, TaskTimeout, a lost lease...) ends the run at once, the request leaves the
batch, and the exception reaches the caller of `Engine.generate` unchanged.

This base class is a run nobody watches: it runs to its end and reports nothing. A
caller overrides what it needs (the worker's is `worker.handler.TaskControl`).
"""

from __future__ import annotations

from vision_queue.logprobs import TokenLogprob


class RunControl:
    def on_prompt(self, tokens: int) -> None:
        """The prompt's token count (text and images), once encoded, before any token.

        Told first, so a run stopped before its first token still knows its usage.
        """

    def on_text(self, piece: str) -> None:
        """New text as soon as it is final: whole characters, never part of a stop string.

        The pieces joined are exactly the result's text.
        """

    def on_logprobs(self, entry: TokenLogprob) -> None:
        """A generated token's logprobs (a run that asked for them), before its text."""

    def on_token(self, count: int) -> None:
        """After every generated token (`count` so far) that a stop string did not end.

        Raise to stop between tokens.
        """

    def check(self) -> None:
        """About every 0.1 s while no token arrives (waiting for a batch row, the image
        tower, a long prompt). Raise to abandon the run while it waits."""

    def choice(self, index: int) -> RunControl:
        """The control of choice `index` of a run with several (`n` above 1), asked once
        per choice before its events are read: told that choice's text and logprobs.

        Choice 0's steers the run as this one does (checks, token counts); the others' are
        told their own text only (their cancel is the run's: `check` on choice 0's). This
        base class hands choice 0 itself and the others a run nobody watches.
        """
        return self if index == 0 else RunControl()
