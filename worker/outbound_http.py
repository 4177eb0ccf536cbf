"""One guarded outbound HTTP(S) connection to an attacker-chosen URL: image fetches
(`worker.fetch`) and webhook deliveries (`worker.delivery.webhooks`) both go through it.

A URL in a task is attacker-chosen, so a connection made for it must stay on the public
internet and be bounded in time. The caller has already passed the URL (and each redirect
hop) through `vision_queue.addresses.check_url`; here:

* the host is resolved once and refused if ANY address it resolves to is not public (an
  attacker's DNS may return one public and one internal record), unless the host is
  allow-listed;
* the socket connects to an address that was checked, while the Host header, TLS SNI and
  certificate check still use the name (DNS rebinding: no second lookup ever happens);
* one `Deadline` covers resolving, connecting and everything read after, enforced by a
  watchdog that shuts the socket, so a server dripping a byte a second is cut off on time;
* standard library only, and no proxy from the environment (http.client reads none).

Errors raised here are ImageFetchFailed, image fetching being where the guard began;
webhooks look only at the error's type and `transient`.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from vision_queue.addresses import ParsedUrl, is_public_address
from vision_queue.errors import ImageFetchFailed

log = logging.getLogger(__name__)

# socket.getaddrinfo's shape: called as resolve(host, port, type=SOCK_STREAM).
Resolver = Callable[..., Sequence[tuple[Any, ...]]]


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left, > 0; raises the transient deadline error once none are."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise self.exceeded()
        return left

    def nearly_over(self) -> bool:
        # A socket timeout set to the remaining time may fire a hair before the watchdog.
        return self._end - time.monotonic() < 0.05

    def exceeded(self) -> ImageFetchFailed:
        return ImageFetchFailed(
            f"image fetch took longer than VQ_FETCH_TIMEOUT_S={self.seconds:g}s", transient=True
        )


@functools.lru_cache(maxsize=1)
def default_ssl_context() -> ssl.SSLContext:
    # Certificate and host name verification on, system CAs, TLS 1.2 at least.
    return ssl.create_default_context()


def resolve_checked(hop: ParsedUrl, resolve: Resolver, clock: Deadline) -> list[str]:
    """Resolve once and return the addresses to connect to, all of them checked."""
    if hop.ip is not None:
        return [str(hop.ip)]  # literal: already checked by check_url, nothing to resolve
    try:
        infos = _before_deadline(
            lambda: resolve(hop.host, hop.port, type=socket.SOCK_STREAM), clock
        )
    except socket.gaierror as exc:
        transient = exc.errno not in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None))
        raise ImageFetchFailed(
            f"cannot resolve {hop.host}: {exc.strerror}", transient=transient
        ) from None
    except OSError as exc:
        raise ImageFetchFailed(f"cannot resolve {hop.host}: {exc}", transient=True) from None
    addresses: list[str] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        text = str(sockaddr[0])
        if text not in addresses:
            addresses.append(text)
    if not addresses:
        raise ImageFetchFailed(f"{hop.host} has no IPv4 or IPv6 address", transient=True)
    if not hop.allowlisted:
        for text in addresses:
            # One internal record among public ones is enough to refuse: the connection
            # could go to any of them, and the attacker chooses the DNS answer.
            if not _is_public_text(text):
                log.info("refused %s: resolves to non-public %s", hop.redacted, text)
                raise ImageFetchFailed(
                    f"image URL host {hop.host} resolves to a non-public address ({text})"
                )
    return addresses


def _is_public_text(text: str) -> bool:
    try:
        return is_public_address(ipaddress.ip_address(text))
    except ValueError:
        return False


def _before_deadline(
    call: Callable[[], Sequence[tuple[Any, ...]]], clock: Deadline
) -> Sequence[tuple[Any, ...]]:
    """Run a blocking lookup in a daemon thread so the deadline also bounds DNS."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed back to the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="vq-resolve", daemon=True)
    thread.start()
    thread.join(clock.remaining())
    if not outcome:
        raise clock.exceeded()
    ok, value = outcome[0]
    if not ok:
        raise value
    result: Sequence[tuple[Any, ...]] = value
    return result


class PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) for a host name over a socket connected to an already-checked address."""

    def __init__(
        self, hop: ParsedUrl, addresses: list[str], clock: Deadline, context: ssl.SSLContext
    ) -> None:
        super().__init__(hop.host, hop.port, timeout=clock.remaining())
        self.default_port = 443 if hop.scheme == "https" else 80  # Host header omits it
        self._hop = hop
        self._addresses = addresses
        self._clock = clock
        self._context = context
        self.aborted = False
        # The connected socket, kept here as well: http.client drops `self.sock` once the
        # headers of an answer that closes the connection (HTTP/1.0, `Connection: close`)
        # are read, while the body is still read from it. Without this reference the
        # watchdog would find nothing to shut, and a server dripping that body a byte at a
        # time would hold the fetch until the body ends instead of VQ_FETCH_TIMEOUT_S.
        self._socket: socket.socket | None = None

    def connect(self) -> None:
        error: OSError | None = None
        for address in self._addresses:
            try:
                # DNS rebinding: connect to the address that was checked, not the name.
                sock = socket.create_connection((address, self.port), self._clock.remaining())
            except OSError as exc:
                error = exc
                continue
            break
        else:
            raise error or OSError("no address to connect to")
        self.sock = self._socket = sock
        if self.aborted:
            raise self._clock.exceeded()
        if self._hop.scheme == "https":
            sock.settimeout(self._clock.remaining())
            # SNI and certificate verification for the name the user gave. The TLS socket
            # takes the descriptor over: it is the one to shut from now on.
            self.sock = self._socket = self._context.wrap_socket(
                sock, server_hostname=self._hop.host
            )

    def abort(self) -> None:
        """Watchdog: shut the socket so a blocked read returns now (slow-drip servers)."""
        self.aborted = True
        sock = self.sock or self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                # The plain socket method: SSLSocket.shutdown would unwrap TLS first.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


@contextlib.contextmanager
def pinned_connection(
    hop: ParsedUrl, addresses: list[str], clock: Deadline, context: ssl.SSLContext
) -> Iterator[PinnedConnection]:
    """A `PinnedConnection` aborted by a watchdog when `clock` runs out; closed on exit."""
    conn = PinnedConnection(hop, addresses, clock, context)
    watchdog = threading.Timer(clock.remaining(), conn.abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield conn
    finally:
        watchdog.cancel()
        conn.close()
