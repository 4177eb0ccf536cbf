"""Getting image bytes onto the worker: SSRF-guarded HTTP(S) fetches and local reads.

A URL in a task is attacker-chosen: anyone who can enqueue can make a worker issue a GET.
`fetch_image_bytes` keeps that GET on the public internet and bounded:

* the URL and every redirect hop pass `vision_queue.addresses.check_url` before any connection;
* each hop goes through `worker.outbound_http` (shared with webhooks): every address the
  host resolves to must be public, and the socket connects to the address that was checked
  (DNS rebinding: no second lookup ever happens);
* one deadline (VQ_FETCH_TIMEOUT_S) covers resolving, connecting, redirects and the body,
  enforced by a watchdog that shuts the socket, so a server dripping a byte a second is cut
  off on time; the body is capped at VQ_MAX_IMAGE_BYTES while it streams.

Outcomes: 4xx is permanent (408 and 429 are "try later" by definition, so transient);
5xx, refused or reset connections, timeouts and the deadline are transient; a refused
address, bad URL, too many redirects or failed certificate check is permanent. Query
strings may carry tokens, so only `ParsedUrl.redacted` is ever logged or put in a message.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
from pathlib import Path
from urllib.parse import urljoin

from vision_queue.addresses import ParsedUrl, check_url
from vision_queue.errors import ImageFetchFailed, ImageTooLarge, InvalidInput, VisionQueueError
from vision_queue.images import read_image_file
from vision_queue.settings import Settings
from worker.outbound_http import (
    Deadline,
    Resolver,
    default_ssl_context,
    pinned_connection,
    resolve_checked,
)

log = logging.getLogger(__name__)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_TRANSIENT_4XX = frozenset({408, 429})  # Request Timeout, Too Many Requests
_CHUNK_BYTES = 64 * 1024
_HEADERS = {
    "User-Agent": "vision-queue-worker/0.1",
    "Accept": "image/*, */*;q=0.1",
    # Compression bomb: ask for the bytes as stored; nothing here would inflate them anyway.
    "Accept-Encoding": "identity",
    "Connection": "close",
}


def fetch_image_bytes(
    url: str,
    settings: Settings,
    *,
    resolve: Resolver = socket.getaddrinfo,
    ssl_context: ssl.SSLContext | None = None,
    max_bytes: int | None = None,
) -> bytes:
    """GET an image over http(s) within the limits in `settings`; raise coded errors only.

    `resolve` replaces socket.getaddrinfo (tests inject names); `ssl_context` replaces the
    default verifying context (tests trust their own CA); `max_bytes` replaces
    VQ_MAX_IMAGE_BYTES (a document's cap is its own). Raises ImageFetchFailed
    (`transient` as described in the module docstring) or ImageTooLarge.
    """
    clock = Deadline(settings.fetch_timeout_s)
    allowlist = settings.private_host_allowlist
    context = ssl_context or default_ssl_context()
    hop = check_url(url, allowlist)
    cap = settings.max_image_bytes if max_bytes is None else max_bytes
    redirects = 0
    while True:
        addresses = resolve_checked(hop, resolve, clock)
        status, location, body = _get(hop, addresses, clock, cap, context)
        if status not in _REDIRECTS:
            log.debug("fetched %s: %d bytes, %d redirect(s)", hop.redacted, len(body), redirects)
            return body
        if redirects >= settings.fetch_max_redirects:
            raise ImageFetchFailed(
                f"{hop.redacted} redirects more than VQ_FETCH_MAX_REDIRECTS="
                f"{settings.fetch_max_redirects} times"
            )
        if not location:
            raise ImageFetchFailed(f"{hop.redacted} answered {status} without a Location")
        redirects += 1
        # Open redirect to an internal address: the next hop is checked like the first,
        # before anything connects to it.
        hop = check_url(urljoin(hop.url, location.strip()), allowlist)
        log.debug("redirect %d to %s", redirects, hop.redacted)


def read_local_image(path: str, settings: Settings) -> bytes:
    """Read an image file that lies under one of VQ_LOCAL_IMAGE_ROOTS, up to the byte cap.

    The path must be absolute; it is resolved (symlinks, `..`) before the containment
    check, so a link inside a root that points outside it is refused. A path that is not
    allowed (roots empty, relative, outside every root) is InvalidInput(field="images"):
    the request asks for something this deployment does not serve. A file that is allowed
    but missing or unreadable is a permanent ImageFetchFailed; too big is ImageTooLarge.
    """
    roots = [Path(root).resolve() for root in settings.image_roots]
    if not roots:
        raise InvalidInput(
            "local image paths are disabled (VQ_LOCAL_IMAGE_ROOTS is empty)", field="images"
        )
    if not isinstance(path, str) or "\x00" in path or not Path(path).is_absolute():
        raise InvalidInput("local image path must be an absolute path", field="images")
    # Path traversal: containment is judged on the fully resolved path, never the text.
    real = Path(path).resolve()
    if not any(real.is_relative_to(root) for root in roots):
        raise InvalidInput("local image path is outside VQ_LOCAL_IMAGE_ROOTS", field="images")
    try:
        # O_NOFOLLOW: a symlink swapped in after the check is not followed; O_NONBLOCK and
        # fstat (in read_image_file): a FIFO, device or socket under a root never blocks.
        return read_image_file(real, settings.max_image_bytes, nofollow=True, field="images")
    except OSError as exc:
        reason = exc.strerror or "unreadable"
        raise ImageFetchFailed(f"cannot read local image {real.name[:80]}: {reason}") from None


# Internals ------------------------------------------------------------------------------


def _get(
    hop: ParsedUrl, addresses: list[str], clock: Deadline, max_bytes: int, context: ssl.SSLContext
) -> tuple[int, str | None, bytes]:
    """One GET: (status, Location, b"") for a redirect, (200, None, body) for success."""
    with pinned_connection(hop, addresses, clock, context) as conn:
        try:
            conn.request("GET", hop.target, headers=_HEADERS)
            response = conn.getresponse()
            status = response.status
            if status in _REDIRECTS:
                return status, response.getheader("Location"), b""
            _raise_for_status(status, hop)
            if response.length is not None and response.length > max_bytes:
                # Refused before reading: the server says it is too big.
                raise ImageTooLarge(
                    f"image is {response.length} bytes, more than the limit of {max_bytes}"
                )
            body = _read_capped(response, max_bytes)
            if conn.aborted:
                raise clock.exceeded()  # the watchdog cut the body short
            if response.length:  # http.client counts Content-Length down to 0 when complete
                raise ImageFetchFailed(
                    f"{hop.redacted} closed before the body ended", transient=True
                )
            return status, None, body
        except VisionQueueError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            if conn.aborted or clock.nearly_over():
                raise clock.exceeded() from None
            raise _connection_error(exc, hop) from None


def _read_capped(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    body = bytearray()
    while True:
        # Endless body: never ask for more than one byte past the cap.
        chunk = response.read(min(_CHUNK_BYTES, max_bytes + 1 - len(body)))
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > max_bytes:
            raise ImageTooLarge(f"image is more than the limit of {max_bytes} bytes")


def _raise_for_status(status: int, hop: ParsedUrl) -> None:
    if status == 200:
        return
    where = f"{hop.redacted} answered HTTP {status}"
    if status >= 500 or status in _TRANSIENT_4XX:
        raise ImageFetchFailed(where, transient=True)
    raise ImageFetchFailed(where)


def _connection_error(exc: BaseException, hop: ParsedUrl) -> ImageFetchFailed:
    where = f"{hop.scheme}://{hop.netloc}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ImageFetchFailed(
            f"TLS certificate of {where} failed verification: {exc.verify_message}"
        )
    if isinstance(exc, (http.client.RemoteDisconnected, http.client.IncompleteRead)):
        return ImageFetchFailed(f"{where} closed the connection early", transient=True)
    if isinstance(exc, http.client.HTTPException):
        return ImageFetchFailed(f"{where} did not answer with valid HTTP ({type(exc).__name__})")
    if isinstance(exc, TimeoutError):
        return ImageFetchFailed(f"{where} timed out", transient=True)
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return ImageFetchFailed(f"cannot connect to {where}: {reason}", transient=True)
