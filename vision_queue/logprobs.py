"""Log probabilities of generated tokens, in OpenAI's shape, checked the same on both sides.

A task asks with `options.logprobs: true` and `options.top_logprobs` (0..20 alternatives
per token; left out: 0). Its result then carries `logprobs`: one entry per generated token
(end tokens excepted), each `{"token", "logprob", "bytes", "top_logprobs": [{"token",
"logprob", "bytes"}, ...]}` exactly as `choices[i].logprobs.content` of OpenAI's chat
completion, so the gateway passes the list through unchanged.

What the numbers are (docs/model.md): the log-softmax of the model's logits for that
position at temperature 1, over the tokens the request allows (a response_format's mask
applied), computed on the device from the logits the token was chosen from. Under greedy
decoding the chosen token is therefore the first alternative; a sampled one may not be.
"""

from __future__ import annotations

from typing import Any, TypedDict

from vision_queue.errors import InvalidInput

MAX_TOP_LOGPROBS = 20


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


def check_logprobs_options(logprobs: Any, top_logprobs: Any) -> None:
    """`logprobs` a boolean; `top_logprobs` an integer 0..20, and only with `logprobs`."""
    if not isinstance(logprobs, bool):
        raise InvalidInput("logprobs must be true or false", field="logprobs")
    if top_logprobs is None:
        return
    if not isinstance(top_logprobs, int) or isinstance(top_logprobs, bool):
        raise InvalidInput("top_logprobs must be an integer", field="top_logprobs")
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidInput(
            f"top_logprobs must be from 0 to {MAX_TOP_LOGPROBS}", field="top_logprobs"
        )
    if not logprobs:
        raise InvalidInput("top_logprobs needs logprobs set to true", field="top_logprobs")


def top_count(logprobs: bool, top_logprobs: int | None) -> int | None:
    """Alternatives per token a task asked for; None when it asked for no logprobs."""
    return (top_logprobs or 0) if logprobs else None


def entry(text: str, data: bytes, logprob: float, top: list[TopLogprob]) -> TokenLogprob:
    return TokenLogprob(token=text, logprob=logprob, bytes=list(data), top_logprobs=top)


def alternative(text: str, data: bytes, logprob: float) -> TopLogprob:
    return TopLogprob(token=text, logprob=logprob, bytes=list(data))
