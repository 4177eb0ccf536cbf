"""Names resolved at submission: a host that resolves to a non-public address is refused
before anything is queued, for images and callbacks alike, on every route.

`check_url` (run when the request is read) refuses IP literals and local names; this adds
what only a lookup shows: `images.example` resolving to 10.0.0.5 or 169.254.169.254. The
verdict is `vision_queue.addresses.check_resolved`, the rule the worker applies to the
addresses it connects to. A lookup that fails or takes longer than `LOOKUP_TIMEOUT_S` is
left to the worker (it resolves again, and refuses or retries): DNS trouble now is not
the caller's mistake. Allow-listed hosts are not looked up.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

from vision_queue.addresses import ParsedUrl, check_resolved, check_url
from vision_queue.errors import ImageFetchFailed, InvalidInput
from vision_queue.schemas import ImageRef, ImageSource

LOOKUP_TIMEOUT_S = 2.0


async def lookup(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to; [] when the lookup fails or times out."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), LOOKUP_TIMEOUT_S
        )
    except (OSError, asyncio.TimeoutError, UnicodeError):
        return []
    return [str(info[4][0]) for info in infos]


async def _check(parsed: ParsedUrl, what: str) -> None:
    if parsed.allowlisted or parsed.ip is not None:
        return
    check_resolved(parsed, await lookup(parsed.host, parsed.port), what)


async def check_names(
    images: Sequence[ImageRef | bytes],
    image_allowlist: frozenset[str],
    callback_url: str | None,
    callback_allowlist: frozenset[str],
    document_url: str | None = None,
) -> None:
    """Resolve every image URL, the document's URL and the callback; refuse naming the
    field (`images[i]`, `document`, `callback_url`)."""
    if document_url is not None:
        try:
            await _check(check_url(document_url, image_allowlist), "document URL")
        except ImageFetchFailed as exc:
            exc.field = "document"
            raise
    for index, image in enumerate(images):
        if isinstance(image, ImageRef) and image.source is ImageSource.URL:
            try:
                await _check(check_url(image.ref, image_allowlist), "image URL")
            except ImageFetchFailed as exc:
                exc.field = f"images[{index}]"
                raise
    if callback_url is not None:
        try:
            await _check(check_url(callback_url, callback_allowlist), "callback URL")
        except ImageFetchFailed as exc:
            reason = exc.message.replace("image URL", "callback URL")
            raise InvalidInput(reason, field="callback_url") from None
