"""Which image URLs a worker may fetch: the pure part of the SSRF guard (no sockets here).

`check_url` runs on the producer before a URL is queued and on the worker for the URL and
every redirect hop; the worker then resolves the name and runs `is_public_address` on every
address it got back (worker/outbound_http.py). The rules:

* only http and https;
* no user:password@ part: `http://trusted.example@evil.example/` reads as the wrong host to
  people and to some parsers, and a worker has no business sending credentials;
* a host that is an IP literal, in any spelling a resolver or browser accepts (2130706433,
  0x7f.1, 0177.0.0.1, 127.1, [::ffff:127.0.0.1]), must be a public address;
* names reserved for local use (localhost, *.internal, *.local...) are refused up front;
* a host and port named in VQ_ALLOWED_PRIVATE_HOSTS skip the address rules (private
  deployments): an entry `host:port` allows that one port, a bare `host` only the default
  ports 80 and 443, so allow-listing an internal image server never opens its Redis port;
* a URL is at most MAX_URL_CHARS characters long.

Every refusal is a permanent ImageFetchFailed: retrying will not make the address public.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

from vision_queue.errors import ImageFetchFailed, InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# Not reachable on the public internet (IANA special-purpose registries), so never a
# legitimate image host and often an internal service: an explicit table rather than the
# stdlib's is_global, whose tables change between Python releases and which calls
# multicast "global".
_BLOCKED_V4: tuple[ipaddress.IPv4Network, ...] = (
    _V4("0.0.0.0/8"),  # "this network"; 0.0.0.0 reaches the local host on Linux
    _V4("10.0.0.0/8"),  # private
    _V4("100.64.0.0/10"),  # carrier-grade NAT (Alibaba Cloud metadata is 100.100.100.200)
    _V4("127.0.0.0/8"),  # loopback
    _V4("169.254.0.0/16"),  # link-local, cloud metadata 169.254.169.254
    _V4("172.16.0.0/12"),  # private
    _V4("192.0.0.0/24"),  # IETF protocol assignments (Oracle Cloud metadata 192.0.0.192)
    _V4("192.0.2.0/24"),  # TEST-NET-1 (documentation)
    _V4("192.88.99.0/24"),  # 6to4 relay anycast (deprecated)
    _V4("192.168.0.0/16"),  # private
    _V4("198.18.0.0/15"),  # benchmarking
    _V4("198.51.100.0/24"),  # TEST-NET-2 (documentation)
    _V4("203.0.113.0/24"),  # TEST-NET-3 (documentation)
    _V4("224.0.0.0/4"),  # multicast
    _V4("240.0.0.0/4"),  # reserved, and 255.255.255.255 broadcast
)

# IPv6 is allow-listed: only global unicast 2000::/3 can be public, minus the blocks below.
# Everything outside it (::1, ::, fc00::/7 unique-local incl. AWS metadata fd00:ec2::254,
# fe80::/10 link-local, fec0::/10 site-local, ff00::/8 multicast, 100::/64 discard,
# 64:ff9b:1::/48 local NAT64) is refused, except the two forms that embed an IPv4
# address, which are judged by that address.
_GLOBAL_UNICAST_V6 = _V6("2000::/3")
_BLOCKED_V6: tuple[ipaddress.IPv6Network, ...] = (
    _V6("2001::/23"),  # IETF protocol assignments, incl. Teredo 2001::/32 (tunnels to v4)
    _V6("2001:db8::/32"),  # documentation
    _V6("3fff::/20"),  # documentation (RFC 9637)
)
_MAPPED_V4 = _V6("::ffff:0:0/96")  # ::ffff:127.0.0.1 is 127.0.0.1 to a dual-stack socket
_NAT64 = _V6("64:ff9b::/96")  # a NAT64 gateway forwards 64:ff9b::a00:1 to 10.0.0.1
_SIX_TO_FOUR = _V6("2002::/16")  # 2002:AABB:CCDD:: routes to AA.BB.CC.DD

# Names that resolve to the local host or the local network by convention (RFC 6761,
# RFC 6762, RFC 8375, ICANN's .internal): metadata.google.internal, printer.local...
_LOCAL_NAMES = ("localhost", "localdomain", "internal", "local", "home.arpa")
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_V4_PART = re.compile(r"0[xX][0-9a-fA-F]*|[0-9]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ENTRY_WITH_PORT = re.compile(r"(?P<host>\[[^\]]*\]|[^:\[\]]+):(?P<port>[0-9]{1,5})")

# Longest image URL accepted (characters). Signed URLs with session tokens run to about
# 2,000; request lines beyond 8 KB are refused by common servers anyway.
MAX_URL_CHARS = 4096


@dataclass(frozen=True)
class ParsedUrl:
    """A checked http(s) URL, split into what a fetcher needs."""

    scheme: str  # "http" or "https"
    host: str  # lower-case ASCII name, or the canonical text of an IP literal (no brackets)
    port: int
    target: str  # path and query for the request line; "/" when empty; no fragment
    ip: IPAddress | None  # set when the host is an IP literal
    allowlisted: bool  # host and port are allowed by VQ_ALLOWED_PRIVATE_HOSTS

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == _DEFAULT_PORTS[self.scheme]:
            return host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.target}"

    @property
    def redacted(self) -> str:
        """The URL without its query string, which may carry tokens: the only form to log."""
        return f"{self.scheme}://{self.netloc}{self.target.split('?', 1)[0]}"


def is_public_address(ip: IPAddress) -> bool:
    """True when `ip` is a publicly routable unicast address a worker may connect to."""
    if isinstance(ip, ipaddress.IPv4Address):
        return not any(ip in network for network in _BLOCKED_V4)
    if ip.scope_id:  # fe80::1%eth0: a zone only makes sense for local addresses
        return False
    if ip in _MAPPED_V4 or ip in _NAT64:
        return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip in _SIX_TO_FOUR:
        return is_public_address(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))
    if ip not in _GLOBAL_UNICAST_V6:
        return False
    return not any(ip in network for network in _BLOCKED_V6)


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a host string denotes when it is an IP literal, else None.

    Understands every IPv4 spelling inet_aton(3) and the WHATWG URL parser accept, since
    either may be what finally interprets the host: decimal `2130706433`, hex `0x7f000001`,
    octal `0177.0.0.1`, short forms `127.1` and `127.0.1`, mixed radices, one trailing dot.
    IPv6 may come with or without brackets.
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            return None
    return _parse_ipv4(text)


def check_resolved(parsed: ParsedUrl, addresses: list[str], what: str = "image URL") -> None:
    """Refuse (ImageFetchFailed) when any address `parsed`'s host resolved to is not public.

    The rule the worker applies before connecting, run by the gateway at submission. An
    allow-listed host passes; text that is not an address is refused."""
    if parsed.allowlisted:
        return
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            reason = f"{what} host {parsed.host} resolved to something not an address"
            raise _refused(reason) from None
        if not is_public_address(ip):
            raise _refused(f"{what} host {parsed.host} resolves to a non-public address ({ip})")


def check_url_length(url: object, field: str | None = None) -> None:
    """Refuse an over-long URL as the caller's mistake (InvalidInput naming `field`)."""
    if isinstance(url, str) and len(url) > MAX_URL_CHARS:
        raise InvalidInput(
            f"image URL has {len(url)} characters, more than {MAX_URL_CHARS}", field=field
        )


