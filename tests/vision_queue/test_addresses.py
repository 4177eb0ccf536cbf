"""The pure SSRF rules: which addresses are public, how IP literals are spelled, which URLs pass.

Nothing here opens a socket: refusals are asserted at the functions themselves.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vision_queue.addresses import (
    MAX_URL_CHARS,
    ParsedUrl,
    allowlist_entry,
    check_url,
    check_url_length,
    is_public_address,
    parse_ip_literal,
)
from vision_queue.errors import ErrorCode, ImageFetchFailed, InvalidInput

NO_ALLOWLIST: frozenset[str] = frozenset()


def allowlist(*entries: str) -> frozenset[str]:
    """VQ_ALLOWED_PRIVATE_HOSTS entries as Settings hands them to check_url."""
    return frozenset(allowlist_entry(entry) for entry in entries)


NON_PUBLIC = [
    # IPv4
    "127.0.0.1",
    "127.255.255.254",  # loopback
    "10.0.0.1",
    "10.255.255.255",  # private
    "172.16.0.0",
    "172.31.255.255",  # private (the /12 edges)
    "192.168.0.1",
    "192.168.255.255",  # private
    "169.254.169.254",
    "169.254.0.1",  # link-local, cloud metadata
    "100.64.0.0",
    "100.100.100.200",
    "100.127.255.255",  # CGNAT, Alibaba metadata
    "0.0.0.0",
    "0.1.2.3",  # unspecified / "this network"
    "224.0.0.1",
    "239.255.255.250",  # multicast
    "240.0.0.1",
    "255.255.255.255",  # reserved, broadcast
    "192.0.2.1",
    "198.51.100.7",
    "203.0.113.9",  # documentation
    "198.18.0.1",
    "192.0.0.192",
    "192.88.99.1",  # benchmarking, Oracle metadata, 6to4 relay
    # IPv6
    "::",
    "::1",  # unspecified, loopback
    "fe80::1",
    "febf::1",  # link-local
    "fc00::1",
    "fd00:ec2::254",  # unique-local, AWS metadata
    "fec0::1",  # site-local
    "ff02::1",
    "ff0e::1",  # multicast
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",  # IPv4-mapped
    "::127.0.0.1",  # IPv4-compatible (deprecated)
    "64:ff9b::a00:1",
    "64:ff9b::7f00:1",  # NAT64 of private / loopback
    "64:ff9b:1::1",  # local-use NAT64
    "2002:7f00:1::",
    "2002:a00:1::1",
    "2002:a9fe:a9fe::1",  # 6to4 of private v4
    "2001::1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "2001:db8::1",
    "3fff::1",  # documentation
    "100::1",  # discard-only
    "fe80::1%eth0",  # scoped
]

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "172.15.255.255",
    "172.32.0.0",  # just outside 172.16/12
    "100.63.255.255",
    "100.128.0.0",  # just outside 100.64/10
    "11.0.0.1",
    "169.253.255.255",
    "192.167.255.255",
    "2606:4700:4700::1111",
    "2001:4860:4860::8888",
    "2a00:1450:4001::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",  # embeddings of public v4
]


@pytest.mark.parametrize("text", NON_PUBLIC)
def test_non_public_addresses_are_refused(text: str) -> None:
    assert is_public_address(ipaddress.ip_address(text)) is False


@pytest.mark.parametrize("text", PUBLIC)
def test_public_addresses_are_accepted(text: str) -> None:
    assert is_public_address(ipaddress.ip_address(text)) is True


@settings(max_examples=400, derandomize=True, database=None)
@given(st.ip_addresses())
def test_anything_called_public_is_global_to_the_standard_library(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    # The embedding forms are judged by their IPv4 part, which the stdlib does not do.
    embedded = ("::ffff:0:0/96", "64:ff9b::/96", "2002::/16")
    if ip.version == 6 and any(ip in ipaddress.ip_network(net) for net in embedded):
        return
    if is_public_address(ip):
        assert ip.is_global and not ip.is_multicast


# IP literal spellings ---------------------------------------------------------------------

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "2130706433",
    "0x7f000001",
    "0X7F000001",
    "017700000001",
    "0177.0.0.1",
    "0x7f.0.0.1",
    "0x7f.1",
    "127.1",
    "127.0.1",
    "127.000.000.001",
    "127.0.0.1.",
    "0177.0x0.0.01",
]


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
def test_every_ipv4_spelling_of_loopback_is_recognised(spelling: str) -> None:
    assert parse_ip_literal(spelling) == ipaddress.IPv4Address("127.0.0.1")


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("169.254.43518", "169.254.169.254"),  # two-part metadata
        ("0xa9fea9fe", "169.254.169.254"),
        ("10.1", "10.0.0.1"),
        ("0", "0.0.0.0"),
        ("[::1]", "::1"),
        ("::ffff:7f00:1", "::ffff:127.0.0.1"),
        ("[fe80::1]", "fe80::1"),
    ],
)
def test_ip_literals_parse_to_their_address(spelling: str, expected: str) -> None:
    assert parse_ip_literal(spelling) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "images.example.test",
        "1.2.3.4.5",
        "256.0.0.1",
        "1.2.3.256",
        "1.2.3.08",
        "0x1g",
        "4294967296",
        "1..2",
        ".1.2.3",
        "",
        "[::1",
        "::1::2",
        "localhost",
    ],
)
def test_non_literals_are_not_addresses(host: str) -> None:
    assert parse_ip_literal(host) is None


@settings(max_examples=500, derandomize=True, database=None)
@given(st.text(alphabet="0123456789abcdefxX.", min_size=1, max_size=20))
def test_whatever_inet_aton_takes_for_an_address_is_recognised(text: str) -> None:
    # The security-relevant direction: a resolver must never see an IP we took for a name.
    try:
        packed = socket.inet_aton(text)
    except OSError:
        return
    assert parse_ip_literal(text) == ipaddress.IPv4Address(packed)


@settings(max_examples=200, derandomize=True, database=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_decimal_hex_and_octal_spellings_agree(value: int) -> None:
    address = ipaddress.IPv4Address(value)
    for spelling in (str(value), hex(value), "0" + oct(value)[2:]):
        assert parse_ip_literal(spelling) == address


# check_url ------------------------------------------------------------------------------


def refused(url: str, allowlist: frozenset[str] = NO_ALLOWLIST) -> ImageFetchFailed:
    with pytest.raises(ImageFetchFailed) as caught:
        check_url(url, allowlist)
    error = caught.value
    assert error.code is ErrorCode.IMAGE_FETCH_FAILED
    assert error.transient is False, "a refused URL must not be retried"
    return error


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "file://localhost/etc/passwd",
        "ftp://example.com/a.png",
        "gopher://example.com:70/_GET",
        "data:image/png;base64,iVBORw0KGgo=",
        "dict://example.com:11211/stat",
        "ldap://example.com/",
        "jar:http://example.com/!/",
        "javascript:alert(1)",
        "HTTPX://example.com/",
        "//example.com/a.png",
        "example.com/a.png",
    ],
)
def test_only_http_and_https_are_accepted(url: str) -> None:
    assert "http" in refused(url).message


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "017700000001",
        "127.1",
        "0177.0.0.1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "169.254.169.254",
        "0xa9fea9fe",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "100.64.0.1",
        "0.0.0.0",
        "0",
        "[fd00:ec2::254]",
        "[fe80::1]",
        "[64:ff9b::a00:1]",
        "１２７.０.０.１",  # full-width digits: IDNA maps them to 127.0.0.1
        "１０.０.０.１",
    ],
)
def test_urls_with_non_public_ip_literals_are_refused(host: str) -> None:
    assert "non-public address" in refused(f"http://{host}:8080/image.png").message


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST",
        "localhost.",
        "api.localhost",
        "metadata.google.internal",
        "printer.local",
        "router.home.arpa",
        "box.localdomain",
    ],
)
def test_local_names_are_refused_before_resolving(host: str) -> None:
    assert "local name" in refused(f"http://{host}/a.png").message


@pytest.mark.parametrize(
    "url",
    [
        "http://user:secret@example.com/a.png",
        "http://user@example.com/a.png",
        "http://example.com@127.0.0.1/a.png",  # reads as example.com, goes to 127.0.0.1
        "http://:@example.com/",
    ],
)
def test_credentials_in_urls_are_refused(url: str) -> None:
    error = refused(url)
    assert "user name or password" in error.message
    assert "secret" not in error.message


@pytest.mark.parametrize(
    "url",
    [
        "http:///a.png",
        "http://:80/a.png",
        "https://",
        "http://example.com:0/",
        "http://example.com:99999/",
        "http://example.com:port/",
        "http://[::1/",
        "http://exa mple.com/",
        "http://example.com/a\r\nHost: evil",
        "http://example.com/\t",
        "http://ex_ample..com/",
        "http://-bad-.example/",
        "http://1.2.3.08/",
        "http://example.com\\@127.0.0.1/",
        "http://[fe80::1%25eth0]/",
        "http://%31%32%37.0.0.1/",  # browsers percent-decode hosts; we refuse them
        "http://127.0.0.1%2f@example.com/",
        "https://example.com/a\udc80.jpg",  # a lone surrogate: no request line carries it
        "https://ex\ud800ample.com/",
        "",
    ],
)
def test_malformed_urls_are_refused(url: str) -> None:
    refused(url)


def test_refusals_never_echo_credentials() -> None:
    # urlsplit's own error for this netloc quotes it, password included
    error = refused("http://user:p\uff03ss@example.com/")
    assert "p\uff03ss" not in error.message
    assert "user" not in error.message


def test_an_accepted_url_is_split_for_the_fetcher() -> None:
    parsed = check_url("HTTPS://Images.Example.COM/cats/1.png?token=abc#frag", NO_ALLOWLIST)
    assert parsed == ParsedUrl(
        scheme="https",
        host="images.example.com",
        port=443,
        target="/cats/1.png?token=abc",
        ip=None,
        allowlisted=False,
    )
    assert parsed.url == "https://images.example.com/cats/1.png?token=abc"
    assert parsed.redacted == "https://images.example.com/cats/1.png"


def test_ports_ipv6_idn_and_non_ascii_paths_are_normalised() -> None:
    v6 = check_url("http://[2606:4700:4700::1111]:8080", NO_ALLOWLIST)
    assert (v6.host, v6.port, v6.target, v6.netloc) == (
        "2606:4700:4700::1111",
        8080,
        "/",
        "[2606:4700:4700::1111]:8080",
    )
    assert v6.ip == ipaddress.ip_address("2606:4700:4700::1111")
    idn = check_url("http://bücher.example/bild ä.png".replace(" ", "%20"), NO_ALLOWLIST)
    assert idn.host == "xn--bcher-kva.example"
    assert idn.target == "/bild%20%C3%A4.png"
    assert check_url("http://8.8.8.8/", NO_ALLOWLIST).ip == ipaddress.ip_address("8.8.8.8")


def test_allowlisted_host_and_port_skip_the_address_rules() -> None:
    allow = allowlist("127.0.0.1:9000", "localhost:9000", "minio.internal")
    assert check_url("http://127.0.0.1:9000/a.png", allow).allowlisted
    assert check_url("http://localhost:9000/a.png", allow).allowlisted
    assert check_url("http://minio.internal/bucket/a.png", allow).allowlisted
    assert check_url("https://minio.internal/bucket/a.png", allow).allowlisted
    # The canonical address matches too: 2130706433 is 127.0.0.1.
    assert check_url("http://2130706433:9000/", allow).host == "127.0.0.1"
    refused("http://10.0.0.1/", allow)  # other private addresses stay refused
    refused("http://metadata.google.internal/", allow)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",  # Redis on the allow-listed image host
        "http://127.0.0.1/",  # its default port was not listed either
        "http://0x7f000001:22/",
        "http://[::ffff:127.0.0.1]:6379/",
    ],
)
def test_an_allowlisted_host_opens_no_other_port(url: str) -> None:
    refused(url, allowlist("127.0.0.1:9000"))


def test_a_bare_allowlisted_name_allows_only_ports_80_and_443() -> None:
    allow = allowlist("images.corp.test")
    assert check_url("http://images.corp.test/a.png", allow).allowlisted
    assert check_url("https://images.corp.test:443/a.png", allow).allowlisted
    assert not check_url("http://images.corp.test:6379/a.png", allow).allowlisted


@pytest.mark.parametrize(
    ("entry", "canonical"),
    [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("0x7f.1:8080", "127.0.0.1:8080"),
        ("[::1]:9000", "[::1]:9000"),
        ("[::1]", "::1"),
        ("Images.Corp.Test.", "images.corp.test"),
    ],
)
def test_allowlist_entries_have_one_canonical_form(entry: str, canonical: str) -> None:
    assert allowlist_entry(entry) == canonical


@pytest.mark.parametrize("entry", ["host:0", "host:70000", "a b", "[nonsense]:80", "h:1:2"])
def test_malformed_allowlist_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        allowlist_entry(entry)


def test_urls_longer_than_the_limit_are_refused() -> None:
    long_url = "https://example.com/" + "a" * MAX_URL_CHARS
    refused(long_url)
    with pytest.raises(InvalidInput) as caught:
        check_url_length(long_url, field="images[2]")
    assert caught.value.field == "images[2]"
    assert str(MAX_URL_CHARS) in caught.value.message and "aaaa" not in caught.value.message
    check_url_length("https://example.com/" + "a" * (MAX_URL_CHARS - 20))


def test_public_urls_are_not_flagged_as_allowlisted() -> None:
    assert not check_url("https://example.com/a.png", frozenset({"localhost"})).allowlisted
