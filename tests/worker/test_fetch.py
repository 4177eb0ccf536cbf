"""Fetching image URLs on the worker: SSRF refusals, limits, outcomes; reading local files.

Network rule: these tests only ever connect to loopback. An autouse guard replaces
socket.create_connection and refuses (without connecting) anything else, recording every
attempt so that tests can assert no connection was even tried. Names other than localhost
are never resolved for real: tests inject a resolver.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vision_queue.errors import ErrorCode, ImageFetchFailed, ImageTooLarge, InvalidInput
from vision_queue.settings import Settings
from worker.fetch import fetch_image_bytes, read_local_image


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = png_bytes()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# VQ_ALLOWED_PRIVATE_HOSTS entries name a port: the test servers listen on these two.
LOOPBACK_PORT = _free_port()
TLS_PORT = _free_port()
LOOPBACK_ALLOWED = f"127.0.0.1:{LOOPBACK_PORT},localhost:{LOOPBACK_PORT}"


def loopback_settings(**overrides: Any) -> Settings:
    """Settings that explicitly allow loopback, as a private deployment would its own hosts."""
    values: dict[str, Any] = {"allowed_private_hosts": LOOPBACK_ALLOWED, "fetch_timeout_s": 5.0}
    values.update(overrides)
    return Settings(**values)


# The network guard -------------------------------------------------------------------------


@dataclass
class Connections:
    attempts: list[tuple[str, int]] = field(default_factory=list)

    @property
    def non_loopback(self) -> list[tuple[str, int]]:
        return [a for a in self.attempts if not _is_loopback(a[0])]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a name: the fetcher must only ever connect to checked addresses


@pytest.fixture(autouse=True)
def connections(monkeypatch: pytest.MonkeyPatch) -> Connections:
    seen = Connections()
    real = socket.create_connection

    def guarded(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        seen.attempts.append((str(address[0]), int(address[1])))
        if not _is_loopback(str(address[0])):
            raise ConnectionRefusedError(f"test network guard: no connection to {address}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    return seen


# A local HTTP server ---------------------------------------------------------------------

Handler = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Seen:
    path: str
    host: str | None


@dataclass
class LocalServer:
    port: int
    routes: dict[str, Handler]
    requests: list[Seen] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)
    scheme: str = "http"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


@contextlib.contextmanager
def serve(routes: dict[str, Handler], tls: ssl.SSLContext | None = None) -> Iterator[LocalServer]:
    state = LocalServer(0, routes, scheme="https" if tls else "http")

    class RequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            state.requests.append(Seen(self.path, self.headers.get("Host")))
            route = state.routes.get(self.path.split("?", 1)[0], respond(404, b"not found"))
            with contextlib.suppress(OSError):  # the client may hang up: that is the point
                route(self)

        def log_message(self, *args: Any) -> None:
            pass

    port = TLS_PORT if tls is not None else LOOPBACK_PORT
    server = ThreadingHTTPServer(("127.0.0.1", port), RequestHandler)
    server.daemon_threads = True
    if tls is not None:
        tls.sni_callback = lambda sock, name, ctx: state.sni.append(name)
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with serve({}) as state:
        yield state


def respond(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Handler:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(body)

    return handle


def redirect(location: str, status: int = 302) -> Handler:
    return respond(status, b"", {"Location": location})


def drip(
    interval_s: float = 0.05, total: int = 10_000, headers: dict[str, str] | None = None
) -> Handler:
    """A slow-loris body: one byte every `interval_s`, for far longer than any deadline."""

    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(total))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        for _ in range(total):
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(interval_s)

    return handle


def drip_headers(interval_s: float = 0.05) -> Handler:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(2000):
            h.wfile.write(b"X-Slow: y\r\n")
            h.wfile.flush()
            time.sleep(interval_s)

    return handle


def endless(stop_after_s: float = 10.0) -> Handler:
    """No Content-Length, and a body that never ends."""

    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        chunk = b"\0" * 65536
        end = time.monotonic() + stop_after_s
        while time.monotonic() < end:
            h.wfile.write(chunk)

    return handle


def refuse(url: str, settings: Settings | None = None, **kwargs: Any) -> ImageFetchFailed:
    with pytest.raises(ImageFetchFailed) as caught:
        fetch_image_bytes(url, settings or Settings(), **kwargs)
    return caught.value


def resolver(answers: dict[str, list[str]], calls: list[str] | None = None) -> Any:
    """A getaddrinfo stand-in: host -> addresses, recording each lookup."""

    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if calls is not None:
            calls.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out: list[tuple[Any, ...]] = []
        for address in answers[host]:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sockaddr = (address, port, 0, 0) if family == socket.AF_INET6 else (address, port)
            out.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
        return out

    return resolve


# Success ----------------------------------------------------------------------------------


def test_fetches_an_image_from_an_allowlisted_host(server: LocalServer) -> None:
    server.routes["/cat.png"] = respond(200, PNG, {"Content-Type": "image/png"})
    assert fetch_image_bytes(server.url("/cat.png?sig=abc"), loopback_settings()) == PNG
    assert [r.path for r in server.requests] == ["/cat.png?sig=abc"]


def test_a_body_without_content_length_is_read_to_the_end(server: LocalServer) -> None:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(PNG)

    server.routes["/plain"] = handle
    assert fetch_image_bytes(server.url("/plain"), loopback_settings()) == PNG


def test_the_checked_address_is_dialled_and_the_name_is_sent_as_host(
    server: LocalServer, connections: Connections
) -> None:
    # Given a private host name that the operator allowlisted, resolving to loopback
    server.routes["/a.png"] = respond(200, PNG)
    settings = Settings(allowed_private_hosts=f"images.corp.test:{LOOPBACK_PORT}")
    resolve = resolver({"images.corp.test": ["127.0.0.1"]})
    # When it is fetched
    data = fetch_image_bytes(
        server.url("/a.png", host="images.corp.test"), settings, resolve=resolve
    )
    # Then the socket went to the address and the request named the host
    assert data == PNG
    assert connections.attempts == [("127.0.0.1", server.port)]
    assert server.requests[0].host == f"images.corp.test:{server.port}"


def test_environment_proxies_are_ignored(
    server: LocalServer, connections: Connections, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://10.9.9.9:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    server.routes["/a.png"] = respond(200, PNG)
    assert fetch_image_bytes(server.url("/a.png"), loopback_settings()) == PNG
    assert connections.non_loopback == []


# Refused addresses ---------------------------------------------------------------------------

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "localhost",
    "[::1]",
    "2130706433",
    "0x7f000001",
    "017700000001",
    "127.1",
    "0177.0.0.1",
    "[::ffff:127.0.0.1]",
    "127.0.0.1.",
    "LocalHost",
]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_loopback_in_any_spelling_is_refused_without_a_request(
    host: str, server: LocalServer, connections: Connections
) -> None:
    # Given default settings (no allowlist) and a live server on loopback
    server.routes["/secret"] = respond(200, PNG)
    # When a task asks for it under any spelling of loopback
    error = refuse(server.url("/secret", host=host))
    # Then it is a permanent refusal, and nothing was dialled or served
    assert error.code is ErrorCode.IMAGE_FETCH_FAILED
    assert error.transient is False
    assert server.requests == []
    assert connections.attempts == []


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.5",
        "169.254.169.254",
        "192.168.1.20",
        "172.17.0.1",
        "100.100.100.200",
        "127.0.0.2",
        "0.0.0.0",
        "::1",
        "fd00:ec2::254",
        "fe80::1",
        "::ffff:10.0.0.1",
        "64:ff9b::a9fe:a9fe",
    ],
)
def test_a_public_looking_name_resolving_to_a_private_address_is_refused(
    address: str, connections: Connections
) -> None:
    error = refuse(
        "https://images.example.test/cat.png", resolve=resolver({"images.example.test": [address]})
    )
    assert "non-public address" in error.message
    assert error.transient is False
    assert connections.attempts == []


def test_one_private_record_among_public_ones_is_enough_to_refuse(connections: Connections) -> None:
    resolve = resolver({"mixed.example.test": ["93.184.216.34", "10.0.0.7"]})
    refuse("http://mixed.example.test/a.png", resolve=resolve)
    assert connections.attempts == []


def test_the_name_is_resolved_once_and_the_checked_address_is_dialled(
    connections: Connections,
) -> None:
    # DNS rebinding: the first answer is public, any later one would be loopback
    calls: list[str] = []
    answers = [["93.184.216.34"], ["127.0.0.1"]]

    def rebinding(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        calls.append(host)
        address = answers[min(len(calls), 2) - 1][0]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    error = refuse("http://rebind.example.test:8080/a.png", resolve=rebinding)
    assert calls == ["rebind.example.test"]
    # The only dial went to the checked public address (the guard refused it, as a
    # firewall would here): never to the second answer.
    assert connections.attempts == [("93.184.216.34", 8080)]
    assert error.transient is True


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.png",
        "gopher://127.0.0.1:6379/_INFO",
        "dict://127.0.0.1:11211/stat",
        "data:image/png;base64,iVBORw0KGgo=",
    ],
)
def test_non_http_schemes_are_refused(url: str, connections: Connections) -> None:
    assert refuse(url).transient is False
    assert connections.attempts == []


# Redirects ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location",
    [
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://[::1]/",
        "http://0x7f000001/",
        "http://localhost/",
        "http://metadata.google.internal/",
        "file:///etc/passwd",
        "gopher://10.0.0.1:6379/_FLUSHALL",
        "http://internal.example.test/",
    ],
)
def test_a_redirect_to_a_private_address_is_refused_before_connecting(
    location: str, server: LocalServer, connections: Connections
) -> None:
    # Given an allowlisted server whose image redirects into the internal network
    server.routes["/img"] = redirect(location)
    settings = Settings(allowed_private_hosts=f"images.corp.test:{LOOPBACK_PORT}")
    resolve = resolver({"images.corp.test": ["127.0.0.1"], "internal.example.test": ["10.1.2.3"]})
    # When it is fetched
    error = refuse(server.url("/img", host="images.corp.test"), settings, resolve=resolve)
    # Then the hop is refused at the check: one request served, no other connection tried
    assert error.transient is False
    assert [r.path for r in server.requests] == ["/img"]
    assert connections.non_loopback == []
    assert connections.attempts == [("127.0.0.1", server.port)]


def test_redirects_are_followed_up_to_the_limit(server: LocalServer) -> None:
    server.routes["/r3"] = redirect("/r2", 301)
    server.routes["/r2"] = redirect(server.url("/r1"), 307)
    server.routes["/r1"] = redirect("final.png", 308)  # relative to /r1
    server.routes["/final.png"] = respond(200, PNG)
    assert fetch_image_bytes(server.url("/r3"), loopback_settings(fetch_max_redirects=3)) == PNG
    error = refuse(server.url("/r3"), loopback_settings(fetch_max_redirects=2))
    assert "VQ_FETCH_MAX_REDIRECTS=2" in error.message
    assert error.transient is False


def test_a_redirect_without_location_is_permanent(server: LocalServer) -> None:
    server.routes["/r"] = respond(302)
    assert refuse(server.url("/r"), loopback_settings()).transient is False


# Limits ----------------------------------------------------------------------------------


def test_a_slowly_dripping_body_is_stopped_at_the_deadline(server: LocalServer) -> None:
    server.routes["/drip"] = drip()
    started = time.monotonic()
    error = refuse(server.url("/drip"), loopback_settings(fetch_timeout_s=0.6))
    elapsed = time.monotonic() - started
    assert error.transient is True
    assert "VQ_FETCH_TIMEOUT_S=0.6s" in error.message
    assert 0.5 < elapsed < 1.5


@pytest.mark.parametrize("close", ["Connection: close", "HTTP/1.0"])
def test_a_dripping_body_on_a_closing_connection_is_stopped_at_the_deadline(
    server: LocalServer, close: str
) -> None:
    # http.client hands the socket to the response and forgets it when the answer closes
    # the connection (HTTP/1.0, or Connection: close): the watchdog must still reach it.
    handler = drip(0.05, 10_000, {"Connection": "close"})
    if close == "HTTP/1.0":

        def handler(h: BaseHTTPRequestHandler) -> None:
            h.protocol_version = "HTTP/1.0"
            drip(0.05, 10_000)(h)

    server.routes["/drip-close"] = handler
    started = time.monotonic()
    error = refuse(server.url("/drip-close"), loopback_settings(fetch_timeout_s=0.6))
    # The body would take 500 s; the deadline is 0.6 s (bounded generously for slow CI).
    assert time.monotonic() - started < 10
    assert error.transient is True


def test_slowly_dripping_headers_are_stopped_at_the_deadline(server: LocalServer) -> None:
    server.routes["/drip"] = drip_headers()
    started = time.monotonic()
    error = refuse(server.url("/drip"), loopback_settings(fetch_timeout_s=0.6))
    assert time.monotonic() - started < 1.5
    assert error.transient is True


def test_the_deadline_spans_redirects(server: LocalServer) -> None:
    def slow_redirect(h: BaseHTTPRequestHandler) -> None:
        time.sleep(0.25)
        redirect("/slow")(h)

    server.routes["/slow"] = slow_redirect
    started = time.monotonic()
    error = refuse(
        server.url("/slow"), loopback_settings(fetch_timeout_s=0.6, fetch_max_redirects=20)
    )
    assert time.monotonic() - started < 1.5
    assert error.transient is True
    assert "VQ_FETCH_TIMEOUT_S" in error.message


def test_a_slow_resolver_is_bounded_by_the_deadline() -> None:
    def hanging(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        time.sleep(2)
        return []

    started = time.monotonic()
    error = refuse("http://slow-dns.example.test/", Settings(fetch_timeout_s=0.3), resolve=hanging)
    assert time.monotonic() - started < 1.0
    assert error.transient is True


def test_an_endless_body_is_stopped_at_the_byte_cap(server: LocalServer) -> None:
    server.routes["/endless"] = endless()
    started = time.monotonic()
    with pytest.raises(ImageTooLarge) as caught:
        fetch_image_bytes(server.url("/endless"), loopback_settings(max_image_bytes=300_000))
    assert time.monotonic() - started < 2
    assert caught.value.code is ErrorCode.IMAGE_TOO_LARGE


def test_a_declared_length_over_the_cap_is_refused_before_reading(server: LocalServer) -> None:
    sent: list[int] = []

    def huge(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(10**9))
        h.end_headers()
        h.wfile.flush()
        time.sleep(0.5)  # a body that would be read slowly, if it were read at all
        sent.append(1)

    server.routes["/huge"] = huge
    started = time.monotonic()
    with pytest.raises(ImageTooLarge) as caught:
        fetch_image_bytes(server.url("/huge"), loopback_settings(max_image_bytes=1000))
    assert time.monotonic() - started < 0.4
    assert "1000000000 bytes" in caught.value.message


def test_an_image_at_exactly_the_cap_is_accepted(server: LocalServer) -> None:
    server.routes["/a.png"] = respond(200, PNG)
    assert (
        fetch_image_bytes(server.url("/a.png"), loopback_settings(max_image_bytes=len(PNG))) == PNG
    )
    with pytest.raises(ImageTooLarge):
        fetch_image_bytes(server.url("/a.png"), loopback_settings(max_image_bytes=len(PNG) - 1))


# Outcomes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (429, True),
        (408, True),
        (404, False),
        (403, False),
        (410, False),
        (401, False),
        (400, False),
        (204, False),
        (304, False),
    ],
)
def test_http_status_decides_whether_a_retry_can_help(
    status: int, transient: bool, server: LocalServer
) -> None:
    server.routes["/x"] = respond(status, b"" if status in (204, 304) else b"nope")
    error = refuse(server.url("/x"), loopback_settings())
    assert error.transient is transient
    assert str(status) in error.message


def test_a_refused_connection_is_transient() -> None:
    # Nobody listens on the allowed port outside the `server` fixture.
    url = f"http://127.0.0.1:{LOOPBACK_PORT}/a.png"
    assert refuse(url, loopback_settings()).transient is True


def test_a_body_cut_short_is_transient(server: LocalServer) -> None:
    def short(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "5000")
        h.end_headers()
        h.wfile.write(PNG[:100])
        h.close_connection = True

    server.routes["/short"] = short
    assert refuse(server.url("/short"), loopback_settings()).transient is True


def test_a_server_that_does_not_speak_http_is_permanent() -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", LOOPBACK_PORT))
        listener.listen()

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

        threading.Thread(target=answer, daemon=True).start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/a.png"
        assert refuse(url, loopback_settings()).transient is False


@pytest.mark.parametrize(
    ("errno", "transient"), [(socket.EAI_NONAME, False), (socket.EAI_AGAIN, True)]
)
def test_dns_failures(errno: int, transient: bool) -> None:
    def failing(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(errno, "lookup failed")

    assert refuse("http://gone.example.test/", resolve=failing).transient is transient


def test_query_strings_are_never_logged_or_reported(
    server: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.routes["/r"] = redirect("/gone?token=SECRET2")
    caplog.set_level(logging.DEBUG, logger="worker.fetch")
    caplog.set_level(logging.DEBUG, logger="worker.outbound_http")  # the address refusals
    error = refuse(server.url("/r?token=SECRET1"), loopback_settings())
    refuse("http://10.0.0.1/x?token=SECRET3")
    refuse(
        "http://leak.example.test/x?token=SECRET4",
        resolve=resolver({"leak.example.test": ["10.0.0.9"]}),
    )
    assert "404" in error.message
    assert "SECRET" not in caplog.text
    assert "SECRET" not in error.message


# TLS --------------------------------------------------------------------------------------


@dataclass
class Certificates:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A throwaway CA and a certificate for images.example.test (openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=vision-queue test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    )
    run(
        "req",
        "-new",
        *ec,
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=images.example.test",
    )
    (d / "ext.cnf").write_text(
        "subjectAltName=DNS:images.example.test\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n"
    )
    run(
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    return Certificates(d / "ca.pem", d / "leaf.pem", d / "leaf.key")


@pytest.fixture
def tls_server(certificates: Certificates) -> Iterator[LocalServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.cert, certificates.key)
    with serve({"/a.png": respond(200, PNG)}, tls=context) as state:
        yield state


def test_https_sends_sni_and_verifies_the_certificate_for_the_name(
    tls_server: LocalServer, certificates: Certificates, connections: Connections
) -> None:
    trusting = ssl.create_default_context(cafile=str(certificates.ca))
    settings = Settings(allowed_private_hosts=f"images.example.test:{TLS_PORT}")
    resolve = resolver({"images.example.test": ["127.0.0.1"]})
    url = tls_server.url("/a.png", host="images.example.test")
    assert fetch_image_bytes(url, settings, resolve=resolve, ssl_context=trusting) == PNG
    assert tls_server.sni == ["images.example.test"]
    assert tls_server.requests[0].host == f"images.example.test:{tls_server.port}"
    assert connections.attempts == [("127.0.0.1", tls_server.port)]


def test_https_with_an_untrusted_or_mismatched_certificate_is_permanent(
    tls_server: LocalServer, certificates: Certificates
) -> None:
    settings = Settings(
        allowed_private_hosts=f"images.example.test:{TLS_PORT},other.example.test:{TLS_PORT}"
    )
    resolve = resolver({"images.example.test": ["127.0.0.1"], "other.example.test": ["127.0.0.1"]})
    # Untrusted CA (system store only)
    error = refuse(tls_server.url("/a.png", host="images.example.test"), settings, resolve=resolve)
    assert error.transient is False
    assert "certificate" in error.message
    # Trusted CA, wrong name
    trusting = ssl.create_default_context(cafile=str(certificates.ca))
    error = refuse(
        tls_server.url("/a.png", host="other.example.test"),
        settings,
        resolve=resolve,
        ssl_context=trusting,
    )
    assert error.transient is False
    assert tls_server.requests == []


# Local files ------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "cat.png").write_bytes(PNG)
    (tmp_path / "secret.txt").write_text("password")
    return tmp_path / "images"


def local(root: Path, **overrides: Any) -> Settings:
    return Settings(local_image_roots=str(root), **overrides)


def test_a_file_under_a_root_is_read(root: Path) -> None:
    assert read_local_image(str(root / "cat.png"), local(root)) == PNG
    assert read_local_image(str(root / "sub" / ".." / "cat.png"), local(root)) == PNG


def test_local_paths_are_disabled_without_roots(root: Path) -> None:
    with pytest.raises(InvalidInput) as caught:
        read_local_image(str(root / "cat.png"), Settings())
    assert caught.value.field == "images"


@pytest.mark.parametrize(
    "path",
    ["../secret.txt", "/etc/passwd", "cat.png", "../images-evil/cat.png", "/proc/self/environ"],
)
def test_paths_outside_the_roots_are_invalid_input(root: Path, path: str) -> None:
    (root.parent / "images-evil").mkdir(exist_ok=True)  # a sibling sharing the prefix
    (root.parent / "images-evil" / "cat.png").write_bytes(PNG)
    full = path if path.startswith("/") or not path.startswith("..") else str(root / path)
    with pytest.raises(InvalidInput) as caught:
        read_local_image(full, local(root))
    assert caught.value.field == "images"


def test_a_symlink_pointing_out_of_the_root_is_refused(root: Path) -> None:
    (root / "link.png").symlink_to(root.parent / "secret.txt")
    (root / "dir-link").symlink_to(root.parent)
    for path in (root / "link.png", root / "dir-link" / "secret.txt"):
        with pytest.raises(InvalidInput):
            read_local_image(str(path), local(root))


def test_a_symlink_staying_inside_the_root_is_followed(root: Path) -> None:
    (root / "alias.png").symlink_to(root / "cat.png")
    assert read_local_image(str(root / "alias.png"), local(root)) == PNG


def test_missing_files_directories_and_fifos_are_permanent_failures(root: Path) -> None:
    os.mkfifo(root / "pipe")  # open() on a FIFO would block without O_NONBLOCK
    (root / "folder").mkdir()
    for name in ("missing.png", "folder", "pipe"):
        with pytest.raises(ImageFetchFailed) as caught:
            read_local_image(str(root / name), local(root))
        assert caught.value.transient is False


def test_local_files_over_the_cap_are_too_large(root: Path) -> None:
    with pytest.raises(ImageTooLarge):
        read_local_image(str(root / "cat.png"), local(root, max_image_bytes=len(PNG) - 1))