def allowlist_entry(entry: str) -> str:
    """The canonical form of one VQ_ALLOWED_PRIVATE_HOSTS entry; ValueError if malformed.

    `host:port` -> `host:port`, `[v6]:port` -> `[v6]:port`, a bare `host` or `v6` -> itself;
    names lower-cased without a trailing dot, IP literals in their canonical spelling, so
    an entry matches a URL whatever spelling either uses.
    """
    text = entry.strip().lower()
    match = _ENTRY_WITH_PORT.fullmatch(text)
    host_text, port = (match["host"], int(match["port"])) if match else (text, None)
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not between 1 and 65535")
    ip = parse_ip_literal(host_text)
    if ip is not None:
        host = str(ip)
    elif ":" in host_text or "[" in host_text:
        raise ValueError("entries are host, host:port or [ipv6]:port")
    else:
        try:
            host = _normalise_name(host_text)
        except ImageFetchFailed:
            raise ValueError("an entry is not a valid host name") from None
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_url(url: str, allowlist: frozenset[str]) -> ParsedUrl:
    """Split and check an image URL; raise a permanent ImageFetchFailed when it is refused.

    `allowlist` holds canonical entries (`allowlist_entry`) exempt from the address rules.
    """
    if not isinstance(url, str) or not url:
        raise _refused("image URL must be a non-empty string")
    if len(url) > MAX_URL_CHARS:
        raise _refused(f"image URL is longer than {MAX_URL_CHARS} characters")
    # Request smuggling / header injection: no whitespace or control characters anywhere.
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url):
        raise _refused("image URL must not contain whitespace or control characters")
    if not url.isascii():
        try:
            url.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates: no request line can carry them, and no JSON encoder either.
            raise _refused("image URL is not valid UTF-8 text") from None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        # Not echoing urlsplit's message: it can quote the netloc, credentials included.
        raise _refused("image URL is malformed") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        # file://, ftp://, gopher://, data:, dict://... would reach local files or speak
        # other protocols to internal services.
        raise _refused(f"only http and https image URLs are accepted, not {scheme[:16] or 'none'}:")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise _refused("image URLs must not contain a user name or password")
    raw_host = parts.hostname
    if not raw_host:
        raise _refused("image URL has no host")
    if port == 0:
        raise _refused("image URL port must be between 1 and 65535")

    ip = parse_ip_literal(raw_host)
    if ip is not None:
        host = str(ip)
    elif ":" in raw_host:
        raise _refused("image URL host is not a valid IPv6 address")
    else:
        host = _normalise_name(raw_host)
        # IDNA maps full-width digits to ASCII: "１２７.０.０.１" is 127.0.0.1 after all.
        ip = parse_ip_literal(host)
        host = str(ip) if ip is not None else host
    effective_port = port or _DEFAULT_PORTS[scheme]
    allowlisted = _allowlisted(host, effective_port, allowlist)
    if not allowlisted:
        if ip is not None and not is_public_address(ip):
            raise _refused(f"image URL points to a non-public address ({ip})")
        if ip is None and _is_local_name(host):
            raise _refused(f"image URL host {host} is a local name")

    target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
    # http.client sends the request line as ASCII: percent-encode anything else, keep
    # existing escapes and reserved characters as they are.
    target = quote(target, safe="/:@!$&'()*+,;=?%~[]-._")
    return ParsedUrl(scheme, host, effective_port, target, ip, allowlisted)


