"""Image and callback strings (issue #19, class 4): one parser decides what a string is,
case-insensitively, for every route and both clients; a server never opens a path; every
route applies the same address rules, resolved names and callbacks included.

The address verdicts are tested at the check itself, with sockets forbidden; the routes
against a real gateway (uvicorn, Redis, no worker: nothing may be queued).
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_support import API_KEY, MODEL, GatewayProcess, image_bytes, submitted_count
from support.redis_server import RedisServer

from producer.submission import SubmitRequest, prepare
from vision_queue.addresses import check_resolved, check_url, is_public_address
from vision_queue.errors import ImageFetchFailed, ImageTooLarge, InvalidInput
from vision_queue.image_refs import RefKind, ref_kind
from vision_queue.images import ImageLimits
from vision_queue.schemas import ImageRef, ImageSource
from vision_queue.settings import Settings
from vision_queue.streams import check_cursor

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PNG = image_bytes()
B64 = base64.b64encode(PNG).decode()


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket opened from here on fails the test: the checks below are pure."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# The one parser ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("data:image/png;base64,AA==", RefKind.DATA),
        ("DATA:image/png;base64,AA==", RefKind.DATA),
        ("DaTa:/etc/passwd", RefKind.DATA),  # a (malformed) data URI, never a path
        ("http://images.example/a.png", RefKind.URL),
        ("HTTPS://images.example/a.png", RefKind.URL),
        ("hTtP://images.example/a.png", RefKind.URL),
    ],
)
def test_data_uris_and_urls_are_recognised_in_any_case(text: str, kind: RefKind) -> None:
    assert ref_kind(text, "images[0]", allow_path=False) is kind
    assert ref_kind(text, "images[0]", allow_path=True) is kind


@pytest.mark.parametrize(
    "text",
    ["file:///etc/passwd", "FILE:///etc/passwd", "ftp://x/a.png", "gopher://x/", "javascript://x"],
)
def test_other_schemes_are_refused_on_both_sides(text: str) -> None:
    for allow_path in (False, True):
        with pytest.raises(InvalidInput) as caught:
            ref_kind(text, "images[2]", allow_path=allow_path)
        assert caught.value.field == "images[2]"


@pytest.mark.parametrize(
    "text", ["/etc/passwd", "cat.png", " data:image/png;base64,AA==", "\tHTTP://x/a", "~/a.png"]
)
def test_a_server_never_takes_a_string_for_a_path(text: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        ref_kind(text, "messages[0].content[1]", allow_path=False)
    assert caught.value.field == "messages[0].content[1]"
    assert ref_kind(text, "images[0]", allow_path=True) is RefKind.PATH  # the local client


def test_both_clients_decode_a_data_uri_in_any_case_and_a_server_client_opens_no_path(
    tmp_path: Path,
) -> None:
    settings = Settings()
    limits = ImageLimits.from_settings(settings)
    for prefix in ("data:image/png;base64,", "DATA:IMAGE/PNG;BASE64,", "Data:image/png;base64,"):
        draft = prepare(SubmitRequest("describe", [prefix + B64]), settings, limits)
        assert draft.images == (PNG,)
    upper = prepare(SubmitRequest("describe", ["HTTPS://images.example/a.png"]), settings, limits)
    assert upper.images == (ImageRef(ImageSource.URL, "HTTPS://images.example/a.png"),)
    path = tmp_path / "cat.png"
    path.write_bytes(PNG)
    assert prepare(SubmitRequest("describe", [str(path)]), settings, limits).images == (PNG,)
    for given in (str(path), path, ImageRef(ImageSource.PATH, str(path))):
        with pytest.raises(InvalidInput) as caught:
            prepare(SubmitRequest("describe", [given]), settings, limits, local_files=False)
        assert caught.value.field == "images[0]"


def test_a_client_error_about_a_file_names_the_file_and_the_field(tmp_path: Path) -> None:
    settings = Settings(max_image_bytes=100)
    big = tmp_path / "holiday-photo.png"
    big.write_bytes(PNG)
    limits = ImageLimits.from_settings(settings)
    request = SubmitRequest("compare", ["https://images.example/a.png", str(big)])
    with pytest.raises(ImageTooLarge) as caught:
        prepare(request, settings, limits)
    assert caught.value.field == "images[1]"
    assert "holiday-photo.png" in str(caught.value)


# Address rules at the check itself ---------------------------------------------------------


@pytest.mark.parametrize(
    "addresses",
    [
        ["127.0.0.1"],
        ["10.0.0.5"],
        ["192.168.1.1"],
        ["169.254.169.254"],  # cloud metadata
        ["100.100.100.200"],  # Alibaba metadata (CGNAT)
        ["fd00:ec2::254"],  # AWS metadata over IPv6
        ["fe80::1"],
        ["::1"],
        ["::ffff:127.0.0.1"],
        ["93.184.216.34", "10.0.0.1"],  # one private answer among public ones
    ],
)
def test_a_name_resolving_to_a_non_public_address_is_refused(
    no_sockets: None, addresses: list[str]
) -> None:
    parsed = check_url("https://images.example/a.png", frozenset())
    with pytest.raises(ImageFetchFailed) as caught:
        check_resolved(parsed, addresses)
    assert caught.value.transient is False
    assert "non-public" in caught.value.message


def test_public_answers_and_allow_listed_hosts_pass(no_sockets: None) -> None:
    check_resolved(check_url("https://images.example/a.png", frozenset()), ["93.184.216.34"])
    allowed = check_url("http://minio.corp:9000/a.png", frozenset({"minio.corp:9000"}))
    check_resolved(allowed, ["10.0.0.5"])


@pytest.mark.parametrize("cursor", ["garbage", "(1-0", "1-0-0", "-", "+", "1-", "", "1 -0"])
def test_a_cursor_that_is_not_an_entry_id_is_a_callers_error(cursor: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_cursor(cursor, "Last-Event-ID")
    assert caught.value.field == "Last-Event-ID"


# Every route, on a real gateway ------------------------------------------------------------


@pytest.fixture(scope="module")
def intake(
    module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    env = {"VQ_GATEWAY_REQUESTS_PER_MINUTE": "0"}
    with GatewayProcess(module_redis.url, tmp_path_factory.mktemp("intake"), **env) as gw:
        yield gw


def loopback_name() -> str:
    """A name this machine's hosts file maps to loopback or a private address (the host
    name, ip6-localhost...: no DNS query), not one reserved for local use (those are
    refused before any lookup)."""
    hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
    listed = {word for line in hosts.splitlines() for word in line.split("#")[0].split()[1:]}
    for name in (socket.gethostname(), "ip6-localhost", "ip6-loopback", *sorted(listed)):
        if name not in listed or name == "localhost" or "." in name:
            continue
        try:
            infos = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)
        except OSError:
            continue
        if infos and not any(is_public_address(ip_address(info[4][0])) for info in infos):
            return name
    pytest.skip("no host name here maps to a non-public address in /etc/hosts")


def chat(url: str) -> dict[str, Any]:
    content = [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}]}


def test_names_resolving_to_loopback_are_refused_by_every_route_naming_the_field(
    intake: GatewayProcess, module_redis: RedisServer
) -> None:
    name = loopback_name()
    before = submitted_count(module_redis.url)
    url = f"http://{name}/a.png"
    task = httpx.post(
        intake.url("/v1/tasks"), headers=AUTH, json={"task": "describe", "images": [{"url": url}]}
    )
    assert task.status_code == 400
    assert task.json()["error"]["param"] == "images[0]"
    assert "non-public" in task.json()["error"]["message"]

    completion = httpx.post(intake.url("/v1/chat/completions"), headers=AUTH, json=chat(url))
    assert completion.status_code == 400
    assert completion.json()["error"]["param"] == "messages[0].content[1]"
    assert "non-public" in completion.json()["error"]["message"]

    form = httpx.post(
        intake.url("/v1/tasks"),
        headers=AUTH,
        data={"task": "describe"},
        files={"images": (None, url)},  # a text part: a URL, as multipart callers send one
    )
    assert form.status_code == 400
    assert form.json()["error"]["param"] == "images[0]"

    hook = httpx.post(
        intake.url("/v1/tasks"),
        headers=AUTH,
        json={"task": "ask", "prompt": "hi", "callback_url": f"https://{name}/hook"},
    )
    assert hook.status_code == 400
    assert hook.json()["error"]["param"] == "callback_url"
    assert submitted_count(module_redis.url) == before  # nothing was queued


def test_no_spelling_makes_the_gateway_open_a_local_file(
    intake: GatewayProcess, module_redis: RedisServer, tmp_path: Path
) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(PNG)  # a valid image: opening it would have been accepted
    before = submitted_count(module_redis.url)
    spellings = [str(path), f"DATA:{path}", f"Data:{path}", f"file://{path}", f"FILE://{path}",
                 f" {path}", f"data:{path}"]
    for text in spellings:
        for body in (
            {"task": "describe", "images": [{"url": text}]},
            {"task": "describe", "images": [{"data": text}]},
        ):
            answer = httpx.post(intake.url("/v1/tasks"), headers=AUTH, json=body)
            assert answer.status_code == 400, (text, answer.text)
            assert answer.json()["error"]["param"] == "images[0]"
            assert "cannot read" not in answer.text
        answer = httpx.post(intake.url("/v1/chat/completions"), headers=AUTH, json=chat(text))
        assert answer.status_code == 400, (text, answer.text)
        assert answer.json()["error"]["param"] == "messages[0].content[1]"
        assert "cannot read" not in answer.text
    assert submitted_count(module_redis.url) == before


def test_a_data_uri_in_capitals_is_accepted_as_an_image(
    intake: GatewayProcess,
) -> None:
    body = {"task": "describe", "images": [{"data": "DATA:IMAGE/PNG;BASE64," + B64}]}
    answer = httpx.post(intake.url("/v1/tasks"), headers=AUTH, json=body)
    assert answer.status_code == 202, answer.text