def _allowlisted(host: str, port: int, allowlist: frozenset[str]) -> bool:
    """`host:port` listed, or the bare host listed and the port is 80 or 443."""
    key = f"[{host}]" if ":" in host else host
    if f"{key}:{port}" in allowlist:
        return True
    return port in _DEFAULT_PORTS.values() and host in allowlist


def _parse_ipv4(text: str) -> ipaddress.IPv4Address | None:
    if text.endswith("."):
        text = text[:-1]  # "127.0.0.1." is the same host to resolvers and browsers
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_V4_PART.fullmatch(p) for p in parts):
        return None
    numbers: list[int] = []
    for part in parts:
        if part[:2] in ("0x", "0X"):
            numbers.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part.startswith("0"):
            if not set(part) <= set("01234567"):
                return None  # "08" is no number; the URL parser refuses it (see below)
            numbers.append(int(part, 8))
        else:
            numbers.append(int(part))
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for index, n in enumerate(leading):
        value += n << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _normalise_name(raw_host: str) -> str:
    """Lower-case ASCII (IDNA) form without a trailing dot; refuses what is not a DNS name."""
    host = raw_host.lower()
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _refused("image URL host is not a valid domain name") from None
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    # "%31%32%37.0.0.1", "a b", "x\\y": browsers would decode or rewrite these; we refuse.
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise _refused("image URL host is not a valid domain name")
    if _V4_PART.fullmatch(labels[-1]) and parse_ip_literal(name) is None:
        # Parser differential: a host ending in a number is an IPv4 address to browsers
        # and to inet_aton; one that does not parse as such ("1.2.3.08") is not a name.
        raise _refused("image URL host is not a valid IPv4 address")
    return name


def _is_local_name(host: str) -> bool:
    return any(host == suffix or host.endswith("." + suffix) for suffix in _LOCAL_NAMES)


def _refused(message: str) -> ImageFetchFailed:
    return ImageFetchFailed(message, transient=False)
